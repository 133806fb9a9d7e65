#!/usr/bin/env bash
# `make test-cluster`: the tiny pipeline through `snakemake --profile profiles/slurm` on a real,
# private one-node Slurm cluster started here, compared with a local run of the same config.
#
# 1. Installs Slurm and munge when missing (apt, as root; otherwise prints the apt-get line, exit 1).
# 2. Starts its own munged (own key and socket), slurmctld and slurmd from a temporary slurm.conf
#    (SLURM_CONF) on free ports of their own, with two partitions (b2txt_cpu, the default, and
#    b2txt_train), two GPUs that are not (GRES on /dev/null and /dev/zero) and a job-completion log.
# 3. Runs the tiny config (tests/configs/tiny.yaml merged as tests/test_pipeline.py does, plus a
#    `resources:` overlay sized for this node) twice, in two copies of the workflow: through the
#    Slurm profile, and locally (--cores 2); checks that every job was a Slurm job that asked for
#    what config `resources:` says (cpus, memory, time limit, partition), and that the results are
#    equal: PER/WER tables, training curve, logits (bit for bit), decoded sentences, n-best lists.
# 4. A rule that fails (its input corrupted) makes snakemake exit non-zero naming the rule.
# 5. resources.train.gpus: 2 -> the train job gets --gpus=2 and runs `b2txt train --nproc 2`;
#    `srun --ntasks 2 b2txt train` (ranks from Slurm's variables) trains the same model.
# 6. A service() rule (redis-server) and its consumer run as one Slurm group job.
# Every daemon and job it started is stopped on exit, also when a check fails or it is interrupted.
# KEEP=1 keeps the temporary directory (logs) for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export B2TXT_PROGRESS=0
VENV=${VENV:-.venv}
[[ -x "$VENV/bin/snakemake" ]] || { echo "test-cluster: no $VENV; run scripts/bootstrap.sh (make bootstrap) first" >&2; exit 1; }
export PATH="$REPO/$VENV/bin:$PATH"
PYTHON="$REPO/$VENV/bin/python"

say() { echo "[test-cluster $(date +%H:%M:%S)] $*" >&2; }
fail() { echo "[test-cluster] FAILED: $*" >&2; exit 1; }
T0=$(date +%s)

# --- 1. packages ------------------------------------------------------------------------------
PKGS=(slurmd slurmctld slurm-client munge)
missing=()
for pkg in "${PKGS[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test-cluster: missing packages: ${missing[*]}" >&2
    echo "test-cluster: install them with:  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "test-cluster: starting munged/slurmctld/slurmd needs root (run: sudo make test-cluster)" >&2
  exit 1
fi

# --- 2. a private cluster -----------------------------------------------------------------------
T=$(mktemp -d /tmp/b2txt-cluster.XXXXXX)
chmod 755 "$T"
PIDS=()   # daemons started here, stopped in reverse order by cleanup
RUNS=()   # snakemake runs (each its own process group), stopped first

# start_in/run_in DIR LOG SECONDS CMD...: CMD in DIR, output to LOG, in a process group of its own that
# cleanup can stop (and in the background, so that a signal reaches the trap at once).
start_in() {
  local dir=$1 log=$2 secs=$3; shift 3
  setsid bash -c 'cd "$1" && shift && exec timeout "$@"' _ "$dir" "$secs" "$@" >"$log" 2>&1 &
  RUNS+=($!)
  LAST=$!
}
run_in() { start_in "$@"; wait "$LAST"; }

