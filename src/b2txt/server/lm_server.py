"""The LM server: the published stream protocol (REFERENCE §5), served by N decoding processes.

This module holds what its parts share (settings, jobs, replies); the parts are
:mod:`.router` (the main process), :mod:`.worker_processes` (starting and replacing the
processes) and :mod:`.decoding_worker` (what one worker process does, through the decoding core).

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
  ``drain_timeout``; a second signal ends the wait), stops the workers, answers every request
  still unanswered (read, or waiting in an open trial's streams) with an error, and exits 0.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from ..ground.config import RescoreConfig
from ..lm.nbest import NBest, scoring_string
from . import protocol as P
from .connection import CONNECTION_ERRORS, RedisAddress, connect

log = logging.getLogger("b2txt.server")

DEFAULT_SESSION = ""
#: Reply entries: (stream, fields).
Replies = list[tuple[str, dict[str, Any]]]


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
    #: append one JSON line per served request with the CLOCK_MONOTONIC time (ns) of each hop
    #: (:class:`HopTrace`; where the Redis path's latency goes, benchmarks/server.py --hops)
    trace: Path | None = None
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
    #: CLOCK_MONOTONIC ns when the router's read returned this entry, and when the worker got it
    #: (for the hop trace; one clock for every process of the machine)
    t_read: int = 0
    t_recv: int = 0

    @property
    def request_id(self) -> str | None:
        return P.text(self.fields.get(P.REQUEST_ID_FIELD)) or None


# control kinds (router -> worker); request kinds are protocol.Kind values
OPEN, DROP, REFRESH = "open", "drop", "refresh"

# ============================================================================ hop trace

class HopTrace:
    """Per-request hop times of one worker, one JSON line per request (``--trace FILE``).

    ``read``: the router's XREAD returned the entry; ``recv``: the worker took it off its pipe;
    ``start``: its handler began; the handler's own marks (``context``, ``decoded`` for a
    finalize); ``replied``: its reply was written. All CLOCK_MONOTONIC ns, comparable with a
    client's ``time.monotonic_ns()`` on the same machine. Off (``None`` path): marks cost one
    attribute test."""

    def __init__(self, path: Path | None, worker: int):
        self.file = open(path, "a", buffering=1) if path is not None else None  # noqa: SIM115 - closed with the process
        self.worker = worker
        self.marks: dict[str, int] = {}

    def begin(self, job: Job) -> None:
        if self.file is not None:
            self.marks = {"read": job.t_read, "recv": job.t_recv, "start": time.monotonic_ns()}

    def mark(self, name: str) -> None:
        if self.file is not None:
            self.marks[name] = time.monotonic_ns()

    def end(self, job: Job) -> None:
        if self.file is not None:
            self.marks["replied"] = time.monotonic_ns()
            self.file.write(json.dumps({"worker": self.worker, "session": job.session, "kind": job.kind,
                                        "request_id": job.request_id, **self.marks}) + "\n")


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

    def reply(self, entries: list[tuple[str, dict[str, Any]]],
              consumed: tuple[str, bytes] | list[tuple[str, bytes]] | None) -> None:
        """Write ``entries`` and delete the request entries ``consumed`` they answer, in one MULTI/EXEC."""
        answered = [consumed] if isinstance(consumed, tuple) else consumed or []

        def write(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=True)
            for stream, fields in entries:
                pipe.xadd(stream, fields)
            for stream, entry_id in answered:
                if entry_id:
                    pipe.xdel(stream, entry_id)
            pipe.execute()

        self.call(write)


def final_reply(streams: P.Streams, nbest: NBest, context: str,
                request_id: str | None) -> Replies:
    """The final result and the finalize acknowledgement (written together)."""
    final = {P.FINAL_FIELD: nbest.best, P.SCORING_FIELD: scoring_string(nbest), P.CONTEXT_FIELD: context}
    return [(streams.final, P.with_request_id(final, request_id)),
            (streams.done_finalizing, P.with_request_id({P.DONE_FIELD: 1}, request_id))]


