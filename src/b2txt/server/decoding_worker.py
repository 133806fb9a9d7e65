"""One LM-server worker process: the trials of the sessions it owns, decoded through the core.

A worker keeps each owned session's state (chunks of the current trial, its streaming search,
its decoding options) and serves the session's requests in order: ``reset``, ``logits``
(advance the trial's search, reply with the partial sentence), ``finalize`` (the trial's n-best
through :class:`~b2txt.lm.core.DecodingCore`, or handed to the LLM process with ``do_opt``)
and ``update_params``. The LLM process is the same core with a rescorer and no graph.

A trial that arrives whole (its logits already followed by its finalize among the requests
waiting for the worker, as a pipelined ``decode()`` sends them) is decoded in one pass, as in
process: its logits are only collected, and their partial replies (the one-pass best sentence)
and its reset's reply (when the reset came in the same read: Redis 7.0 answers a blocked
XREAD with the first stream that got data only) go out with the final result, in one Redis
write. Only a trial whose finalize is not there yet pays for the streaming search. The partial reply says which path it took (``b2txt_pass``: ``one``/``stream``).
"""

from __future__ import annotations

import logging
import signal
import time
import traceback
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ..ground.config import DecodeConfig
from ..lm.core import DecodingCore, load_rescorer
from ..lm.nbest import Candidate, NBest, PartialDecoder
from . import protocol as P
from .lm_server import DROP, OPEN, REFRESH, HopTrace, Job, Replies, ReplyWriter, ServerSettings, final_reply
from .redis_process import die_with_parent

log = logging.getLogger("b2txt.server")

#: Field of a partial reply: which path decoded the trial (``one``: one pass, ``stream``: streaming).
PASS_FIELD = "b2txt_pass"


@dataclass
class SessionState:
    streams: P.Streams
    params: P.SessionParams
    chunks: list[np.ndarray] = field(default_factory=list)
    frames: int = 0
    # the trial's search state for partial results: each chunk advances it (one pass in all)
    stream: PartialDecoder | None = None
    # requests of a trial sent whole, answered in the final result's write: its reset (with its
    # done reply) and its logits (None: answered with the one-pass best)
    held: list[tuple[Job, Replies | None]] = field(default_factory=list)

    def clear(self) -> None:
        self.chunks, self.frames, self.stream, self.held = [], 0, None, []


class Worker:
    """Decodes the trials of the sessions it owns; one request at a time, in order."""

    def __init__(self, index: int, settings: ServerSettings, core: DecodingCore,
                 rescore_queue: Any | None = None):
        self.index = index
        self.settings = settings
        self.core = core
        self.sessions: dict[str, SessionState] = {}
        self.out = ReplyWriter(settings, f"worker {index}")
        self.trace = HopTrace(settings.trace, index)
        #: held replies settled (:meth:`settle_held`) and the request entries they answer, for the next write
        self.with_next_reply: tuple[Replies, list[tuple[str, bytes]]] = ([], [])
        self.rescore_queue = rescore_queue
        #: requests already received and not yet served (what comes next, for the one-pass path)
        self.upcoming: Iterable[Job | None] = ()
        #: requests answered out of turn (deferred partials), for the worker loop to acknowledge
        self.finished: list[int] = []

    # ---- request handlers: each returns (reply entries, whether the job is finished here)
    def on_reset(self, state: SessionState, job: Job) -> Replies | None:
        state.clear()
        reply = [(state.streams.done_resetting, P.with_request_id({P.DONE_FIELD: 1}, job.request_id))]
        if self.whole_trial(job):  # one Redis write for the whole trial's replies
            state.held.append((job, reply))
            return None
        return reply

    def whole_trial(self, job: Job) -> bool:
        """Whether the session's finalize is already waiting behind this reset or logits request
        (with nothing but logits between): nobody can read a partial before the final result."""
        for nxt in self.upcoming:
            if nxt is None:  # the worker stops before anything behind this
                return False
            if nxt.session != job.session or nxt.kind in (OPEN, REFRESH):
                continue
            if nxt.kind == P.Kind.LOGITS.value:
                continue
            return nxt.kind == P.Kind.FINALIZE.value
        return False

    def on_logits(self, state: SessionState, job: Job) -> Replies | None:
        logits = P.decode_logits_entry(job.fields, self.settings.max_logits_bytes)
        if state.frames + len(logits) > self.settings.max_trial_frames:
            raise P.ProtocolError(f"{P.LOGITS_FIELD}: the trial would hold {state.frames + len(logits)} frames, "
                                  f"over the limit of {self.settings.max_trial_frames}; reset first")
        state.chunks.append(logits)
        state.frames += len(logits)
        if state.stream is None and self.whole_trial(job):
            state.held.append((job, None))  # answered by on_finalize, after the one-pass decode
            return None
        if state.stream is None:  # a new trial, or new decoding options: catch up on earlier chunks
            state.stream = self.core.stream(state.params.decode)
            for chunk in state.chunks[:-1]:
                state.stream.advance(chunk)
        best = state.stream.advance(logits)
        return [(state.streams.partial, P.with_request_id({P.PARTIAL_FIELD: best, PASS_FIELD: "stream"},
                                                          job.request_id))]

    def settle_held(self, state: SessionState, best: str | None, error: str = "") -> None:
        """The replies of the requests held for a trial sent whole, for the next reply write
        (:attr:`with_next_reply`): a reset's done reply, the logits' best sentence or ``error``."""
        for job, reply in state.held:
            if reply is not None:
                entries = reply
            elif best is None:
                entries = P.error_reply(state.streams, P.Kind.LOGITS, error, job.request_id)
            else:
                entries = [(state.streams.partial, P.with_request_id({P.PARTIAL_FIELD: best, PASS_FIELD: "one"},
                                                                     job.request_id))]
            self.with_next_reply[0].extend(entries)
            self.with_next_reply[1].append((job.stream, job.entry_id))
            self.finished.append(job.seq)
        state.held = []

    def write_reply(self, entries: Replies, consumed: tuple[str, bytes] | None) -> None:
        """One MULTI/EXEC: ``entries`` and the held replies settled since the last write, deleting
        the request entries they answer."""
        held, done = self.with_next_reply
        self.with_next_reply = ([], [])
        if not (held or entries or consumed):
            return
        self.out.reply(held + entries, done + ([consumed] if consumed is not None else []))

    def finalize_nbest(self, state: SessionState) -> NBest:
        """The trial's n-best from every chunk so far, in one pass (decoded and augmented by the core)."""
        if not state.chunks:
            return NBest(())
        logits = state.chunks[0] if len(state.chunks) == 1 else np.concatenate(state.chunks)
        return self.core.nbest(logits, state.params.decode)

    def on_finalize(self, state: SessionState, job: Job) -> Replies | None:
        context = P.text(self.out.call(lambda r: r.get(state.streams.context_key))).strip()
        self.trace.mark("context")
        nbest = self.finalize_nbest(state)
        self.trace.mark("decoded")
        self.settle_held(state, nbest.best)
        params = state.params
        state.clear()
        if params.do_opt and nbest.candidates:
            if self.rescore_queue is None:
                raise P.ProtocolError("do_opt: this server has no LLM loaded (start it with --do_opt or --llm)")
            self.write_reply([], None)  # the LLM process writes the final result
            self.rescore_queue.put((job, state.streams.prefix, [tuple(c) for c in nbest.candidates],
                                    params.decode.model_dump(), params.alpha, context))
            return None
        return final_reply(state.streams, nbest, context, job.request_id)

    def on_update(self, state: SessionState, job: Job) -> Replies:
        new = P.apply_update(state.params, job.fields)
        if new.decode != state.params.decode:
            self.core.decoder(new.decode)  # a decoder that cannot be built is an error now, not at decode time
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
        """Serve one job; False when its reply comes later (the LLM rescorer's, or a deferred partial's)."""
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
        self.trace.begin(job)
        try:
            handler = {P.Kind.RESET: self.on_reset, P.Kind.LOGITS: self.on_logits,
                       P.Kind.FINALIZE: self.on_finalize, P.Kind.UPDATE: self.on_update}[kind]
            entries = handler(state, job)
        except P.ProtocolError as exc:
            log.warning("session %r: %s request refused: %s", job.session or "(default)", kind.value, exc)
            entries = P.error_reply(state.streams, kind, str(exc), job.request_id)
            if kind is P.Kind.FINALIZE:
                self.settle_held(state, None, f"the trial's finalize was refused: {exc}")
                state.clear()
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not take the server down
            log.error("session %r: %s failed:\n%s", job.session, kind.value, traceback.format_exc())
            entries = P.error_reply(state.streams, kind, f"internal error: {type(exc).__name__}: {exc}",
                                    job.request_id)
            self.settle_held(state, None, f"internal error: {type(exc).__name__}: {exc}")
            state.clear()
        if entries is None:
            return False
        self.write_reply(entries, (job.stream, job.entry_id))
        self.trace.end(job)
        return True


