"""Batch decoding by LM workers on many hosts: whole trials shared through a Redis consumer group.

The published protocol (:mod:`b2txt.server.protocol`) streams one trial at a time to a decoder
that keeps the trial's state; it stays as it is. For batch evaluation, where every trial is
complete before it is sent, this module lets any number of ``b2txt lm-worker`` processes on
any hosts share the trials instead:

``QUEUE:trials`` (stream, consumer group ``lm-workers``)
    one entry per trial, written by the evaluator: ``job``, ``trial`` (index), ``logits``
    (float32 ``[T, 41]`` bytes, LM column order, as on ``remote_lm_input``), ``options``
    (JSON: the decoder options, ``alpha``, ``do_opt``) and ``reply_to``;
``QUEUE:results:JOB`` (stream, the ``reply_to``)
    one entry per answered trial: ``job``, ``trial``, ``sentence``, ``scoring`` (the published
    n-best format), ``worker``, ``seconds``, ``deliveries``; or ``error`` instead of a sentence;
``QUEUE:job:JOB`` (key, with an expiry the evaluator renews)
    the job is alive: workers drop trials of a job that is gone (a finished or dead evaluator).

A worker reads one entry at a time (``XREADGROUP … COUNT 1 BLOCK``), decodes it, and then, in
one Lua script (atomic): checks the entry is still pending, ``XADD``\\ s the result, ``XACK``\\ s
and ``XDEL``\\ s the entry. Before reading new entries it claims entries that have been pending
on some worker for ``claim_idle_ms`` (``XAUTOCLAIM``): those of a worker that died. Hence:

- a worker killed at any moment loses nothing: its entry stays pending and is claimed;
- a result is written at most once per entry: a slow worker whose entry was claimed by another
  finds it no longer pending (the other acknowledged it) and drops its result;
- the evaluator keeps the first result per trial anyway, and counts any duplicate;
- an entry handed out ``max_deliveries`` times (every worker that took it died) is answered
  with an error instead of killing workers forever.

The decoder options travel with each trial, so every worker decodes alike whatever its own
flags (those only choose the decoder it loads up front; another is built, and cached, on
demand: graphs are loaded once per process).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.console import progress
from ..ground.errors import B2txtError
from ..lm.nbest import DecodeInputError, Decoder, NBest, augment_nbest, parse_scoring, scoring_string
from . import protocol as P
from .connection import CONNECTION_ERRORS, RedisAddress, connect, connect_error_message
from .redis_process import RedisServer
from .supervisor import Supervisor

log = logging.getLogger("b2txt.worker")
Log = Callable[[str], None]

GROUP = "lm-workers"
DEFAULT_QUEUE = "b2txt:batch"

JOB_FIELD, TRIAL_FIELD, OPTIONS_FIELD, REPLY_TO_FIELD = "job", "trial", "options", "reply_to"
SENTENCE_FIELD, WORKER_FIELD, SECONDS_FIELD, DELIVERIES_FIELD = "sentence", "worker", "seconds", "deliveries"

#: How long a job stays alive without the evaluator renewing it.
JOB_TTL_S = 600
#: Write the result, acknowledge and delete the entry — only while the entry is still pending
#: (another worker may have claimed it, finished and acknowledged it first).
#: KEYS: trials stream, results stream. ARGV: group, entry id, result fields...
ACK_SCRIPT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


def check_queue_name(name: str) -> str:
    if not name or len(name) > 100 or any(c.isspace() for c in name):
        raise B2txtError(f"--queue {name!r}: use 1-100 characters without spaces")
    return name


def trials_stream(queue: str) -> str:
    return f"{queue}:trials"


def results_stream(queue: str, job: str) -> str:
    return f"{queue}:results:{job}"


def job_key(queue: str, job: str) -> str:
    return f"{queue}:job:{job}"


def default_consumer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_group(r: redis.Redis, queue: str) -> None:
    """Create the stream and its group (reading from the start), unless they exist."""
    try:
        r.xgroup_create(trials_stream(queue), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


def options_json(decode: DecodeConfig, alpha: float, do_opt: bool) -> str:
    return json.dumps({"decode": decode.model_dump(mode="json"), "alpha": alpha, "do_opt": do_opt}, sort_keys=True)


def parse_options(raw: object) -> P.SessionParams:
    try:
        data = json.loads(P.text(raw))
        return P.SessionParams(decode=DecodeConfig.model_validate(data["decode"]), alpha=float(data["alpha"]),
                               do_opt=bool(data["do_opt"]))
    except Exception as exc:  # noqa: BLE001 - JSON, KeyError, pydantic: all one bad field
        raise P.ProtocolError(f"{OPTIONS_FIELD}: not valid decoder options ({type(exc).__name__}: {exc})") from None


# ============================================================================ the worker

def open_connection(address: RedisAddress, queue: str, deadline: float, timeout: float = 10.5,
                    stop: Callable[[], bool] = lambda: False) -> redis.Redis:
    """A checked connection with the queue's group in place, retried while Redis is unreachable
    (until ``deadline``); a wrong password or a failed TLS handshake is fatal at once."""
    delay, warned = 0.1, False
    while True:
        try:
            r = connect(address, timeout=timeout)
            r.ping()
            ensure_group(r, queue)
            return r
        except (redis.RedisError, OSError) as exc:
            fatal = connect_error_message(address, exc)
            if fatal is not None:
                raise B2txtError(fatal) from None
            if not isinstance(exc, CONNECTION_ERRORS):
                raise B2txtError(f"redis at {address}: {exc}") from None
            if time.monotonic() > deadline or stop():
                hint = ("; the server closed the connection at once: does it expect TLS (--tls-ca)?"
                        if address.tls is None and "reset by peer" in str(exc) else "")
                raise B2txtError(f"cannot reach Redis at {address}: {exc}{hint}") from None
            if not warned:
                log.warning("cannot reach Redis at %s (%s); retrying", address, exc)
                warned = True
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


@dataclass(frozen=True)
class WorkerSettings:
    lm_dir: Path
    address: RedisAddress
    params: P.SessionParams = field(default_factory=P.SessionParams)
    llm: RescoreConfig | None = None
    queue: str = DEFAULT_QUEUE
    consumer: str = ""
    claim_idle_ms: int = 60_000
    max_deliveries: int = 5
    max_logits_bytes: int = 16 * 1024 * 1024
    block_ms: int = 500
    connect_timeout: float = 60.0
    idle_exit: float | None = None

    @property
    def socket_timeout(self) -> float:
        return self.block_ms / 1000 + 10.0


@dataclass
class Entry:
    entry_id: bytes
    fields: dict[str, Any]
    deliveries: int = 1


class GroupWorker:
    """Takes trials from the group one at a time until SIGTERM (or ``idle_exit`` seconds without work)."""

    def __init__(self, settings: WorkerSettings, decoder: Decoder, rescorer: Any | None = None):
        self.s = settings
        self.name = settings.consumer or default_consumer()
        self.decoders: OrderedDict[str, Decoder] = OrderedDict({self._key(decoder.options): decoder})
        self.rescorer = rescorer
        self.stream = trials_stream(settings.queue)
        self.results_prefix = f"{settings.queue}:results:"
        self.r: redis.Redis | None = None
        self.script: Any = None
        self.claim_cursor = "0-0"
        self.next_claim = 0.0  # monotonic time of the next XAUTOCLAIM while busy
        self.live_jobs: dict[str, float] = {}  # job -> until when it is known to be alive
        self.params: dict[str, P.SessionParams] = {}  # parsed options (every trial of a job has the same)
        self.stopping = False
        self.done = 0

    # ---- decoding
    @staticmethod
    def _key(options: DecodeConfig) -> str:
        return json.dumps(options.model_dump(exclude={"workers", "augment_top", "augment_penalty"}), sort_keys=True)

    def decoder_for(self, options: DecodeConfig) -> Decoder:
        """The decoder for these options: built on first use, at most 3 kept (graphs are shared anyway)."""
        key = self._key(options)
        if key not in self.decoders:
            from ..lm.core import make_decoder

            log.info("building a decoder for other options (%s)", options.model_dump(exclude_defaults=True))
            self.decoders[key] = make_decoder(options, self.s.lm_dir)
            while len(self.decoders) > 3:
                self.decoders.popitem(last=False)
        self.decoders.move_to_end(key)
        return self.decoders[key]

    def decode(self, fields: dict[str, Any]) -> NBest:
        raw = P.text(fields.get(OPTIONS_FIELD))
        params = self.params.get(raw)
        if params is None:
            params = parse_options(raw)
            if len(self.params) > 16:
                self.params.clear()
            self.params[raw] = params
        logits = P.decode_logits(fields.get(P.LOGITS_FIELD), self.s.max_logits_bytes)
        d = params.decode
        nbest = self.decoder_for(d).decode(logits)
        if d.nbest > 1 and d.augment_top > 1:
            nbest = augment_nbest(nbest, d.augment_top, d.augment_penalty)
        if params.do_opt and nbest.candidates:
            if self.rescorer is None or self.s.llm is None:
                raise P.ProtocolError("do_opt: this worker has no LLM loaded (start it with --do_opt or --llm)")
            cfg = self.s.llm.model_copy(update={"alpha": params.alpha})
            nbest = self.rescorer.rescore(nbest, d, cfg)
        return nbest

    # ---- Redis
    def connect(self, deadline: float) -> None:
        r = open_connection(self.s.address, self.s.queue, deadline, self.s.socket_timeout, lambda: self.stopping)
        r.xgroup_createconsumer(self.stream, GROUP, self.name)  # visible to the evaluator before its first trial
        self.r, self.script = r, r.register_script(ACK_SCRIPT)

    def reconnect(self, exc: BaseException) -> None:
        log.error("lost the Redis connection (%s); reconnecting", exc)
        if self.r is not None:
            self.r.close()
        self.r = None
        self.connect(time.monotonic() + self.s.connect_timeout)
        log.info("reconnected to Redis at %s", self.s.address)

    def next_entry(self) -> Entry | None:
        """A stale entry of another worker first, else a new one (blocking up to ``block_ms``).

        Stale entries are looked for after every empty read and, while busy, every half claim time
        (a round trip less per trial): an entry is claimed within 1.5 x ``claim_idle_ms``.
        """
        assert self.r is not None
        claimed = []
        if time.monotonic() >= self.next_claim:
            cursor, claimed, _deleted = self.r.xautoclaim(self.stream, GROUP, self.name, self.s.claim_idle_ms,
                                                         start_id=self.claim_cursor, count=1)
            self.claim_cursor = P.text(cursor)
            if not claimed and self.claim_cursor in ("0-0", "0"):  # scanned the whole pending list
                self.next_claim = time.monotonic() + self.s.claim_idle_ms / 2000
        for entry_id, raw in claimed:
            if raw is None:
                continue
            info = self.r.xpending_range(self.stream, GROUP, min=entry_id, max=entry_id, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else 2
            log.warning("claimed trial %s (entry %s, delivery %d): its worker stopped answering",
                        P.text(raw.get(b"trial")), P.text(entry_id), deliveries)
            return Entry(entry_id, P.fields_text(raw), deliveries)
        got = self.r.xreadgroup(GROUP, self.name, {self.stream: ">"}, count=1, block=self.s.block_ms)
        for _stream, items in got or []:
            for entry_id, raw in items:
                return Entry(entry_id, P.fields_text(raw), 1)
        self.next_claim = 0.0  # nothing new: look for stale entries at once
        return None

    def job_alive(self, job: str) -> bool:
        """The job's key exists (checked at most every 5 s per job: a round trip less per trial)."""
        now = time.monotonic()
        if self.live_jobs.get(job, 0.0) > now:
            return True
        assert self.r is not None
        if not self.r.exists(job_key(self.s.queue, job)):
            return False
        self.live_jobs = {j: t for j, t in self.live_jobs.items() if t > now}
        self.live_jobs[job] = now + 5.0
        return True

    def finish(self, entry: Entry, reply_to: str | None, result: dict[str, Any] | None) -> None:
        """Write ``result`` to ``reply_to`` + XACK + XDEL atomically (only the ack with no result)."""
        for attempt in range(2):
            try:
                if result is None or reply_to is None:
                    pipe = self.r.pipeline(transaction=True)  # type: ignore[union-attr]
                    pipe.xack(self.stream, GROUP, entry.entry_id)
                    pipe.xdel(self.stream, entry.entry_id)
                    pipe.execute()
                    return
                args: list[Any] = [GROUP, entry.entry_id]
                for k, v in result.items():
                    args += [k, v]
                if not self.script(keys=[self.stream, reply_to], args=args):
                    log.info("trial %s: already answered by another worker (it was claimed); result dropped",
                             result.get(TRIAL_FIELD))
                return
            except CONNECTION_ERRORS as exc:
                if attempt:
                    raise
                self.reconnect(exc)  # the script is atomic: it ran entirely or not at all
            except redis.ResponseError as exc:
                if is_nogroup(exc):  # Redis lost its data (restarted): the evaluator sends the trial again
                    log.warning("the trials stream is gone (Redis restarted?); result dropped")
                    return
                raise

    def process(self, entry: Entry) -> None:
        f = entry.fields
        job, trial, reply_to = P.text(f.get(JOB_FIELD)), P.text(f.get(TRIAL_FIELD)), P.text(f.get(REPLY_TO_FIELD))
        if not job or not reply_to.startswith(self.results_prefix):
            log.warning("entry %s: no job or a reply_to outside %s*; dropped", P.text(entry.entry_id),
                        self.results_prefix)
            self.finish(entry, None, None)
            return
        head = {JOB_FIELD: job, TRIAL_FIELD: trial, WORKER_FIELD: self.name, DELIVERIES_FIELD: entry.deliveries}
        if entry.deliveries > self.s.max_deliveries:
            message = (f"handed to workers {entry.deliveries} times (max_deliveries {self.s.max_deliveries}); "
                       "each worker that took it stopped answering")
            self.finish(entry, reply_to, {**head, P.ERROR_FIELD: message})
            return
        if not self.job_alive(job):
            log.info("trial %s of job %s: the job is gone (its evaluator finished or died); dropped", trial, job)
            self.finish(entry, None, None)
            return
        t0 = time.perf_counter()
        try:
            nbest = self.decode(f)
            result = {**head, SENTENCE_FIELD: nbest.best, P.SCORING_FIELD: scoring_string(nbest),
                      SECONDS_FIELD: f"{time.perf_counter() - t0:.6f}"}
        except (P.ProtocolError, DecodeInputError, B2txtError) as exc:
            log.warning("trial %s refused: %s", trial, exc)
            result = {**head, P.ERROR_FIELD: str(exc)}
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not take the worker down
            log.error("trial %s failed:\n%s", trial, traceback.format_exc())
            result = {**head, P.ERROR_FIELD: f"internal error: {type(exc).__name__}: {exc}"}
        self.finish(entry, reply_to, result)
        self.done += 1

    def on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("signal %d: finishing the trial under way, then exiting", signum)
        self.stopping = True

    def run(self) -> int:
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.connect(time.monotonic() + self.s.connect_timeout)
            log.info("worker %s taking trials from %s on %s", self.name, self.stream, self.s.address)
            idle_since = time.monotonic()
            while not self.stopping:
                try:
                    entry = self.next_entry()
                    if entry is not None:
                        self.process(entry)
                except CONNECTION_ERRORS as exc:
                    try:
                        self.reconnect(exc)
                    except B2txtError:
                        if self.stopping:  # SIGTERM while Redis is away: a clean stop
                            break
                        raise
                    continue
                except redis.ResponseError as exc:
                    if not is_nogroup(exc):
                        raise B2txtError(f"redis at {self.s.address}: {exc}") from None
                    ensure_group(self.r, self.s.queue)  # type: ignore[arg-type]
                    continue
                if entry is not None:
                    idle_since = time.monotonic()
                elif self.s.idle_exit is not None and time.monotonic() - idle_since > self.s.idle_exit:
                    log.info("no trial for %.0f s: exiting", self.s.idle_exit)
                    break
            self.leave()
            log.info("worker %s stopped after %d trial(s)", self.name, self.done)
            return 0
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            if self.r is not None:
                self.r.close()

    def leave(self) -> None:
        """Remove this consumer from the group when it holds nothing (never drop a pending entry)."""
        if self.r is None:
            return
        try:
            mine = [c for c in self.r.xinfo_consumers(self.stream, GROUP) if P.text(c["name"]) == self.name]
            if mine and int(mine[0]["pending"]) == 0:
                self.r.xgroup_delconsumer(self.stream, GROUP, self.name)
        except (redis.RedisError, OSError):
            pass


