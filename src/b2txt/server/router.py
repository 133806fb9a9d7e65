"""The LM server's main process: it reads every request stream and routes each request to the
worker that owns its session (:mod:`.lm_server` has the whole picture).

Two parts: :class:`SessionTable` knows the sessions (their streams, owner, read positions,
whether a trial is under way) and :class:`Router` does the Redis side (connect, read, session
registrations, dispatch, drain on SIGTERM). The processes are :class:`.ServerWorkers`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from ..ground.errors import B2txtError
from ..lm.core import DecodingCore
from . import protocol as P
from .connection import CONNECTION_ERRORS, connect, server_time_ms
from .lm_server import DEFAULT_SESSION, DROP, OPEN, REFRESH, Job, ServerSettings
from .worker_processes import ServerWorkers

log = logging.getLogger("b2txt.server")

#: Entries read per stream and XREAD; a session holding more pending entries is read in turns.
READ_COUNT = 256


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


class SessionTable:
    """Sessions by name, and for each request stream its session, kind and read position."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.routes: dict[str, Route] = {}
        self.last_ids: dict[str, bytes | str] = {}
        self.session_of: dict[str, str] = {}
        self.kind_of: dict[str, P.Kind] = {}

    def add(self, name: str, start_id: str, owner: int) -> Route:
        route = Route(self.settings.streams_for(name), owner)
        self.routes[name] = route
        for stream, kind in route.streams.requests().items():
            self.last_ids[stream] = start_id
            self.session_of[stream] = name
            self.kind_of[stream] = kind
        return route

    def remove(self, name: str) -> Route | None:
        route = self.routes.pop(name, None)
        if route is not None:
            for stream in route.streams.requests():
                self.last_ids.pop(stream, None)
                self.session_of.pop(stream, None)
                self.kind_of.pop(stream, None)
        return route

    def idle_victim(self) -> str | None:
        """The longest-idle session without a trial under way (None when every session is busy)."""
        idle = [(r.last_active, n) for n, r in self.routes.items() if n != DEFAULT_SESSION and not r.trial_open]
        return min(idle)[1] if idle else None

    def read_set(self, draining: bool) -> dict[str, bytes | str]:
        if not draining:
            return dict(self.last_ids)
        # draining: only sessions in the middle of a trial are still served
        return {s: i for s, i in self.last_ids.items()
                if s in self.session_of and self.routes[self.session_of[s]].trial_open}

    def open_trials(self) -> int:
        return sum(r.trial_open for r in self.routes.values())


