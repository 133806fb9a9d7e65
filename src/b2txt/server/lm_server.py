"""The LM server: the published stream protocol (REFERENCE §5), served by N decoding processes.

Process layout::

    main process (router)  ── XREAD BLOCK on every request stream of every session ──► Redis
        │ pipe per worker: requests of the sessions it owns, in stream order
        ▼
    worker 0 … N-1 (forked: share the loaded graph copy-on-write) ── replies, XDEL ──► Redis
        │ (finalize with do_opt)
        ▼
    LLM rescorer (one spawned process, only with --do_opt / --llm) ── replies, XDEL ──► Redis

Why this shape:

- the C++ decoders hold the GIL, so parallel decoding needs processes; a session (one
  client's sequential trials) sticks to one worker, which keeps its trial state, so its
  requests are handled in order without locks;
- the router only reads; each worker writes its reply, and deletes the request entry it
  answered, in one MULTI/EXEC: an entry is trimmed exactly when it has been answered, and
  entries nobody has consumed are never trimmed (no MAXLEN, which drops unread entries);
- every read blocks (XREAD BLOCK, pipe recv): no polling loop. The block time stays below
  the socket timeout (redis-py's 5 s default made long blocks raise TimeoutError);
- failures stay local: a malformed request gets an ``error`` reply and the server goes on;
  a lost Redis connection is retried until Redis is back (the read positions are kept, so
  nothing written meanwhile is missed); a dead worker is replaced, its in-flight requests
  answered with an error; SIGTERM stops reading new trials, lets open trials finish (up to
  ``drain_timeout``) and exits 0.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np
import redis

from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.errors import B2txtError
from ..lm.nbest import Decoder, NBest, PartialDecoder, augment_nbest, scoring_string
from . import protocol as P
from .connection import CONNECTION_ERRORS, RedisAddress, connect, server_time_ms
from .redis_process import die_with_parent

log = logging.getLogger("b2txt.server")

#: Entries read per stream and XREAD; a session holding more pending entries is read in turns.
READ_COUNT = 256
DEFAULT_SESSION = ""


@dataclass(frozen=True)
class ServerSettings:
    """Everything the server needs besides the decoder itself (picklable: goes to every process)."""

    lm_dir: Path
    address: RedisAddress
    params: P.SessionParams = field(default_factory=P.SessionParams)
    workers: int = 1
    llm: RescoreConfig | None = None
    max_logits_bytes: int = 16 * 1024 * 1024
    max_trial_frames: int = 100_000
    max_sessions: int = 256
    block_ms: int = 500
    drain_timeout: float = 30.0
    reply_retry_s: float = 120.0
    #: the default session's streams (the published flags may rename input/partial/final)
    default_streams: P.Streams = field(default_factory=P.Streams)

    def streams_for(self, session: str) -> P.Streams:
        return self.default_streams if session == DEFAULT_SESSION else P.Streams(session)

    @property
    def socket_timeout(self) -> float:
        return self.block_ms / 1000 + 10.0


@dataclass
class Job:
    """One request entry, routed to the worker that owns its session."""

    seq: int
    session: str
    kind: str  # a protocol Kind value, or one of the control kinds below
    stream: str = ""
    entry_id: bytes = b""
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> str | None:
        return P.text(self.fields.get(P.REQUEST_ID_FIELD)) or None


# control kinds (router -> worker); request kinds are protocol.Kind values
OPEN, DROP, REFRESH = "open", "drop", "refresh"


# ============================================================================ replies with retry

class ReplyWriter:
    """Writes replies (and deletes the answered entry) atomically, reconnecting when Redis is away."""

    def __init__(self, settings: ServerSettings, who: str):
        self.settings = settings
        self.who = who
        self.r: redis.Redis | None = None

    def _client(self) -> redis.Redis:
        if self.r is None:
            self.r = connect(self.settings.address, timeout=self.settings.socket_timeout)
        return self.r

    def call(self, fn: Any) -> Any:
        """``fn(redis)`` retried (with back-off) until Redis answers or ``reply_retry_s`` passes."""
        deadline = time.monotonic() + self.settings.reply_retry_s
        delay, warned = 0.05, False
        while True:
            try:
                return fn(self._client())
            except CONNECTION_ERRORS as exc:
                if self.r is not None:
                    self.r.close()
                self.r = None
                if time.monotonic() > deadline:
                    log.error("%s: Redis unreachable for %.0f s, reply dropped (%s)", self.who,
                              self.settings.reply_retry_s, exc)
                    return None
                if not warned:
                    log.warning("%s: Redis unreachable (%s); retrying", self.who, exc)
                    warned = True
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def reply(self, entries: list[tuple[str, dict[str, Any]]], consumed: tuple[str, bytes] | None) -> None:
        def write(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=True)
            for stream, fields in entries:
                pipe.xadd(stream, fields)
            if consumed is not None and consumed[1]:
                pipe.xdel(consumed[0], consumed[1])
            pipe.execute()

        self.call(write)


# ============================================================================ worker

def decoder_key(options: DecodeConfig) -> str:
    """Options that change the search itself (not the n-best post-processing)."""
    return json.dumps(options.model_dump(exclude={"augment_top", "augment_penalty", "workers"}), sort_keys=True)


@dataclass
class SessionState:
    streams: P.Streams
    params: P.SessionParams
    chunks: list[np.ndarray] = field(default_factory=list)
    frames: int = 0
    # the trial's search state for partial results: each chunk advances it (one pass in all)
    stream: PartialDecoder | None = None

    def clear(self) -> None:
        self.chunks, self.frames, self.stream = [], 0, None


class Worker:
    """Decodes the trials of the sessions it owns; one request at a time, in order."""

    def __init__(self, index: int, settings: ServerSettings, decoder: Decoder,
                 rescore_queue: Any | None = None):
        self.index = index
        self.settings = settings
        self.decoders: dict[str, Decoder] = {decoder_key(decoder.options): decoder}
        self.sessions: dict[str, SessionState] = {}
        self.out = ReplyWriter(settings, f"worker {index}")
        self.rescore_queue = rescore_queue

    # ---- decoding
    def decoder_for(self, options: DecodeConfig) -> Decoder:
        key = decoder_key(options)
        if key not in self.decoders:
            from ..lm.core import make_decoder

            self.decoders[key] = make_decoder(options, self.settings.lm_dir)
        return self.decoders[key]

    def decode_all(self, state: SessionState) -> NBest:
        """The n-best of every chunk so far, in one pass (on finalize)."""
        logits = state.chunks[0] if len(state.chunks) == 1 else np.concatenate(state.chunks)
        return self.decoder_for(state.params.decode).decode(logits)

    # ---- request handlers: each returns (reply entries, whether the job is finished here)
    def on_reset(self, state: SessionState, job: Job) -> list[tuple[str, dict[str, Any]]]:
        state.clear()
        return [(state.streams.done_resetting, P.with_request_id({P.DONE_FIELD: 1}, job.request_id))]

    def on_logits(self, state: SessionState, job: Job) -> list[tuple[str, dict[str, Any]]]:
        logits = P.decode_logits(job.fields.get(P.LOGITS_FIELD), self.settings.max_logits_bytes)
        if state.frames + len(logits) > self.settings.max_trial_frames:
            raise P.ProtocolError(f"{P.LOGITS_FIELD}: the trial would hold {state.frames + len(logits)} frames, "
                                  f"over the limit of {self.settings.max_trial_frames}; reset first")
        state.chunks.append(logits)
        state.frames += len(logits)
        if state.stream is None:  # a new trial, or new decoding options: catch up on earlier chunks
            state.stream = self.decoder_for(state.params.decode).stream()
            for chunk in state.chunks[:-1]:
                state.stream.advance(chunk)
        best = state.stream.advance(logits)
        return [(state.streams.partial, P.with_request_id({P.PARTIAL_FIELD: best}, job.request_id))]

    def finalize_nbest(self, state: SessionState) -> NBest:
        nbest = self.decode_all(state) if state.chunks else NBest(())
        d = state.params.decode
        if d.nbest > 1 and d.augment_top > 1:
            nbest = augment_nbest(nbest, d.augment_top, d.augment_penalty)
        return nbest

    def on_finalize(self, state: SessionState, job: Job) -> list[tuple[str, dict[str, Any]]] | None:
        context = P.text(self.out.call(lambda r: r.get(state.streams.context_key))).strip()
        nbest = self.finalize_nbest(state)
        params = state.params
        state.clear()
        if params.do_opt and nbest.candidates:
            if self.rescore_queue is None:
                raise P.ProtocolError("do_opt: this server has no LLM loaded (start it with --do_opt or --llm)")
            self.rescore_queue.put((job, state.streams.prefix, [tuple(c) for c in nbest.candidates],
                                    params.decode.model_dump(), params.alpha, context))
            return None
        return final_reply(state.streams, nbest, context, job.request_id)

    def on_update(self, state: SessionState, job: Job) -> list[tuple[str, dict[str, Any]]]:
        new = P.apply_update(state.params, job.fields)
        if new.decode != state.params.decode:
            self.decoder_for(new.decode)  # a decoder that cannot be built is an error now, not at decode time
        if new.decode != state.params.decode:
            state.stream = None
        state.params = new
        return [(state.streams.args, self.args_entry(state)),
                (state.streams.done_updating_params, P.with_request_id({P.DONE_FIELD: 1}, job.request_id))]

    def args_entry(self, state: SessionState) -> dict[str, str]:
        extra = {"workers": str(self.settings.workers), "llm": self.settings.llm.model if self.settings.llm else "",
                 "session": state.streams.prefix}
        return P.args_fields(state.params, str(self.settings.lm_dir), extra)

    # ---- control
    def open(self, job: Job) -> None:
        if job.session not in self.sessions:
            self.sessions[job.session] = SessionState(self.settings.streams_for(job.session), self.settings.params)
        self.refresh_args(self.sessions[job.session])

    def refresh_args(self, state: SessionState) -> None:
        """Put the options in force on the args stream when it is empty (as published: after a flush)."""
        entry = self.args_entry(state)
        self.out.call(lambda r: r.xlen(state.streams.args) == 0 and r.xadd(state.streams.args, entry))

    def handle(self, job: Job) -> bool:
        """Serve one job; False when its reply is left to the LLM rescorer."""
        if job.kind == OPEN:
            self.open(job)
            return True
        if job.kind == DROP:
            self.sessions.pop(job.session, None)
            return True
        if job.kind == REFRESH:
            if job.session in self.sessions:
                self.refresh_args(self.sessions[job.session])
            return True
        state = self.sessions.get(job.session)
        if state is None:  # e.g. this worker replaced a dead one: the session starts afresh
            self.open(Job(0, job.session, OPEN))
            state = self.sessions[job.session]
        kind = P.Kind(job.kind)
        try:
            handler = {P.Kind.RESET: self.on_reset, P.Kind.LOGITS: self.on_logits,
                       P.Kind.FINALIZE: self.on_finalize, P.Kind.UPDATE: self.on_update}[kind]
            entries = handler(state, job)
        except P.ProtocolError as exc:
            log.warning("session %r: %s request refused: %s", job.session or "(default)", kind.value, exc)
            entries = P.error_reply(state.streams, kind, str(exc), job.request_id)
            if kind is P.Kind.FINALIZE:
                state.clear()
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not take the server down
            log.error("session %r: %s failed:\n%s", job.session, kind.value, traceback.format_exc())
            entries = P.error_reply(state.streams, kind, f"internal error: {type(exc).__name__}: {exc}",
                                    job.request_id)
            state.clear()
        if entries is None:
            return False
        self.out.reply(entries, (job.stream, job.entry_id))
        return True


def final_reply(streams: P.Streams, nbest: NBest, context: str,
                request_id: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The final result and the finalize acknowledgement (written together)."""
    final = {P.FINAL_FIELD: nbest.best, P.SCORING_FIELD: scoring_string(nbest), P.CONTEXT_FIELD: context}
    return [(streams.final, P.with_request_id(final, request_id)),
            (streams.done_finalizing, P.with_request_id({P.DONE_FIELD: 1}, request_id))]


