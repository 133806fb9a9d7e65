"""``evaluate`` through a private redis-server and LM server (real processes, a small TLG graph).

The fault test kills the LM server and then redis-server in the middle of a 240-trial run and
checks that every trial still has exactly one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import redis
from helpers.arpa import template_sentences
from helpers.processes import wait_for
from helpers.synthetic import synthetic_logits_file

pytestmark = pytest.mark.redis

SENTENCES = template_sentences(300)


def run_evaluate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "b2txt", "evaluate", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "B2TXT_PROGRESS": "0"})


def check_one_sentence_per_trial(out: Path, n: int) -> pd.DataFrame:
    table = pd.read_csv(out / "decoded.csv", keep_default_na=False)
    assert list(table["trial"]) == list(range(n))
    nbest = [json.loads(line) for line in (out / "nbest.jsonl").read_text().splitlines()]
    assert [row["trial"] for row in nbest] == list(range(n))
    submission = pd.read_csv(out / "submission.csv", keep_default_na=False)
    assert list(submission["id"]) == list(range(n))
    return table


def test_evaluate_scores_every_trial(template_lm, lexicon, tmp_path):
    logits = synthetic_logits_file(tmp_path / "val.h5", lexicon, 40)
    out = tmp_path / "out"
    done = run_evaluate("--logits", str(logits), "--lm", str(template_lm), "--out", str(out), "--workers", "2")
    assert done.returncode == 0, done.stderr
    table = check_one_sentence_per_trial(out, 40)
    assert (table["decoded"] == table["reference"]).mean() > 0.9
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["n_trials"] == 40 and summary["WER"] < 0.05 and summary["PER"] is not None
    assert summary["sessions"] == 4 and summary["restarts"] == {"redis-server": 0, "lm-server": 0}
    wer = json.loads((out / "wer.json").read_text())
    assert set(wer["per_session"]) == {"t15.2023.08.11", "t15.2023.08.12", "t15.2023.08.13"}
    assert (out / "wer_per_session.csv").is_file() and (out / "per_session.csv").is_file()
    assert (out / "lm-server.log").is_file()


def test_the_three_decoding_runtimes_write_the_same_decoded_csv(template_lm, lexicon, tmp_path):
    """One decoding core in every runtime: `b2txt decode` (a process pool), `evaluate` through the LM
    server, and `evaluate` through consumer-group lm-workers write byte-identical decoded.csv files,
    noisy trials (where the n-best and its augmentation matter) included."""
    logits = synthetic_logits_file(tmp_path / "val.h5", lexicon, 30, noisy_every=3)
    outs = {name: tmp_path / name for name in ("pool", "server", "workers")}
    done = subprocess.run([sys.executable, "-m", "b2txt", "decode", "--logits", str(logits), "--lm", str(template_lm),
                           "--out", str(outs["pool"]), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name, extra in (("server", ["--workers", "2"]), ("workers", ["--group-workers", "2"])):
        done = run_evaluate("--logits", str(logits), "--lm", str(template_lm), "--out", str(outs[name]), *extra)
        assert done.returncode == 0, done.stderr
    pool, server, workers = ((outs[n] / "decoded.csv").read_bytes() for n in ("pool", "server", "workers"))
    assert pool == server == workers
    table = pd.read_csv(outs["pool"] / "decoded.csv", keep_default_na=False)
    assert 0 < (table["decoded"] != table["reference"]).sum() < len(table)  # the noisy trials differ


def test_published_single_client_protocol_and_chunks_give_the_same_sentences(template_lm, lexicon, tmp_path):
    logits = synthetic_logits_file(tmp_path / "test.h5", lexicon, 12, split="test")
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    for out, extra in ((whole, []), (chunked, ["--chunk-frames", "7"])):
        done = run_evaluate("--logits", str(logits), "--lm", str(template_lm), "--out", str(out), "--workers", "1",
                            "--sessions", "0", *extra)
        assert done.returncode == 0, done.stderr
    a = check_one_sentence_per_trial(whole, 12)
    b = check_one_sentence_per_trial(chunked, 12)
    assert list(a["decoded"]) == list(b["decoded"])


def test_bad_language_model_directory_fails_with_one_message(tmp_path, lexicon):
    logits = synthetic_logits_file(tmp_path / "val.h5", lexicon, 2)
    empty = tmp_path / "no_graph"
    empty.mkdir()
    done = run_evaluate("--logits", str(logits), "--lm", str(empty), "--out", str(tmp_path / "out"),
                        "--workers", "1", "--startup-timeout", "60", timeout=120)
    assert done.returncode == 2
    assert "TLG.fst" in done.stderr and "Traceback" not in done.stderr.split("lm-server failed")[0]
    assert not (tmp_path / "out").exists()


def _xadd_calls(sock: Path) -> int:
    try:
        stats = redis.Redis(unix_socket_path=str(sock), socket_timeout=5).info("commandstats")
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return 0
    return int(stats.get("cmdstat_xadd", {}).get("calls", 0))


def test_no_trial_lost_or_duplicated_when_lm_server_and_redis_are_killed(template_lm, lexicon, tmp_path):
    n = 240
    logits = synthetic_logits_file(tmp_path / "val.h5", lexicon, n, seed=7)
    run_dir = Path(tempfile.mkdtemp(prefix="b2e-"))
    out = tmp_path / "out"
    sock = run_dir / "redis.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "b2txt", "evaluate", "--logits", str(logits), "--lm", str(template_lm),
         "--out", str(out), "--workers", "2", "--run-dir", str(run_dir), "--timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "B2TXT_PROGRESS": "0"})
    try:
        per_trial = 7  # XADDs per trial: reset, logits, finalize + 4 replies
        wait_for(lambda: _xadd_calls(sock) > 50 * per_trial, "50 trials sent", 120, proc)
        lm_pid = int((run_dir / "lm-server.pid").read_text())
        os.kill(lm_pid, signal.SIGKILL)
        wait_for(lambda: int((run_dir / "lm-server.pid").read_text()) != lm_pid, "a new lm-server", 120, proc)
        wait_for(lambda: _xadd_calls(sock) > 150 * per_trial, "150 trials sent", 120, proc)  # counts again from the restarted server
        os.kill(int((run_dir / "redis-server.pid").read_text()), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
    table = check_one_sentence_per_trial(out, n)
    assert (table["decoded"] != "").all()
    assert (table["decoded"] == table["reference"]).mean() > 0.9
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["restarts"] == {"redis-server": 1, "lm-server": 1}
    assert summary["resent_trials"] >= 1