def run_worker(settings: WorkerSettings) -> int:
    """Check Redis (password, TLS), load the decoder (and the LLM, when asked for) once, then take
    trials until SIGTERM. A wrong password fails before a large graph is loaded."""
    from ..lm.core import make_decoder

    open_connection(settings.address, settings.queue, time.monotonic() + settings.connect_timeout).close()
    t0 = time.perf_counter()
    decoder = make_decoder(settings.params.decode, settings.lm_dir)
    log.info("%s decoder on %s loaded in %.1f s", settings.params.decode.decoder, settings.lm_dir,
             time.perf_counter() - t0)
    rescorer = None
    if settings.llm is not None:
        from ..lm.rescore import LLMRescorer

        rescorer = LLMRescorer(settings.llm)
        log.info("LLM %s loaded", settings.llm.model)
    return GroupWorker(settings, decoder, rescorer).run()


# ============================================================================ the evaluator's side

@dataclass
class GroupResult:
    sentence: str
    nbest: NBest
    worker: str
    deliveries: int
    seconds: float


class GroupCollector:
    """Puts trials on the queue (at most ``window`` unanswered at once) and keeps the first result of each.

    ``failed`` reports a fatal problem of the local services; ``generation`` changes when they
    restarted redis-server. A Redis that lost its data (the job key is gone) gets every
    unanswered trial again.
    """

    def __init__(self, address: RedisAddress, queue: str, options: str, log: Log = print,
                 stall_timeout: float = 600.0, window: int = 1024,
                 failed: Callable[[], str | None] = lambda: None, hint: str = ""):
        self.address = address
        self.queue = check_queue_name(queue)
        self.options = options
        self.log = log
        self.stall_timeout = stall_timeout
        self.window = max(1, window)
        self.failed = failed
        self.hint = hint
        self.job = uuid.uuid4().hex[:12]
        self.stream = trials_stream(queue)
        self.reply_to = results_stream(queue, self.job)
        self.key = job_key(queue, self.job)
        self.results: dict[int, GroupResult] = {}
        self.duplicates = 0
        self.resends = 0
        self.r: redis.Redis | None = None

    # ---- Redis
    def _connect(self, deadline: float) -> None:
        delay = 0.05
        while True:
            try:
                r = connect(self.address, timeout=10.0)
                r.ping()
                self.r = r
                return
            except (redis.RedisError, OSError) as exc:
                fatal = connect_error_message(self.address, exc)
                if fatal is not None:
                    raise B2txtError(fatal) from None
                if not isinstance(exc, CONNECTION_ERRORS):
                    raise B2txtError(f"redis at {self.address}: {exc}") from None
                if time.monotonic() > deadline or self.failed():
                    raise B2txtError(self.failed() or f"cannot reach Redis at {self.address}: {exc}") from None
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    def _start_job(self) -> None:
        assert self.r is not None
        self.r.set(self.key, "1", ex=JOB_TTL_S)
        ensure_group(self.r, self.queue)

    def _enqueue(self, logits: dict[int, np.ndarray], todo: deque[int], outstanding: set[int]) -> None:
        assert self.r is not None
        while todo and len(outstanding) < self.window:
            pipe = self.r.pipeline(transaction=False)
            batch = []
            while todo and len(outstanding) + len(batch) < self.window and len(batch) < 64:
                i = todo.popleft()
                if i in self.results:
                    continue
                batch.append(i)
                pipe.xadd(self.stream, {JOB_FIELD: self.job, TRIAL_FIELD: str(i), P.LOGITS_FIELD: P.encode_logits(
                    logits[i]), OPTIONS_FIELD: self.options, REPLY_TO_FIELD: self.reply_to})
            pipe.execute()
            outstanding.update(batch)

    def _consumers(self) -> str:
        try:
            assert self.r is not None
            rows = self.r.xinfo_consumers(self.stream, GROUP)
        except (redis.RedisError, OSError, AssertionError):
            return "unknown"
        return ", ".join(f"{P.text(c['name'])} (idle {int(c['idle']) / 1000:.0f} s, {c['pending']} pending)"
                         for c in rows) or "none"

    def run(self, logits: dict[int, np.ndarray], startup_timeout: float = 600.0) -> dict[int, GroupResult]:
        self._connect(time.monotonic() + startup_timeout)
        self._start_job()
        todo: deque[int] = deque(sorted(logits))
        outstanding: set[int] = set()
        last_id = "0-0"
        last_progress = renewed = time.monotonic()
        bar = progress(desc="evaluate (workers)", total=len(logits), unit="trial")
        try:
            while len(self.results) < len(logits):
                reason = self.failed()
                if reason:
                    raise B2txtError(reason)
                answered = len(self.results)
                try:
                    assert self.r is not None
                    self._enqueue(logits, todo, outstanding)
                    if time.monotonic() - renewed > 30:
                        self.r.expire(self.key, JOB_TTL_S)
                        renewed = time.monotonic()
                    seen = []
                    for _stream, items in self.r.xread({self.reply_to: last_id}, count=512, block=500) or []:
                        for entry_id, raw in items:
                            last_id = P.text(entry_id)
                            seen.append(entry_id)
                            self._take(P.fields_text(raw), logits, outstanding, bar)
                    if seen:
                        self.r.xdel(self.reply_to, *seen)  # read: this reader is their only one
                except CONNECTION_ERRORS as exc:
                    self.log(f"lost the Redis connection ({exc}); reconnecting")
                    self._connect(time.monotonic() + startup_timeout)
                    if not self.r.exists(self.key):  # type: ignore[union-attr]
                        lost = sorted(set(logits) - set(self.results))
                        self.log(f"Redis lost its data (restarted?): sending the {len(lost)} unanswered trial(s) "
                                 f"again ({len(self.results)} answered before)")
                        self.resends += len(lost)
                        self._start_job()
                        todo, outstanding, last_id = deque(lost), set(), "0-0"
                    continue
                if len(self.results) > answered:
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > (startup_timeout if not self.results else self.stall_timeout):
                    raise B2txtError(
                        f"no worker answered for {time.monotonic() - last_progress:.0f} s "
                        f"({len(self.results)} of {len(logits)} trials done); workers on {self.stream}: "
                        f"{self._consumers()}" + (f". Start workers with: {self.hint}" if self.hint else ""))
        finally:
            bar.close()
            try:
                if self.r is not None:
                    self.r.delete(self.key, self.reply_to)
                    self.r.close()
            except CONNECTION_ERRORS:
                pass
        return self.results

    def _take(self, f: dict[str, Any], logits: dict[int, np.ndarray], outstanding: set[int], bar: Any) -> None:
        try:
            trial = int(P.text(f.get(TRIAL_FIELD)))
        except ValueError:
            self.log(f"result without a valid trial field ignored: {sorted(f)}")
            return
        if trial not in logits or P.text(f.get(JOB_FIELD)) != self.job:
            return
        worker = P.text(f.get(WORKER_FIELD), "?")
        outstanding.discard(trial)
        if trial in self.results:  # a late answer to a claimed entry, or a re-sent trial: keep the first
            self.duplicates += 1
            return
        if P.ERROR_FIELD in f:
            raise B2txtError(f"trial {trial}: worker {worker}: {P.text(f[P.ERROR_FIELD])}")
        scoring = P.text(f.get(P.SCORING_FIELD))
        try:
            nbest = parse_scoring(scoring)
        except ValueError as exc:
            raise B2txtError(f"trial {trial}: worker {worker}: bad scoring field: {exc}") from None
        self.results[trial] = GroupResult(P.text(f.get(SENTENCE_FIELD)), nbest, worker,
                                          int(P.text(f.get(DELIVERIES_FIELD), "1") or 1),
                                          float(P.text(f.get(SECONDS_FIELD), "0") or 0))
        bar.update(1)


