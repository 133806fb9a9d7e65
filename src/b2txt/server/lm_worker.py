"""``b2txt lm-worker``: takes whole trials from the trial queue (:mod:`.trial_queue`) one at a time,
decodes each through the decoding core with the options it carries, and answers it atomically.
"""

from __future__ import annotations

import logging
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ..ground.config import RescoreConfig
from ..ground.errors import B2txtError
from ..lm.core import DecodingCore, load_rescorer
from ..lm.nbest import DecodeInputError, NBest, scoring_string
from . import protocol as P
from . import trial_queue as Q
from .connection import CONNECTION_ERRORS, RedisAddress

log = logging.getLogger("b2txt.worker")


@dataclass(frozen=True)
class WorkerSettings:
    lm_dir: Path
    address: RedisAddress
    params: P.SessionParams = field(default_factory=P.SessionParams)
    llm: RescoreConfig | None = None
    queue: str = Q.DEFAULT_QUEUE
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

    def __init__(self, settings: WorkerSettings, core: DecodingCore):
        self.s = settings
        self.name = settings.consumer or Q.default_consumer()
        self.core = core
        self.stream = Q.trials_stream(settings.queue)
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
    def decode(self, fields: dict[str, Any]) -> NBest:
        """One trial through the core, with the options it carries (the evaluator's)."""
        raw = P.text(fields.get(Q.OPTIONS_FIELD))
        params = self.params.get(raw)
        if params is None:
            params = Q.parse_options(raw)
            if len(self.params) > 16:
                self.params.clear()
            self.params[raw] = params
        logits = P.decode_logits_entry(fields, self.s.max_logits_bytes)
        nbest = self.core.nbest(logits, params.decode)
        if params.do_opt and nbest.candidates:
            if self.core.rescorer is None or self.s.llm is None:
                raise P.ProtocolError("do_opt: this worker has no LLM loaded (start it with --do_opt or --llm)")
            nbest = self.core.rescore(nbest, self.s.llm.model_copy(update={"alpha": params.alpha}), params.decode)
        return nbest

    # ---- Redis
    def connect(self, deadline: float) -> None:
        r = Q.open_connection(self.s.address, self.s.queue, deadline, self.s.socket_timeout, lambda: self.stopping)
        r.xgroup_createconsumer(self.stream, Q.GROUP, self.name)  # visible to the evaluator before its first trial
        self.r, self.script = r, r.register_script(Q.ACK_SCRIPT)

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
            cursor, claimed, _deleted = self.r.xautoclaim(self.stream, Q.GROUP, self.name, self.s.claim_idle_ms,
                                                         start_id=self.claim_cursor, count=1)
            self.claim_cursor = P.text(cursor)
            if not claimed and self.claim_cursor in ("0-0", "0"):  # scanned the whole pending list
                self.next_claim = time.monotonic() + self.s.claim_idle_ms / 2000
        for entry_id, raw in claimed:
            if raw is None:
                continue
            info = self.r.xpending_range(self.stream, Q.GROUP, min=entry_id, max=entry_id, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else 2
            log.warning("claimed trial %s (entry %s, delivery %d): its worker stopped answering",
                        P.text(raw.get(b"trial")), P.text(entry_id), deliveries)
            return Entry(entry_id, P.fields_text(raw), deliveries)
        got = self.r.xreadgroup(Q.GROUP, self.name, {self.stream: ">"}, count=1, block=self.s.block_ms)
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
        if not self.r.exists(Q.job_key(self.s.queue, job)):
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
                    pipe.xack(self.stream, Q.GROUP, entry.entry_id)
                    pipe.xdel(self.stream, entry.entry_id)
                    pipe.execute()
                    return
                args: list[Any] = [Q.GROUP, entry.entry_id]
                for k, v in result.items():
                    args += [k, v]
                if not self.script(keys=[self.stream, reply_to], args=args):
                    log.info("trial %s: already answered by another worker (it was claimed); result dropped",
                             result.get(Q.TRIAL_FIELD))
                return
            except CONNECTION_ERRORS as exc:
                if attempt:
                    raise
                self.reconnect(exc)  # the script is atomic: it ran entirely or not at all
            except redis.ResponseError as exc:
                if Q.is_nogroup(exc):  # Redis lost its data (restarted): the evaluator sends the trial again
                    log.warning("the trials stream is gone (Redis restarted?); result dropped")
                    return
                raise

    def process(self, entry: Entry) -> None:
        f = entry.fields
        job, trial, reply_to = P.text(f.get(Q.JOB_FIELD)), P.text(f.get(Q.TRIAL_FIELD)), P.text(f.get(Q.REPLY_TO_FIELD))
        if not job or not reply_to.startswith(self.results_prefix):
            log.warning("entry %s: no job or a reply_to outside %s*; dropped", P.text(entry.entry_id),
                        self.results_prefix)
            self.finish(entry, None, None)
            return
        head = {Q.JOB_FIELD: job, Q.TRIAL_FIELD: trial, Q.WORKER_FIELD: self.name, Q.DELIVERIES_FIELD: entry.deliveries}
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
            result = {**head, Q.SENTENCE_FIELD: nbest.best, P.SCORING_FIELD: scoring_string(nbest),
                      Q.SECONDS_FIELD: f"{time.perf_counter() - t0:.6f}"}
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
                    if not Q.is_nogroup(exc):
                        raise B2txtError(f"redis at {self.s.address}: {exc}") from None
                    Q.ensure_group(self.r, self.s.queue)  # type: ignore[arg-type]
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
            mine = [c for c in self.r.xinfo_consumers(self.stream, Q.GROUP) if P.text(c["name"]) == self.name]
            if mine and int(mine[0]["pending"]) == 0:
                self.r.xgroup_delconsumer(self.stream, Q.GROUP, self.name)
        except (redis.RedisError, OSError):
            pass


def run_worker(settings: WorkerSettings) -> int:
    """Check Redis (password, TLS), load the decoder (and the LLM, when asked for) once, then take
    trials until SIGTERM. A wrong password fails before a large graph is loaded."""
    Q.open_connection(settings.address, settings.queue, time.monotonic() + settings.connect_timeout).close()
    t0 = time.perf_counter()
    core = DecodingCore(settings.lm_dir, settings.params.decode).load()
    log.info("%s decoder on %s loaded in %.1f s", settings.params.decode.decoder, settings.lm_dir,
             time.perf_counter() - t0)
    if settings.llm is not None:
        core.rescorer = load_rescorer(settings.llm)
        log.info("LLM %s loaded", settings.llm.model)
    return GroupWorker(settings, core).run()