def _child_setup() -> None:
    """Worker processes die with the server and leave signals to it (it drains, then stops them)."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_main(index: int, settings: ServerSettings, decoder: Decoder, jobs: Connection, done: Connection,
                rescore_queue: Any | None) -> None:
    _child_setup()
    worker = Worker(index, settings, decoder, rescore_queue)
    while True:
        try:
            job = jobs.recv()  # blocks
        except EOFError:
            return
        if job is None:
            return
        if worker.handle(job):
            done.send(job.seq)


def rescorer_main(settings: ServerSettings, queue: Any, done: Connection, ready: Connection) -> None:
    """The one process holding the LLM: rescores finalized n-best lists and writes the final replies."""
    _child_setup()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [llm] %(message)s")
    from ..lm.nbest import Candidate
    from ..lm.rescore import LLMRescorer

    assert settings.llm is not None
    try:
        rescorer = LLMRescorer(settings.llm)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which exits with it
        ready.send(f"{type(exc).__name__}: {exc}")
        return
    ready.send("ok")
    out = ReplyWriter(settings, "llm")
    while True:
        item = queue.get()
        if item is None:
            return
        job, prefix, rows, decode_dump, alpha, context = item
        streams = settings.streams_for(prefix)
        try:
            cfg = settings.llm.model_copy(update={"alpha": alpha, "context": context})
            nbest = rescorer.rescore(NBest(tuple(Candidate(*row) for row in rows)),
                                     DecodeConfig.model_validate(decode_dump), cfg)
            entries = final_reply(streams, nbest, context, job.request_id)
        except Exception as exc:  # noqa: BLE001
            log.error("LLM rescoring failed:\n%s", traceback.format_exc())
            entries = P.error_reply(streams, P.Kind.FINALIZE, f"LLM rescoring failed: {exc}", job.request_id)
        out.reply(entries, (job.stream, job.entry_id))
        done.send(job.seq)


# ============================================================================ router

def grow_pipe(conn: Connection, size: int = 1 << 20) -> None:
    """Give a worker's request pipe 1 MiB (Linux default 64 KiB), so handing a worker a few trials
    of logits while it is busy decoding does not block the router and stall the other workers."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ImportError):
        pass