cleanup() {
  local rc=$?
  set +e
  for pid in "${RUNS[@]}"; do
    kill -0 "$pid" 2>/dev/null || continue
    say "stopping run $pid"
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null
  done
  if [[ -n "${SLURM_CONF:-}" && -f "$SLURM_CONF" ]]; then
    # our cluster's jobs only (SLURM_CONF points the tools at it): no job outlives the test
    local jobs
    jobs=$(timeout 5 squeue -h -o %i 2>/dev/null)
    if [[ -n "$jobs" ]]; then
      say "cancelling leftover jobs: $(echo $jobs)"
      timeout 5 scancel $jobs 2>/dev/null
      for _ in $(seq 20); do [[ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
  fi
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    local pid=${PIDS[i]}
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { say "killing $pid"; kill -KILL "$pid" 2>/dev/null; }
    wait "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null && { echo "[test-cluster] daemon $pid still running" >&2; rc=1; }
  done
  if ((rc != 0)); then
    for f in "$T"/log/slurmctld.log "$T"/log/slurmd.log; do
      [[ -f "$f" ]] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
    done
  fi
  if [[ "${KEEP:-0}" == 1 || $rc -ne 0 ]]; then say "kept $T"; else rm -rf "$T"; fi
  say "daemons stopped; $( ((rc == 0)) && echo passed || echo "FAILED (exit $rc)") in $(($(date +%s) - T0)) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# munged: its own key, socket, pid, log and seed files, as user munge
mkdir -p "$T/munge" "$T/log" "$T/state/ctld" "$T/state/d"
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chmod 755 "$T/munge"   # the socket directory must be searchable by all
chmod 400 "$T/munge/munge.key"
chown -R munge:munge "$T/munge"
MUNGE_SOCKET="$T/munge/munge.socket"
setpriv --reuid=munge --regid=munge --init-groups -- munged -F --key-file="$T/munge/munge.key" \
  --socket="$MUNGE_SOCKET" --pid-file="$T/munge/munged.pid" --log-file="$T/munge/munged.log" \
  --seed-file="$T/munge/munged.seed" 2>"$T/log/munged.out" &
PIDS+=($!)
for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.1; done
[[ -S "$MUNGE_SOCKET" ]] || fail "munged did not start: $(tail -n 3 "$T/log/munged.out")"

read -r CTLD_PORT SLURMD_PORT < <("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
HOST=$(hostname -s)
NODE_CPUS=$(nproc)
NODE_MEM=6000   # MB offered to jobs (the machine has more; jobs ask for less)
export SLURM_CONF="$T/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=b2txttest
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$T/state/ctld
SlurmdSpoolDir=$T/state/d
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$T/log/jobcomp.log
GresTypes=gpu
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM Gres=gpu:2 State=UNKNOWN
PartitionName=b2txt_cpu Nodes=$HOST Default=YES MaxTime=60 State=UP
PartitionName=b2txt_train Nodes=$HOST MaxTime=60 State=UP
EOF
# two "GPUs" that are not: Slurm schedules them (and sets CUDA_VISIBLE_DEVICES); nothing opens them
printf 'NodeName=%s Name=gpu File=/dev/null\nNodeName=%s Name=gpu File=/dev/zero\n' "$HOST" "$HOST" > "$T/gres.conf"

# snakemake-executor-plugin-slurm-jobstep 0.6.1 drops every SLURM_* variable but the job's identity
# before its srun inside the job, SLURM_CONF included: on a cluster whose slurm.conf is not at the
# default path srun then finds no configuration. Real clusters use /etc/slurm (or configless
# slurmd); this private one gives the jobs an srun that knows where its configuration is.
mkdir -p "$T/bin"
printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$SLURM_CONF" "$(command -v srun)" > "$T/bin/srun"
chmod 755 "$T/bin/srun"
export PATH="$T/bin:$PATH"

slurmctld -D -i -f "$SLURM_CONF" >"$T/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" >"$T/log/slurmd.out" 2>&1 &
PIDS+=($!)
# Slurm commands get a `timeout`: with no controller they retry for minutes, and bash runs the
# cleanup trap only when the command in the foreground returns.
node_state() { timeout 5 sinfo -h -N -o %T 2>/dev/null | sort -u; }
for _ in $(seq 60); do
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || fail "a daemon exited at start: $(tail -n 3 "$T"/log/*.out)"; done
  [[ "$(node_state)" == idle ]] && break
  sleep 0.5
done
[[ "$(node_state)" == idle ]] || fail "the node did not come up: $(timeout 5 sinfo -N 2>&1)"
say "cluster up in $T (slurmctld :$CTLD_PORT, slurmd :$SLURMD_PORT): $(timeout 5 sinfo -h -o '%P %D %c %m %G' | tr '\n' ';')"

# --- 3. the tiny pipeline: through the Slurm profile and locally --------------------------------
# The same config files in both copies: tiny values (as tests/test_pipeline.py) + resources for this node.
OVERLAY="$T/resources.yaml"
cat > "$OVERLAY" <<'EOF'
resources:
  default: {cpus: 1, mem_mb: 500, runtime: 10}
  train: {cpus: 2, mem_mb: 1500, runtime: 20, partition: b2txt_train}
  calibrate: {cpus: 1, mem_mb: 1000, runtime: 11}
  infer: {cpus: 1, mem_mb: 1000, runtime: 12}
  lm: {cpus: 1, mem_mb: 1000, runtime: 13}
  decode: {cpus: 1, mem_mb: 1500, runtime: 14}
  figures: {cpus: 1, mem_mb: 800, runtime: 15}
EOF
make_copy() {
  "$PYTHON" - "$1" "$OVERLAY" <<'EOF'
import sys
from pathlib import Path

import yaml

sys.path.insert(0, "tests")
from helpers.project import make_project  # the tiny project of the end-to-end tests

from b2txt.ground.config import merge, read_yaml

dest, overlay = Path(sys.argv[1]), read_yaml(sys.argv[2])
dest.mkdir(parents=True)
make_project(dest)
base = dest / "config" / "config.yaml"
base.write_text(yaml.safe_dump(merge(read_yaml(base), overlay)))
EOF
  cp -r profiles "$1/profiles"
}
make_copy "$T/slurm"
make_copy "$T/local"

say "local run (snakemake --cores 2) in the background"
start_in "$T/local" "$T/log/local.out" 900 snakemake --cores 2
LOCAL=$LAST

# the profile as documented, plus what this accounting-less test cluster needs
SLURM_ARGS=(--profile profiles/slurm --slurm-no-account --slurm-status-command squeue
            --slurm-init-seconds-before-status-checks 1 --default-resources slurm_partition=b2txt_cpu
            --latency-wait 5)
say "slurm run: snakemake ${SLURM_ARGS[*]}"
t=$(date +%s)
run_in "$T/slurm" "$T/log/slurm.out" 900 snakemake "${SLURM_ARGS[@]}" \
  || { tail -n 60 "$T/log/slurm.out" >&2; fail "snakemake --profile profiles/slurm failed (log: $T/log/slurm.out)"; }
say "slurm run done in $(($(date +%s) - t)) s"
wait $LOCAL || { tail -n 60 "$T/log/local.out" >&2; fail "the local run failed"; }
say "local run done"

"$PYTHON" - "$T" <<'EOF'
"""Every job ran on Slurm with the config's resources; the results equal the local run's."""
import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml

T = Path(sys.argv[1])
RUN = "results/tiny"
slurm, local = T / "slurm" / RUN, T / "local" / RUN
problems = []

# Slurm job id -> rule, from Snakemake's submission lines
out = (T / "log/slurm.out").read_text()
jobs = {m[0]: m[1] for m in re.findall(r"SLURM jobid (\d+) \(log: \S*/rule_([A-Za-z0-9_]+)/", out)}
comp = {}
for line in (T / "log/jobcomp.log").read_text().splitlines():
    fields = dict(re.findall(r"(\w+)=(\S*)", line))
    comp[fields["JobId"]] = fields
family = {"train": "train", "calibrate": "calibrate", "infer": "infer", "lm_ngram": "lm", "lm_graph": "lm",
          "decode": "decode", "evaluate": "decode", "figures": "figures"}
want = {"corpus", "data", "validate", "preprocess", "train", "infer", "score", "calibrate", "lm_text",
        "lm_ngram", "lm_graph", "decode", "score_words", "evaluate", "figures"}
if set(jobs.values()) != want:
    problems.append(f"rules run as Slurm jobs: {sorted(set(jobs.values()))}, expected {sorted(want)}")
resources = yaml.safe_load((T / "resources.yaml").read_text())["resources"]
for jobid, rule in sorted(jobs.items(), key=lambda kv: int(kv[0])):
    c = comp.get(jobid)
    if c is None:
        problems.append(f"Slurm job {jobid} ({rule}) is not in the job-completion log")
        continue
    r = resources[family.get(rule, "default")]
    tres = dict(kv.split("=") for kv in c["Tres"].split(","))
    got = (c["JobState"], c["Partition"], int(c["ProcCnt"]), tres.get("mem"), c["TimeLimit"])
    expected = ("COMPLETED", r.get("partition", "b2txt_cpu"), r["cpus"], f"{r['mem_mb']}M",
                str(r["runtime"]))  # minutes
    if got != expected:
        problems.append(f"job {jobid} ({rule}): state, partition, cpus, mem, time {got}, expected {expected}")
print(f"{len(jobs)} Slurm jobs: " + ", ".join(f"{j}={r}" for j, r in sorted(jobs.items(), key=lambda kv: int(kv[0]))))

same_files = ["manifest.csv", "validation.txt",
              "scores/val/metrics.json", "scores/val/per_session.csv", "scores/val/per_corpus.csv",
              "scores/val/trials.csv", "scores/val/wer.json", "scores/val/wer_per_session.csv",
              "scores/val/wer_per_corpus.csv", "scores/val/wer_trials.csv", "calibration/calibration.csv",
              "lm/text.txt", "lm/2gram/lm.arpa", "decode/val/decoded.csv", "decode/val/nbest.jsonl",
              "evaluate/val/decoded.csv", "evaluate/val/nbest.jsonl", "evaluate/val/per_session.csv",
              "evaluate/val/wer_per_session.csv", "evaluate/test/decoded.csv", "evaluate/test/submission.csv"]
for rel in same_files:
    a, b = slurm / rel, local / rel
    if not (a.is_file() and b.is_file()):
        problems.append(f"{rel}: missing ({'slurm' if not a.is_file() else 'local'} run)")
    elif a.read_bytes() != b.read_bytes():
        problems.append(f"{rel}: differs between the Slurm and the local run")
# training curve without its wall-clock column; logits bit for bit
ma, mb = (pd.read_csv(d / "model/metrics.csv").drop(columns="seconds") for d in (slurm, local))
if not ma.equals(mb):
    problems.append(f"model/metrics.csv (losses, PER) differs:\n{ma}\n{mb}")
for split in ("val", "test"):
    with h5py.File(slurm / f"logits/{split}.hdf5") as fa, h5py.File(local / f"logits/{split}.hdf5") as fb:
        if sorted(fa) != sorted(fb) or any(not np.array_equal(fa[k]["logits"][()], fb[k]["logits"][()]) for k in fa):
            problems.append(f"logits/{split}.hdf5: logits differ")
for name in ("training_curve", "per_session_per", "figure2"):
    if not (slurm / f"figures/{name}.png").is_file():
        problems.append(f"figures/{name}.png missing")
per = json.loads((slurm / "scores/val/metrics.json").read_text())
wer = json.loads((slurm / "evaluate/val/wer.json").read_text())
print(f"equal results: {len(same_files)} files + training curve + logits; val PER {per['PER']:.3f}, "
      f"WER via Redis {wer['WER']:.3f}")
if problems:
    print("\n".join(["PROBLEMS:"] + problems))
    sys.exit(1)
EOF
say "Slurm and local results are equal; every job asked for its config resources"

# --- 4. a failing rule: snakemake fails and names it ---------------------------------------------
say "a failing rule (score on a corrupted logits file) must fail the run and be named"
echo "not an HDF5 file" > "$T/slurm/results/tiny/logits/val.hdf5"
set +e
run_in "$T/slurm" "$T/log/fail.out" 300 snakemake "${SLURM_ARGS[@]}" results/tiny/scores/val/metrics.json
rc=$?
set -e
((rc != 0 && rc != 124)) || fail "snakemake exited $rc with a failing rule (log: $T/log/fail.out)"
grep -q "Error in rule score" "$T/log/fail.out" || fail "the failing rule is not named (log: $T/log/fail.out)"
grep -q "SLURM" "$T/log/fail.out" || fail "the failure was not reported from a Slurm job (log: $T/log/fail.out)"
say "snakemake exited $rc: $(grep -m1 "Error in rule" "$T/log/fail.out")"

# --- 5. N GPUs: --gpus=N for the job, `b2txt train --nproc N` in it ------------------------------
say "resources.train.gpus: 2 -> one Slurm job with two GPUs running b2txt train --nproc 2"
run_in "$T/slurm" "$T/log/gpus.out" 600 snakemake "${SLURM_ARGS[@]}" --config 'resources={train: {gpus: 2}}' \
  --forcerun train --until train \
  || { tail -n 60 "$T/log/gpus.out" >&2; fail "training with resources.train.gpus: 2 failed"; }
grep -q -- "--nproc 2" "$T/log/gpus.out" || fail "the train command has no --nproc 2 (log: $T/log/gpus.out)"
jobid=$(grep -oE "SLURM jobid [0-9]+ \(log: \S*/rule_train/" "$T/log/gpus.out" | grep -oE "[0-9]+" | head -n1)
[[ -n "$jobid" ]] || fail "train was not submitted to Slurm"
job=$(timeout 5 scontrol show job "$jobid")   # kept by slurmctld for MinJobAge after the end
grep -qE "TresPerJob=gres[:/]gpu:2" <<<"$job" || fail "Slurm job $jobid did not ask for 2 GPUs: $job"
grep -q "JobState=COMPLETED" <<<"$job" || fail "Slurm job $jobid did not complete: $job"
say "train: Slurm job $jobid with $(grep -oE "TresPerJob=\S+" <<<"$job"), b2txt train --nproc 2, completed"

# --- 5b. the same training as 2 srun tasks: ranks from SLURM_PROCID / SLURM_STEP_NUM_TASKS -------
say "srun --ntasks 2 b2txt train: the srun step's two tasks form the process group"
run_in "$T/slurm" "$T/log/srun.out" 600 srun --ntasks 2 --cpus-per-task 1 --mem 3000 -t 10 \
  b2txt train --config config/config.yaml --config config/model/baseline.yaml --data data/simulated-tiny \
  --manifest results/tiny/manifest.csv --out "$T/srun-model" --threads 1 \
  || { tail -n 40 "$T/log/srun.out" >&2; fail "srun --ntasks 2 b2txt train failed"; }
grep -q "2 processes of" "$T/log/srun.out" || fail "srun's tasks did not train as one group of 2 (log: $T/log/srun.out)"
"$PYTHON" - "$T/slurm/results/tiny/model" "$T/srun-model" <<'PY' || fail "srun and --nproc 2 trained different models"
import sys, torch
from b2txt.models.checkpoint import safe_load
a, b = (safe_load(f"{d}/checkpoint/best_checkpoint")["model_state_dict"] for d in sys.argv[1:])
assert a.keys() == b.keys()
for k in a:
    torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
PY
say "srun: 2 tasks trained the model --nproc 2 trained"

# --- 6. a service() rule and its consumer: one Slurm group job ---------------------------------
say "a service() rule (redis-server) and its consumer under the Slurm profile"
mkdir -p "$T/service/profiles"
cp -r profiles/slurm "$T/service/profiles/"
cat > "$T/service/Snakefile" <<'EOF'
# Snakemake puts a service and its consumers into one group job: one sbatch, one node.
rule all:
    input:
        "pong.txt",


rule redis:
    output:
        service("redis.sock"),
    threads: 0
    resources:
        mem_mb=200,
        runtime=5,
    shell:
        "exec redis-server --port 0 --unixsocket {output} --save '' --appendonly no"


rule ping:
    input:
        "redis.sock",
    output:
        "pong.txt",
    resources:
        mem_mb=200,
        runtime=5,
    shell:
        "for i in $(seq 100); do [ -S {input} ] && break; sleep 0.1; done; redis-cli -s {input} ping > {output}"
EOF
run_in "$T/service" "$T/log/service.out" 300 snakemake "${SLURM_ARGS[@]}" \
  || { tail -n 40 "$T/log/service.out" >&2; fail "service + consumer under Slurm failed"; }
[[ "$(cat "$T/service/pong.txt")" == PONG ]] || fail "the consumer did not reach the service"
n=$(grep -c "has been submitted with SLURM jobid" "$T/log/service.out" || true)
((n == 1)) || fail "service and consumer were $n Slurm jobs, expected one group job (log: $T/log/service.out)"
say "service + consumer: one Slurm job, PONG"