class Router:
    """The main process: reads every request stream, hands each request to its session's worker."""

    def __init__(self, settings: ServerSettings, core: DecodingCore):
        self.settings = settings
        self.r: redis.Redis | None = None
        self.sessions = SessionTable(settings)
        self.workers = ServerWorkers(settings, core, on_lost=self.on_lost)
        self.stopping = False
        self.stop_deadline = 0.0
        self.read_ns = 0  # when the last XREAD returned (CLOCK_MONOTONIC ns, for the hop trace)

    # ---- sessions
    def add_route(self, name: str, start_id: str) -> Route:
        owner = self.workers.least_loaded()
        route = self.sessions.add(name, start_id, owner.index)
        owner.sessions.add(name)
        self.workers.send(owner.index, self.workers.new_job(name, OPEN))
        return route

    def drop_route(self, name: str) -> None:
        route = self.sessions.remove(name)
        if route is None:
            return
        self.workers.workers[route.owner].sessions.discard(name)
        self.workers.send(route.owner, self.workers.new_job(name, DROP))
        if route.registrations and self.r is not None:
            self.r.xdel(P.SESSIONS_STREAM, *route.registrations)

    def make_room(self) -> bool:
        """At the session limit, forget the longest-idle session without a trial under way."""
        if len(self.sessions.routes) < self.settings.max_sessions:
            return True
        name = self.sessions.idle_victim()
        if name is None:
            return False
        log.warning("session limit %d reached: forgetting idle session %r", self.settings.max_sessions, name)
        self.drop_route(name)
        return True

    def on_registration(self, entry: Entry, start_id: str | None) -> None:
        assert self.r is not None
        raw_name = entry.fields.get(P.SESSION_FIELD)
        name = P.text(raw_name)
        action = P.text(entry.fields.get(P.ACTION_FIELD), "open")
        request_id = P.text(entry.fields.get(P.REQUEST_ID_FIELD)) or None
        try:
            P.check_session_name(name)
        except P.ProtocolError as exc:
            log.warning("registration refused: %s", exc)
            pipe = self.r.pipeline(transaction=True)
            pipe.xdel(P.SESSIONS_STREAM, entry.entry_id)
            if action != "close":  # the client waits on NAME:remote_lm_done_opening, whatever NAME is
                pipe.xadd(P.done_opening_stream(raw_name),
                          P.with_request_id({P.DONE_FIELD: 0, P.ERROR_FIELD: str(exc)}, request_id))
            pipe.execute()
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
        route = self.sessions.routes.get(name)
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
        name = self.sessions.session_of[entry.stream]
        kind = self.sessions.kind_of[entry.stream]
        route = self.sessions.routes[name]
        route.last_active = time.monotonic()
        if kind in (P.Kind.RESET, P.Kind.LOGITS):
            route.trial_open = True
        elif kind is P.Kind.FINALIZE:
            route.trial_open = False
        self.workers.send(route.owner, self.workers.new_job(name, kind.value, entry.stream, entry.entry_id,
                                                            entry.fields, self.read_ns))

    def on_lost(self, job: Job) -> None:
        """A request a dead worker held: its trial's state is gone; the client gets an error."""
        route = self.sessions.routes.get(job.session)
        if route is None or job.kind not in {k.value for k in P.Kind}:
            return
        route.trial_open = False
        if self.r is None:
            return
        message = "server worker died while serving this request; trial state lost: reset and send the trial again"
        try:
            pipe = self.r.pipeline(transaction=True)
            for stream, fields in P.error_reply(route.streams, P.Kind(job.kind), message, job.request_id):
                pipe.xadd(stream, fields)
            pipe.xdel(job.stream, job.entry_id)
            pipe.execute()
        except CONNECTION_ERRORS:
            log.error("could not send an error reply (Redis unreachable): %s", message)

    def dispatch(self, entries: list[Entry]) -> None:
        with self.workers.batch():  # what one read returned reaches each worker as one message
            for e in entries:
                self.sessions.last_ids[e.stream] = e.entry_id
                if e.stream == P.SESSIONS_STREAM:
                    self.on_registration(e, None)
                elif e.stream in self.sessions.session_of:
                    self.on_request(e)

    # ---- connection
    def connect(self) -> bool:
        """(Re)connect; on the first connection learn the time and the registered sessions."""
        first = self.r is None and not self.sessions.last_ids
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
            self.sessions.last_ids[P.SESSIONS_STREAM] = "0-0"
            for eid, fields in r.xrange(P.SESSIONS_STREAM):  # sessions registered before this server started
                self.sessions.last_ids[P.SESSIONS_STREAM] = eid
                self.on_registration(Entry(P.SESSIONS_STREAM, eid, P.fields_text(fields)), now)
        else:
            for name, route in self.sessions.routes.items():
                self.workers.send(route.owner, self.workers.new_job(name, REFRESH))
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
        else:  # a second signal: stop now, answering what is still under way with an error
            log.info("signal %d again: answering the requests under way with an error, then exiting", signum)
            self.stop_deadline = time.monotonic()

    def drained(self) -> bool:
        if time.monotonic() > self.stop_deadline:
            log.warning("drain timeout: exiting with %d trial(s) unfinished", self.sessions.open_trials())
            return True
        return not self.workers.inflight and not self.sessions.read_set(draining=True)

    def answer_unfinished(self, reason: str) -> int:
        """Before exiting: an error reply to every request that was read and not answered, and to
        every request already waiting in the streams of a trial under way (its client waits for
        them). Called with the workers stopped, so no reply can follow. Returns how many."""
        jobs = [job for _owner, job in self.workers.inflight.values() if job.kind in {k.value for k in P.Kind}]
        self.workers.inflight.clear()
        if not jobs and not self.sessions.open_trials():
            return 0
        if self.r is None:
            try:  # not self.connect(): that would hand the (stopped) workers a refresh
                self.r = connect(self.settings.address, timeout=self.settings.socket_timeout)
            except CONNECTION_ERRORS:
                pass
        if self.r is None:
            log.error("%d request(s) left unanswered: Redis is unreachable", len(jobs))
            return 0
        message = f"the LM server stopped ({reason}) before serving this request: send the trial again"
        answered = 0
        try:
            for job in jobs:
                route = self.sessions.routes.get(job.session)
                # a worker killed between its reply and its acknowledgement: the reply deleted the entry
                if route is None or not self.r.xrange(job.stream, job.entry_id, job.entry_id):
                    continue
                answered += self._answer(route.streams, P.Kind(job.kind), job.stream, job.entry_id,
                                         job.request_id, message)
            # requests of open trials not read yet (they may have arrived after the drain's last read)
            waiting = self.sessions.read_set(draining=True)
            result = self.r.xread(waiting, count=100_000) if waiting else []
            for e in ordered_entries(result or [], 100_000, {}, self.sessions.kind_of):
                route = self.sessions.routes[self.sessions.session_of[e.stream]]
                request_id = P.text(e.fields.get(P.REQUEST_ID_FIELD)) or None
                answered += self._answer(route.streams, self.sessions.kind_of[e.stream], e.stream, e.entry_id,
                                         request_id, message)
        except CONNECTION_ERRORS as exc:
            log.error("could not answer every unfinished request (Redis unreachable: %s)", exc)
        if answered:
            log.warning("answered %d unfinished request(s) with an error", answered)
        return answered

    def _answer(self, streams: P.Streams, kind: P.Kind, stream: str, entry_id: bytes, request_id: str | None,
                message: str) -> int:
        assert self.r is not None
        pipe = self.r.pipeline(transaction=True)
        for reply_stream, fields in P.error_reply(streams, kind, message, request_id):
            pipe.xadd(reply_stream, fields)
        pipe.xdel(stream, entry_id)
        pipe.execute()
        return 1

    def check_workers(self) -> None:
        fatal = self.workers.check()
        if fatal:
            raise B2txtError(fatal)

    def step(self) -> None:
        """One blocking read and the dispatch of what it returned."""
        streams = self.sessions.read_set(self.stopping)
        if not streams:  # draining, nothing left to read: wait for the workers to finish
            self.workers.collect_done(timeout=self.settings.block_ms / 1000)
            return
        assert self.r is not None
        try:
            result = self.r.xread(streams, count=READ_COUNT, block=self.settings.block_ms)
            self.read_ns = time.monotonic_ns()  # the hop trace's "read"
        except CONNECTION_ERRORS as exc:
            log.error("lost the Redis connection (%s)", exc)
            self.r.close()
            self.r = None
            self.wait_for_redis()
            return
        self.workers.collect_done()
        self.check_workers()  # a worker that died while idle is replaced before it is handed work
        if result:
            try:
                self.dispatch(ordered_entries(result, READ_COUNT, self.sessions.session_of, self.sessions.kind_of))
            except CONNECTION_ERRORS as exc:  # registration replies: the client re-opens on its timeout
                log.error("lost the Redis connection while dispatching (%s)", exc)
                self.r = None
                self.wait_for_redis()

    def run(self) -> int:
        old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        reason = "an error"
        try:
            self.workers.start()
            log.info("%d worker(s) started; decoding with %s on %s", len(self.workers.workers),
                     self.settings.params.decode.decoder, self.settings.lm_dir)
            if self.wait_for_redis():
                while not (self.stopping and self.drained()):
                    self.step()
                    self.workers.collect_done()
                    self.check_workers()
            reason = "signalled; drain timeout" if self.stopping else "stopped"
            return 0
        finally:
            # drained: nothing is in flight, the workers exit at once; else stop them now, then answer
            # what they held (every request read gets a reply, a result or this error)
            self.workers.shutdown(kill=bool(self.workers.inflight) or self.sessions.open_trials() > 0)
            self.answer_unfinished(reason)
            if self.r is not None:
                self.r.close()
            log.info("LM server stopped")
            for s, handler in old.items():
                signal.signal(s, handler)


def serve(settings: ServerSettings) -> int:
    """Load the decoder (once, before forking the workers) and serve until SIGTERM."""
    t0 = time.perf_counter()
    core = DecodingCore(settings.lm_dir, settings.params.decode).load()
    log.info("%s decoder on %s loaded in %.1f s", settings.params.decode.decoder, settings.lm_dir,
             time.perf_counter() - t0)
    return Router(settings, core).run()