@dataclass
class WorkerHandle:
    index: int
    proc: Any  # multiprocessing Process
    jobs: Connection
    done: Connection
    sessions: set[str] = field(default_factory=set)


@dataclass
class Route:
    """What the router knows of a session: its owner and whether a trial is under way."""

    streams: P.Streams
    owner: int
    trial_open: bool = False
    last_active: float = field(default_factory=time.monotonic)
    registrations: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    stream: str
    entry_id: bytes
    fields: dict[str, Any]

    @property
    def key(self) -> tuple[int, int]:
        return P.parse_id(self.entry_id)


def ordered_entries(result: Iterable[Any], count: int, session_of: dict[str, str],
                    kind_of: dict[str, P.Kind]) -> list[Entry]:
    """XREAD results as one list in protocol order: millisecond, request-kind rank, sequence.

    Sequence numbers count per stream, so they do not order entries of different streams
    written in one millisecond (a pipelined reset, logits and finalize): the kind rank does.

    When a stream returned ``count`` entries (more may be waiting), later entries of the same
    session on its other streams are held back (the next read returns them, after the rest of
    the full stream), so a session's requests are never served out of order.
    """
    entries: list[Entry] = []
    cutoff: dict[str, tuple[int, int]] = {}
    for stream_name, items in result:
        stream = P.text(stream_name)
        got = [Entry(stream, eid, P.fields_text(fields)) for eid, fields in items]
        entries.extend(got)
        if len(got) >= count and stream in session_of:
            sess = session_of[stream]
            cutoff[sess] = min(cutoff.get(sess, got[-1].key), got[-1].key)
    if cutoff:
        entries = [e for e in entries
                   if e.stream not in session_of or session_of[e.stream] not in cutoff
                   or e.key <= cutoff[session_of[e.stream]]]
    def order(e: Entry) -> tuple[int, int, int]:
        ms, seq = e.key
        return ms, kind_of[e.stream].rank if e.stream in kind_of else -1, seq

    return sorted(entries, key=order)