# ============================================================================ local workers

def address_args(address: RedisAddress) -> list[str]:
    """``b2txt lm-worker`` flags that connect to ``address``."""
    if address.socket is not None:
        args = ["--redis-socket", str(address.socket)]
    else:
        args = ["--redis-host", address.host, "--redis-port", str(address.port)]
        if address.tls is not None:
            args.append("--tls")
            for flag, path in (("--tls-ca", address.tls.ca), ("--tls-cert", address.tls.cert),
                               ("--tls-key", address.tls.key)):
                if path is not None:
                    args += [flag, str(path)]
    return args + ["--password-env", address.password_env]


class WorkerPool(Supervisor):
    """An optional private redis-server and N ``lm-worker`` processes (``lm-worker-K``), watched as
    :class:`~b2txt.server.supervisor.Supervisor` watches its children. A worker that dies is
    replaced (its pending trial is claimed by another worker meanwhile)."""

    def __init__(self, run_dir: Path, redis_server: RedisServer | None, address: RedisAddress, n_workers: int,
                 worker_args: list[str], max_restarts: int, log: Log):
        super().__init__(run_dir, redis_server, max_restarts, ["lm-worker"], log, "b2txt-workers")
        self.address = address
        self.n_workers = n_workers
        self.worker_args = worker_args

    def _start_children(self) -> None:
        if self.redis is not None:
            self._start_redis()
        for k in range(self.n_workers):
            self._start_child(f"lm-worker-{k}")

    def _start_child(self, name: str) -> None:
        self._spawn(name, "lm-worker", ["lm-worker", *address_args(self.address), *self.worker_args])


def worker_hint(network: str | None, settings: Any) -> str:
    """The command that starts a worker on another host (printed by the evaluator)."""
    if network is None:
        return ""
    host, _, port = network.rpartition(":")
    tls = " --tls-ca CA.pem" if settings.tls is not None else ""
    if settings.tls is not None and settings.tls.ca is not None:
        tls += " --tls-cert CLIENT.pem --tls-key CLIENT.key"
    return (f"{settings.password_env}=… b2txt lm-worker --lm_path DIR --redis-host {host} --redis-port {port}"
            f"{tls} --queue {settings.queue} --password-env {settings.password_env}")