def _child_setup() -> None:
    """Worker processes die with the server and leave signals to it (it drains, then stops them)."""
    die_with_parent(signal.SIGKILL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _take(pending: deque[Job | None], message: Job | list[Job] | None) -> None:
    """A message from the router: one job, the jobs of one read (a list), or None (stop)."""
    now = time.monotonic_ns()  # the hop trace's "recv"
    for job in message if isinstance(message, list) else [message]:
        if job is not None:
            job.t_recv = now
        pending.append(job)


def worker_main(index: int, settings: ServerSettings, core: DecodingCore, jobs: Connection, done: Connection,
                rescore_queue: Any | None) -> None:
    _child_setup()
    worker = Worker(index, settings, core, rescore_queue)
    pending: deque[Job | None] = deque()
    while True:
        try:
            if not pending:
                _take(pending, jobs.recv())  # blocks
            while jobs.poll():  # what else has arrived: the worker looks ahead for a trial's finalize
                _take(pending, jobs.recv())
        except EOFError:
            return
        job = pending.popleft()
        if job is None:
            return
        worker.upcoming = pending  # read, not changed, while the job is served
        if worker.handle(job):
            done.send(job.seq)
        for seq in worker.finished:
            done.send(seq)
        worker.finished = []


def rescorer_main(settings: ServerSettings, queue: Any, done: Connection, ready: Connection) -> None:
    """The one process holding the LLM: rescores finalized n-best lists and writes the final replies.
    Its core has a rescorer and never loads a graph."""
    _child_setup()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [llm] %(message)s")
    assert settings.llm is not None
    try:
        core = DecodingCore(settings.lm_dir, settings.params.decode, rescorer=load_rescorer(settings.llm))
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
            llm = settings.llm.model_copy(update={"alpha": alpha, "context": context})
            nbest = core.rescore(NBest(tuple(Candidate(*row) for row in rows)), llm,
                                 DecodeConfig.model_validate(decode_dump))
            entries = final_reply(streams, nbest, context, job.request_id)
        except Exception as exc:  # noqa: BLE001
            log.error("LLM rescoring failed:\n%s", traceback.format_exc())
            entries = P.error_reply(streams, P.Kind.FINALIZE, f"LLM rescoring failed: {exc}", job.request_id)
        out.reply(entries, (job.stream, job.entry_id))
        done.send(job.seq)
