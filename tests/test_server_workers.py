"""LM workers sharing whole trials through a Redis consumer group (``b2txt lm-worker``,
``b2txt evaluate --group-workers/--external-workers``): real redis-server, real decoders on a
small TLG graph, real processes killed and stopped with signals; TLS with certificates made here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from helpers.arpa import template_sentences
from helpers.processes import free_port, wait_for
from helpers.synthetic import synthetic_logits, synthetic_logits_file

from b2txt.ground.config import DecodeConfig
from b2txt.ground.phonemes import Lexicon
from b2txt.server import trial_queue as G
from b2txt.server.evaluate_group import GroupCollector
from b2txt.server.redis_process import RedisServer

pytestmark = pytest.mark.redis

SENTENCES = template_sentences(300)
#: Small search settings: fast trials (tens of ms) that still give 5-best lists.
DECODE = ["--nbest", "5", "--beam", "10", "--lattice_beam", "4"]
STREAM = "b2txt:batch:trials"
ENV = {**os.environ, "B2TXT_PROGRESS": "0"}


def make_logits_file(path: Path, lexicon: Lexicon, n: int, seed: int = 3, noisy_every: int = 4) -> Path:
    """``n`` labelled val trials; every 4th is noisy (by default), so some decode wrong and the WER is not 0."""
    return synthetic_logits_file(path, lexicon, n, seed=seed, noisy_every=noisy_every)


def evaluate_cmd(logits: Path, template_lm: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "b2txt", "evaluate", "--logits", str(logits), "--lm", str(template_lm),
            "--out", str(out), *DECODE, *args]


def start_worker(template_lm: Path, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "b2txt", "lm-worker", "--lm", str(template_lm), *DECODE, "--log-level", "info",
           *args]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env or ENV)


def run_worker(template_lm: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "b2txt", "lm-worker", "--lm", str(template_lm), *args],
                          capture_output=True, text=True, timeout=120, env=env or ENV)


def consumer_name(proc: subprocess.Popen) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def pending_of(r: redis.Redis, consumer: str) -> list[bytes]:
    return [p["message_id"] for p in r.xpending_range(STREAM, G.GROUP, min="-", max="+", count=100,
                                                      consumername=consumer)]


def stop_holding_a_trial(r: redis.Redis, proc: subprocess.Popen) -> bytes:
    """SIGSTOP the worker at a moment it holds an unanswered trial; return that entry's id.

    After the stop, 50 ms let Redis execute anything the worker had already sent, so "pending"
    is its final state, not a race with an acknowledgement in flight.
    """
    for _ in range(300):
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)
        held = pending_of(r, consumer_name(proc))
        if held:
            return held[0]
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("the worker never held a trial")


def trial_of(r: redis.Redis, entry_id: bytes) -> int:
    return int(r.xrange(STREAM, entry_id, entry_id)[0][1][b"trial"])


def owner_of(r: redis.Redis, entry_id: bytes) -> str | None:
    rows = r.xpending_range(STREAM, G.GROUP, min=entry_id, max=entry_id, count=1)
    return rows[0]["consumer"].decode() if rows else None


def read_outputs(out: Path, n: int) -> tuple[pd.DataFrame, dict, dict]:
    table = pd.read_csv(out / "decoded.csv", keep_default_na=False)
    assert list(table["trial"]) == list(range(n))  # every trial exactly once
    nbest = [json.loads(line) for line in (out / "nbest.jsonl").read_text().splitlines()]
    assert [row["trial"] for row in nbest] == list(range(n))
    return table, json.loads((out / "evaluation.json").read_text()), json.loads((out / "wer.json").read_text())


# ----------------------------------------------------------------------------- whatever dies

def test_three_workers_one_killed_one_stalled_every_trial_once_and_same_wer(template_lm, lexicon, tmp_path, run_dir):
    n = 200
    logits = make_logits_file(tmp_path / "val.h5", lexicon, n)

    # the reference: the session mode (lm-server), then one local worker in the consumer-group mode
    session_out, one_out = tmp_path / "session", tmp_path / "one"
    done = subprocess.run(evaluate_cmd(logits, template_lm, session_out, "--workers", "2"), capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(evaluate_cmd(logits, template_lm, one_out, "--group-workers", "1"), capture_output=True,
                          text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    one, one_summary, one_wer = read_outputs(one_out, n)
    assert (session_out / "decoded.csv").read_bytes() == (one_out / "decoded.csv").read_bytes()
    assert (session_out / "nbest.jsonl").read_bytes() == (one_out / "nbest.jsonl").read_bytes()
    assert 0 < one_wer["WER"] < 0.5 and one_summary["mode"] == "consumer-group"
    assert one_summary["consumers"] and sum(one_summary["consumers"].values()) == n

    # three workers of our own on a Redis TCP port, waiting before the evaluator puts trials on the
    # queue; one is SIGKILLed while it holds a trial, one stalled (SIGSTOP) past the claim time
    port = free_port()
    rs = RedisServer(run_dir, port=port)
    rs.start()
    out = tmp_path / "three"
    logs = [run_dir / f"w{k}.log" for k in range(3)]
    workers = [start_worker(template_lm, logs[k], "--redis-port", str(port), "--claim-idle-ms", "800") for k in range(3)]
    proc = None
    try:
        r = redis.Redis(port=port, socket_timeout=10)

        def registered() -> bool:
            try:
                names = {c["name"].decode() for c in r.xinfo_consumers(STREAM, G.GROUP)}
            except redis.ResponseError:  # no group yet
                return False
            assert all(w.poll() is None for w in workers), [log.read_text() for log in logs]
            return {consumer_name(w) for w in workers} <= names

        wait_for(registered, "three workers waiting for trials")
        proc = subprocess.Popen(evaluate_cmd(logits, template_lm, out, "--external-workers", "--server",
                                             f"127.0.0.1:{port}"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

        def answered() -> bool:
            info = r.xinfo_groups(STREAM)[0]
            return int(info["entries-read"] or 0) - int(info["pending"]) >= 20

        wait_for(answered, "20 answered trials", proc=proc)
        victim, stalled, healthy = workers
        killed_entry = stop_holding_a_trial(r, victim)
        killed_trial = trial_of(r, killed_entry)
        victim.kill()
        victim.wait()
        stalled_entry = stop_holding_a_trial(r, stalled)
        # the healthy worker claims both entries once they have been idle for 800 ms
        wait_for(lambda: owner_of(r, stalled_entry) != consumer_name(stalled), "the stalled trial to be claimed",
                 proc=proc)
        stalled.send_signal(signal.SIGCONT)  # it finishes its (claimed) trial late
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        for w in (stalled, healthy):  # SIGTERM: a clean exit, leaving the group
            w.terminate()
            assert w.wait(timeout=30) == 0, logs[workers.index(w)].read_text()[-2000:]
        assert [c["name"].decode() for c in r.xinfo_consumers(STREAM, G.GROUP)] == [consumer_name(victim)]
        assert r.xlen(STREAM) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGCONT)
                w.kill()
                w.wait()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        rs.stop()

    table, summary, wer = read_outputs(out, n)
    assert list(table["decoded"]) == list(one["decoded"])
    assert wer["WER"] == one_wer["WER"]
    # the killed worker's trial was surely answered after a claim; the stalled one's maybe not (if the stalled
    # worker, resumed, finished it before the worker that claimed it, its own result is the one kept)
    assert summary["duplicate_results"] == 0 and summary["claimed_trials"] >= 1
    assert sum(summary["consumers"].values()) == n
    timing = pd.read_csv(out / "timing.csv")
    assert timing.loc[timing["trial"] == killed_trial, "attempts"].item() >= 2  # answered after a claim
    # the late finisher (stalled or healthy, whichever came second) dropped its result
    assert any("already answered by another worker" in log.read_text() for log in logs[1:])
    assert "claimed trial" in logs[2].read_text()


def test_redis_killed_mid_run_the_unanswered_trials_are_sent_again(template_lm, lexicon, tmp_path, run_dir):
    n = 300
    logits = make_logits_file(tmp_path / "val.h5", lexicon, n, noisy_every=0)
    out = tmp_path / "out"
    proc = subprocess.Popen(evaluate_cmd(logits, template_lm, out, "--group-workers", "2", "--run-dir", str(run_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        r = redis.Redis(unix_socket_path=str(run_dir / "redis.sock"), socket_timeout=10)

        def answered() -> bool:
            try:
                info = r.xinfo_groups(STREAM)[0]
            except (redis.ConnectionError, redis.ResponseError, IndexError):
                return False
            return int(info["entries-read"] or 0) - int(info["pending"]) >= 40

        wait_for(answered, "40 answered trials", proc=proc)
        os.kill(int((run_dir / "redis-server.pid").read_text()), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    table, summary, _ = read_outputs(out, n)
    assert (table["decoded"] == table["reference"]).all()
    assert summary["restarts"] == {"redis-server": 1, "lm-worker": 0}
    assert 0 < summary["resent_after_redis_loss"] <= n - 40 and summary["duplicate_results"] == 0
    assert "Redis lost its data" in stderr and "Traceback" not in stderr


def test_the_collector_keeps_the_first_result_of_each_trial(run_dir):
    """A worker that answers twice (as after a Redis restart and a re-send): one result per trial."""
    rs = RedisServer(run_dir)
    rs.start()
    try:
        address = rs.address
        trials = {i: np.full((3 + i, 41), float(i), np.float32) for i in range(6)}
        collector = GroupCollector(address, "t:q", G.options_json(DecodeConfig(), 0.5, False), log=lambda m: None,
                                     stall_timeout=30)
        seen: dict[int, np.ndarray] = {}

        def double_answerer() -> None:
            r = redis.Redis(unix_socket_path=str(rs.socket))
            wait_for(lambda: r.exists("t:q:trials"), "the queue")
            while len(seen) < len(trials):
                for _s, items in r.xreadgroup(G.GROUP, "twice", {"t:q:trials": ">"}, count=10, block=200) or []:
                    for entry_id, f in items:
                        i = int(f[b"trial"])
                        seen[i] = np.frombuffer(f[b"logits"], "<f4").reshape(-1, 41)
                        pipe = r.pipeline(transaction=True)  # both answers at once: the collector sees both
                        for answer in ("first", "second"):
                            pipe.xadd(f[b"reply_to"], {"job": f[b"job"], "trial": i, "sentence": f"{answer} {i}",
                                                       "scoring": f"{answer} {i};1;2;0;3", "worker": "twice"})
                        pipe.xadd(f[b"reply_to"], {"job": "another-job", "trial": i, "sentence": "not mine"})
                        pipe.xack("t:q:trials", G.GROUP, entry_id)
                        pipe.execute()

        t = threading.Thread(target=double_answerer, daemon=True)
        t.start()
        results = collector.run(trials, startup_timeout=30)
        t.join(timeout=10)
        assert {i: r.sentence for i, r in results.items()} == {i: f"first {i}" for i in trials}
        assert collector.duplicates == len(trials)
        assert all(np.array_equal(seen[i], trials[i]) for i in trials)  # logits arrive bit-exact
        r = redis.Redis(unix_socket_path=str(rs.socket))
        assert not r.exists(collector.key) and not r.exists(collector.reply_to)  # the job cleans up
    finally:
        rs.stop()


def test_a_trial_whose_workers_all_died_is_failed_after_max_deliveries(template_lm, run_dir, lexicon):
    rs = RedisServer(run_dir)
    rs.start()
    try:
        r = redis.Redis(unix_socket_path=str(rs.socket))
        G.ensure_group(r, "t:q")
        r.set("t:q:job:j1", "1")
        x = synthetic_logits(SENTENCES[0], lexicon, np.random.default_rng(0))
        options = G.options_json(DecodeConfig(nbest=5), 0.5, False)
        for trial in (0, 1):
            r.xadd("t:q:trials", {"job": "j1", "trial": trial, "logits": x.tobytes(), "options": options,
                                  "reply_to": "t:q:results:j1"})
        r.xreadgroup(G.GROUP, "ghost", {"t:q:trials": ">"}, count=1)  # trial 0 taken by a worker that died
        worker = start_worker(template_lm, run_dir / "w.log", "--redis-socket", str(rs.socket), "--queue", "t:q",
                              "--claim-idle-ms", "100", "--max-deliveries", "1")
        try:
            got = wait_for(lambda: r.xlen("t:q:results:j1") >= 2 and r.xrange("t:q:results:j1"), "two results")
            worker.terminate()
            assert worker.wait(timeout=30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
        by_trial = {int(f[b"trial"]): f for _, f in got}
        assert b"handed to workers 2 times" in by_trial[0][b"error"]
        assert by_trial[1][b"sentence"].decode() == SENTENCES[0] and by_trial[1][b"deliveries"] == b"1"
        assert r.xlen("t:q:trials") == 0 and not r.xpending("t:q:trials", G.GROUP)["pending"]
        consumers = r.xinfo_consumers("t:q:trials", G.GROUP)
        assert [(c["name"], c["pending"]) for c in consumers] == [(b"ghost", 0)]  # the worker left the group
    finally:
        rs.stop()


# ----------------------------------------------------------------------------- across hosts: password, bind, TLS

def test_a_worker_that_cannot_authenticate_gets_one_clear_error(template_lm, run_dir, monkeypatch):
    monkeypatch.setenv("B2TXT_TEST_PW", "right one")
    port = free_port()
    rs = RedisServer(run_dir, port=port, password_env="B2TXT_TEST_PW")
    rs.start()
    try:
        for password in ("wrong one", None):
            env = {k: v for k, v in ENV.items() if k != "B2TXT_TEST_PW"}
            if password:
                env["B2TXT_TEST_PW"] = password
            done = run_worker(template_lm, "--redis-port", str(port), "--password-env", "B2TXT_TEST_PW", env=env)
            assert done.returncode == 2, done.stderr
            line = done.stderr.strip().splitlines()[-1]
            assert line.startswith("b2txt lm-worker: error: redis at 127.0.0.1:") and "authentication failed" in line
            assert f"B2TXT_TEST_PW, which is {'set' if password else 'not set'}" in line
            assert "Traceback" not in done.stderr and "loaded" not in done.stderr  # failed before loading the graph
    finally:
        rs.stop()


def test_a_network_address_needs_a_password(template_lm, lexicon, tmp_path, run_dir, monkeypatch):
    logits = make_logits_file(tmp_path / "val.h5", lexicon, 2)
    env = {k: v for k, v in ENV.items() if k != "B2TXT_REDIS_PASSWORD"}
    port = str(free_port())
    done = subprocess.run(evaluate_cmd(logits, template_lm, tmp_path / "out", "--external-workers", "--bind", "0.0.0.0",
                                       "--port", port), capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "--bind 0.0.0.0: not a loopback address, and B2TXT_REDIS_PASSWORD is not set" in done.stderr
    assert not (tmp_path / "out").exists()
    done = subprocess.run(evaluate_cmd(logits, template_lm, tmp_path / "out", "--bind", "127.0.0.1", "--port", port),
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "only in the consumer-group mode" in done.stderr
    done = run_worker(template_lm, "--redis-host", "192.0.2.7", "--redis-port", port, env=env)
    assert done.returncode == 2
    assert "redis host 192.0.2.7: not a loopback address, and B2TXT_REDIS_PASSWORD is not set" in done.stderr
    # with a password the same bind is accepted, and Redis there refuses anyone without it
    monkeypatch.setenv("B2TXT_TEST_PW", "s3cret")
    rs = RedisServer(run_dir, port=int(port), bind="0.0.0.0", password_env="B2TXT_TEST_PW")
    rs.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=int(port)).ping()
        assert redis.Redis(port=int(port), password="s3cret").ping()
    finally:
        rs.stop()


def _make_certificates(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed; another CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(cn: str, key, issuer: x509.Name, issuer_key, ca: bool = False, san=None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    files: dict[str, Path] = {}

    def save(label: str, c: x509.Certificate, key=None) -> None:
        files[label] = root / f"{label}.crt"
        files[label].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            files[f"{label}_key"] = root / f"{label}.key"
            files[f"{label}_key"].write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    keys = {label: ec.generate_private_key(ec.SECP256R1()) for label in ("ca", "other_ca", "server", "client")}
    ca = cert("b2txt test CA", keys["ca"], name("b2txt test CA"), keys["ca"], ca=True)
    save("ca", ca)
    save("other_ca", cert("another CA", keys["other_ca"], name("another CA"), keys["other_ca"], ca=True))
    save("server", cert("localhost", keys["server"], ca.subject, keys["ca"],
                        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         keys["server"])
    save("client", cert("lm-worker", keys["client"], ca.subject, keys["ca"]), keys["client"])
    return files


def test_tls_round_trip_with_client_certificates(template_lm, lexicon, tmp_path, run_dir):
    certs = _make_certificates(tmp_path)
    n = 12
    logits = make_logits_file(tmp_path / "val.h5", lexicon, n)
    env = {**ENV, "B2TXT_TEST_PW": "tls and a password"}
    port = str(free_port())
    out = tmp_path / "out"
    proc = subprocess.Popen(evaluate_cmd(logits, template_lm, out, "--external-workers", "--port", port,
                                         "--tls-cert", str(certs["server"]), "--tls-key", str(certs["server_key"]),
                                         "--tls-ca", str(certs["ca"]), "--password-env", "B2TXT_TEST_PW",
                                         "--run-dir", str(run_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    client = ["--redis-port", port, "--password-env", "B2TXT_TEST_PW", "--tls-cert", str(certs["client"]),
              "--tls-key", str(certs["client_key"])]
    worker = None
    try:
        wait_for(lambda: (run_dir / "redis.sock").exists(), "the evaluator's redis-server", proc=proc)
        # a worker that does not trust the server's CA, and one without a client certificate: refused
        done = run_worker(template_lm, *client, "--tls-ca", str(certs["other_ca"]), env=env)
        assert done.returncode == 2 and "TLS failed" in done.stderr and "certificate verify failed" in done.stderr
        assert "Traceback" not in done.stderr
        done = run_worker(template_lm, "--redis-port", port, "--password-env", "B2TXT_TEST_PW", "--tls-ca",
                          str(certs["ca"]), env=env)
        assert done.returncode == 2 and "TLS failed" in done.stderr, done.stderr
        worker = start_worker(template_lm, run_dir / "w.log", *client, "--tls-ca", str(certs["ca"]), env=env)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert f"127.0.0.1:{port} (TLS)" in stderr
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "(TLS)" in (run_dir / "w.log").read_text()
    table, summary, _ = read_outputs(out, n)
    assert (table["decoded"] == table["reference"]).mean() > 0.6
    assert list(summary["consumers"]) == [f"{socket.gethostname()}:{worker.pid}"]