class Router:
    """The main process: reads every request stream, hands each request to its session's worker."""

    def __init__(self, settings: ServerSettings, decoder: Decoder):
        self.settings = settings
        self.decoder = decoder
        self.r: redis.Redis | None = None
        self.workers: list[WorkerHandle] = []
        self.routes: dict[str, Route] = {}
        self.last_ids: dict[str, bytes | str] = {}
        self.session_of: dict[str, str] = {}
        self.kind_of: dict[str, P.Kind] = {}
        self.inflight: dict[int, tuple[int, Job]] = {}  # seq -> (worker index or -1 for the rescorer, job)
        self.seq = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.rescore_queue: Any | None = None
        self.rescorer: Any | None = None
        self.rescorer_done: Connection | None = None
        self.fatal: str | None = None

    # ---- processes
    def start_rescorer(self) -> None:
        if self.settings.llm is None:
            return
        ctx = mp.get_context("spawn")  # torch and CUDA want a fresh process, not a fork
        self.rescore_queue = ctx.Queue()
        done_r, done_w = ctx.Pipe(duplex=False)
        ready_r, ready_w = ctx.Pipe(duplex=False)
        self.rescorer = ctx.Process(target=rescorer_main, args=(self.settings, self.rescore_queue, done_w, ready_w),
                                    name="b2txt-llm", daemon=True)
        self.rescorer.start()
        done_w.close()
        ready_w.close()
        log.info("loading LLM %s ...", self.settings.llm.model)
        try:
            status = ready_r.recv()
        except EOFError:
            status = f"the LLM process exited with status {self.rescorer.exitcode}"
        if status != "ok":
            raise B2txtError(f"LLM {self.settings.llm.model}: {status}")
        self.rescorer_done = done_r
        log.info("LLM ready")

    def start_worker(self, index: int) -> WorkerHandle:
        ctx = mp.get_context("fork")  # workers share the loaded graph copy-on-write
        jobs_r, jobs_w = ctx.Pipe(duplex=False)
        done_r, done_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker_main, name=f"b2txt-lm-worker-{index}", daemon=True,
                           args=(index, self.settings, self.decoder, jobs_r, done_w, self.rescore_queue))
        proc.start()
        jobs_r.close()
        done_w.close()
        grow_pipe(jobs_w)
        return WorkerHandle(index, proc, jobs_w, done_r)

    def send(self, worker: WorkerHandle, job: Job) -> None:
        try:
            worker.jobs.send(job)
        except (BrokenPipeError, OSError):  # the worker is gone and never got this job: give it to its successor
            self.replace_worker(worker.index)
            worker = self.workers[worker.index]
            worker.jobs.send(job)
        self.inflight[job.seq] = (worker.index, job)

    def new_job(self, session: str, kind: str, stream: str = "", entry_id: bytes = b"",
                fields: dict[str, Any] | None = None) -> Job:
        self.seq += 1
        return Job(self.seq, session, kind, stream, entry_id, fields or {})

    def collect_done(self, timeout: float | None = 0.0) -> None:
        conns = [w.done for w in self.workers] + ([self.rescorer_done] if self.rescorer_done else [])
        for conn in wait(conns, timeout):
            try:
                while conn.poll():
                    self.inflight.pop(conn.recv(), None)
            except (EOFError, OSError):
                continue

    def check_workers(self) -> None:
        if self.rescorer is not None and not self.rescorer.is_alive():
            self.fatal = f"the LLM process died (exit status {self.rescorer.exitcode})"
        for i, w in enumerate(self.workers):
            if not w.proc.is_alive():
                self.replace_worker(i)

    def replace_worker(self, i: int) -> None:
        """Start a successor; requests the dead worker held get an error reply (their trial is lost)."""
        w = self.workers[i]
        self.collect_done()
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        log.error("worker %d died (exit status %s); starting a new one", i, w.proc.exitcode)
        lost = [job for owner, job in list(self.inflight.values()) if owner == i]
        new = self.start_worker(i)
        new.sessions = w.sessions
        self.workers[i] = new
        for name in w.sessions:
            self.send(new, self.new_job(name, OPEN))
        for job in lost:
            self.inflight.pop(job.seq, None)
            route = self.routes.get(job.session)
            if route is not None and job.kind in {k.value for k in P.Kind}:
                route.trial_open = False
                self.answer_error(route.streams, P.Kind(job.kind), job,
                                  "server worker died while serving this request; trial state lost: "
                                  "reset and send the trial again")

    def answer_error(self, streams: P.Streams, kind: P.Kind, job: Job, message: str) -> None:
        if self.r is None:
            return
        try:
            pipe = self.r.pipeline(transaction=True)
            for stream, fields in P.error_reply(streams, kind, message, job.request_id):
                pipe.xadd(stream, fields)
            pipe.xdel(job.stream, job.entry_id)
            pipe.execute()
        except CONNECTION_ERRORS:
            log.error("could not send an error reply (Redis unreachable): %s", message)

    # ---- sessions
    def add_route(self, name: str, start_id: str) -> Route:
        owner = min(self.workers, key=lambda w: (len(w.sessions), w.index))
        route = Route(self.settings.streams_for(name), owner.index)
        self.routes[name] = route
        owner.sessions.add(name)
        for stream, kind in route.streams.requests().items():
            self.last_ids[stream] = start_id
            self.session_of[stream] = name
            self.kind_of[stream] = kind
        self.send(owner, self.new_job(name, OPEN))
        return route

    def drop_route(self, name: str) -> None:
        route = self.routes.pop(name, None)
        if route is None:
            return
        owner = self.workers[route.owner]
        owner.sessions.discard(name)
        for stream in route.streams.requests():
            self.last_ids.pop(stream, None)
            self.session_of.pop(stream, None)
            self.kind_of.pop(stream, None)
        self.send(owner, self.new_job(name, DROP))
        if route.registrations and self.r is not None:
            self.r.xdel(P.SESSIONS_STREAM, *route.registrations)

    def make_room(self) -> bool:
        """At the session limit, forget the longest-idle session without a trial under way."""
        if len(self.routes) < self.settings.max_sessions:
            return True
        idle = [(r.last_active, n) for n, r in self.routes.items() if n != DEFAULT_SESSION and not r.trial_open]
        if not idle:
            return False
        _, name = min(idle)
        log.warning("session limit %d reached: forgetting idle session %r", self.settings.max_sessions, name)
        self.drop_route(name)
        return True

    def on_registration(self, entry: Entry, start_id: str | None) -> None:
        assert self.r is not None
        name = P.text(entry.fields.get(P.SESSION_FIELD))
        action = P.text(entry.fields.get(P.ACTION_FIELD), "open")
        request_id = P.text(entry.fields.get(P.REQUEST_ID_FIELD)) or None
        try:
            P.check_session_name(name)
        except P.ProtocolError as exc:
            log.warning("registration refused: %s", exc)
            self.r.xdel(P.SESSIONS_STREAM, entry.entry_id)
            return
        if action == "close":
            self.drop_route(name)
            self.r.xdel(P.SESSIONS_STREAM, entry.entry_id)
            log.info("session %r closed", name)
            return
        streams = P.Streams(name)
        if action != "open":
            self.r.xdel(P.SESSIONS_STREAM, entry.entry_id)
            self.r.xadd(streams.done_opening, P.with_request_id(
                {P.DONE_FIELD: 0, P.ERROR_FIELD: f"session action {action!r}: expected open or close"}, request_id))
            return
        route = self.routes.get(name)
        if route is None:
            if not self.make_room():
                self.r.xdel(P.SESSIONS_STREAM, entry.entry_id)
                self.r.xadd(streams.done_opening, P.with_request_id(
                    {P.DONE_FIELD: 0, P.ERROR_FIELD: f"too many sessions (limit {self.settings.max_sessions})"},
                    request_id))
                return
            route = self.add_route(name, start_id or P.id_before_ms(entry.key[0]))
            log.info("session %r opened (worker %d)", name, route.owner)
        else:  # a client re-opening (e.g. after a timeout): keep one registration entry
            if route.registrations:
                self.r.xdel(P.SESSIONS_STREAM, *route.registrations)
            route.registrations = []
        route.registrations.append(entry.entry_id)
        route.last_active = time.monotonic()
        self.r.xadd(streams.done_opening, P.with_request_id({P.DONE_FIELD: 1}, request_id))

    # ---- requests
    def on_request(self, entry: Entry) -> None:
        name = self.session_of[entry.stream]
        kind = self.kind_of[entry.stream]
        route = self.routes[name]
        route.last_active = time.monotonic()
        if kind in (P.Kind.RESET, P.Kind.LOGITS):
            route.trial_open = True
        elif kind is P.Kind.FINALIZE:
            route.trial_open = False
        job = self.new_job(name, kind.value, entry.stream, entry.entry_id, entry.fields)
        self.send(self.workers[route.owner], job)

    def dispatch(self, entries: list[Entry]) -> None:
        for e in entries:
            self.last_ids[e.stream] = e.entry_id
            if e.stream == P.SESSIONS_STREAM:
                self.on_registration(e, None)
            elif e.stream in self.session_of:
                self.on_request(e)

    def read_set(self) -> dict[str, bytes | str]:
        if not self.stopping:
            return dict(self.last_ids)
        # draining: only sessions in the middle of a trial are still served
        return {s: i for s, i in self.last_ids.items()
                if s in self.session_of and self.routes[self.session_of[s]].trial_open}

    # ---- connection
    def connect(self) -> bool:
        """(Re)connect; on the first connection learn the time and the registered sessions."""
        first = self.r is None and not self.last_ids
        try:
            r = connect(self.settings.address, timeout=self.settings.socket_timeout)
            r.ping()
        except redis.AuthenticationError as exc:
            raise B2txtError(f"redis at {self.settings.address}: {exc} (password from "
                             f"{self.settings.address.password_env})") from None
        except CONNECTION_ERRORS:
            return False
        self.r = r
        if first:
            now = f"{server_time_ms(r)}-0"
            self.add_route(DEFAULT_SESSION, now)
            self.last_ids[P.SESSIONS_STREAM] = "0-0"
            for eid, fields in r.xrange(P.SESSIONS_STREAM):  # sessions registered before this server started
                self.last_ids[P.SESSIONS_STREAM] = eid
                self.on_registration(Entry(P.SESSIONS_STREAM, eid, P.fields_text(fields)), now)
        else:
            for name, route in self.routes.items():
                self.send(self.workers[route.owner], self.new_job(name, REFRESH))
        return True

    def wait_for_redis(self) -> bool:
        delay, warned = 0.1, False
        while not self.stopping:
            if self.connect():
                log.info("connected to Redis at %s", self.settings.address)
                return True
            if not warned:
                log.warning("cannot reach Redis at %s; retrying", self.settings.address)
                warned = True
            end = time.monotonic() + delay
            while time.monotonic() < end and not self.stopping:
                time.sleep(0.1)
            delay = min(delay * 2, 2.0)
        return False

    # ---- main loop
    def on_signal(self, signum: int, _frame: Any) -> None:
        if not self.stopping:
            log.info("signal %d: finishing trials under way (up to %.0f s), then exiting",
                     signum, self.settings.drain_timeout)
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.settings.drain_timeout

    def drained(self) -> bool:
        if time.monotonic() > self.stop_deadline:
            log.warning("drain timeout: exiting with %d trial(s) unfinished",
                        sum(r.trial_open for r in self.routes.values()))
            return True
        return not self.inflight and not self.read_set()

    def step(self) -> None:
        """One blocking read and the dispatch of what it returned."""
        streams = self.read_set()
        if not streams:  # draining, nothing left to read: wait for the workers to finish
            self.collect_done(timeout=self.settings.block_ms / 1000)
            return
        assert self.r is not None
        try:
            result = self.r.xread(streams, count=READ_COUNT, block=self.settings.block_ms)
        except CONNECTION_ERRORS as exc:
            log.error("lost the Redis connection (%s)", exc)
            self.r.close()
            self.r = None
            self.wait_for_redis()
            return
        self.collect_done()
        self.check_workers()  # a worker that died while idle is replaced before it is handed work
        if result:
            try:
                self.dispatch(ordered_entries(result, READ_COUNT, self.session_of, self.kind_of))
            except CONNECTION_ERRORS as exc:  # registration replies: the client re-opens on its timeout
                log.error("lost the Redis connection while dispatching (%s)", exc)
                self.r = None
                self.wait_for_redis()

    def run(self) -> int:
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start_rescorer()
            self.workers = [self.start_worker(i) for i in range(self.settings.workers)]
            log.info("%d worker(s) started; decoding with %s on %s", len(self.workers),
                     self.settings.params.decode.decoder, self.settings.lm_dir)
            if self.wait_for_redis():
                while not (self.stopping and self.drained()):
                    self.step()
                    self.collect_done()
                    self.check_workers()
                    if self.fatal:
                        raise B2txtError(self.fatal)
            return 0
        finally:
            self.shutdown()
            for s, handler in old.items():
                signal.signal(s, handler)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                w.jobs.send(None)
            except (BrokenPipeError, OSError):
                pass
        if self.rescore_queue is not None:
            self.rescore_queue.put(None)
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
        if self.rescorer is not None:
            self.rescorer.join(timeout=10)
            if self.rescorer.is_alive():
                self.rescorer.kill()
        if self.r is not None:
            self.r.close()
        log.info("LM server stopped")


def serve(settings: ServerSettings) -> int:
    """Load the decoder (once, before forking the workers) and serve until SIGTERM."""
    from ..lm.core import make_decoder

    t0 = time.perf_counter()
    decoder = make_decoder(settings.params.decode, settings.lm_dir)
    log.info("%s decoder on %s loaded in %.1f s", settings.params.decode.decoder, settings.lm_dir,
             time.perf_counter() - t0)
    return Router(settings, decoder).run()
