"""A client of the LM server: one trial at a time, as the published phoneme decoder does it.

A trial is reset → logits (one or more chunks, each answered by a partial result) → finalize
→ final result (REFERENCE §5). Every request carries a ``request_id`` and a reply is taken
only when it echoes that id (or carries none, as a published server's replies do): after a
timeout and a re-send, a late reply to the abandoned attempt is skipped instead of being
taken for the next trial's. Reply entries this client has read are deleted (it is their only
reader), so its streams stay small over thousands of trials.

With ``session`` set the client uses the sessions extension (:mod:`b2txt.server.protocol`):
its own prefixed streams, so many clients can decode at once on one server.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from ..ground.errors import B2txtError
from ..lm.nbest import NBest, parse_scoring
from . import protocol as P
from .connection import RedisAddress, connect, server_time_ms


class LMServerError(B2txtError):
    """The server answered a request with an ``error`` field."""


class LMTimeout(B2txtError):
    """No reply within the timeout (the server is down, restarting or overloaded)."""


class LMAborted(B2txtError):
    """The caller's ``abort`` callback asked to give up waiting (e.g. the server was restarted)."""


@dataclass(frozen=True)
class FinalResult:
    sentence: str
    nbest: NBest
    context: str


class LMClient:
    """Speaks the protocol for one session ('' or None: the published default session)."""

    def __init__(self, address: RedisAddress, session: str | None = None, timeout: float = 60.0,
                 trim: bool = True, abort: Callable[[], bool] | None = None, slice_ms: int = 250):
        self.address = address
        self.streams = P.Streams(P.check_session_name(session) if session else "")
        self.session = session or ""
        self.timeout = timeout
        self.trim = trim
        self.abort = abort
        self.slice_ms = slice_ms
        self._ids = itertools.count(1)
        self._tag = uuid.uuid4().hex[:8]
        self.r: redis.Redis = connect(address, timeout=slice_ms / 1000 + 10.0)
        self._last: dict[str, str] = {}
        self._consumed: dict[str, list[bytes]] = {}  # read replies, deleted with the next pipelined send
        self._opened = False
        self.mark_now()

    def close(self) -> None:
        self.r.close()

    def reconnect(self) -> None:
        self.r.close()
        self.r = connect(self.address, timeout=self.slice_ms / 1000 + 10.0)

    def mark_now(self) -> None:
        """Read every reply stream from now on (as published: from the server's clock)."""
        start = P.id_before_ms(server_time_ms(self.r))
        s = self.streams
        for stream in (s.partial, s.final, s.done_resetting, s.done_finalizing, s.done_updating_params,
                       s.done_opening):
            self._last[stream] = start

    # ---- plumbing
    def _open_hint(self) -> str:
        """A session's streams are read only once it is open: say so when this client never opened it."""
        return "" if not self.session or self._opened else " the session was never opened: call open() first"

    def _new_id(self) -> str:
        return f"{self._tag}-{next(self._ids)}"

    def _send(self, stream: str, fields: dict[str, Any]) -> str:
        request_id = self._new_id()
        self.r.xadd(stream, {**fields, P.REQUEST_ID_FIELD: request_id})
        return request_id

    def _wait(self, stream: str, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The reply to ``request_id`` on ``stream``; skips (and deletes) anything else."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self.abort is not None and self.abort():
                raise LMAborted(f"gave up waiting on {stream}")
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise LMTimeout(f"no reply on {stream} within {self.timeout if timeout is None else timeout:.0f} s "
                                f"(is the LM server running on {self.address}?{self._open_hint()})")
            got = self.r.xread({stream: self._last[stream]}, count=100, block=max(1, min(self.slice_ms, left_ms)))
            if not got:
                continue
            found: dict[str, Any] | None = None
            seen = []
            for entry_id, raw in got[0][1]:
                self._last[stream] = P.text(entry_id)
                seen.append(entry_id)
                fields = P.fields_text(raw)
                rid = P.text(fields.get(P.REQUEST_ID_FIELD))
                if found is None and rid in ("", request_id):
                    found = fields
            if self.trim:
                self.r.xdel(stream, *seen)
            if found is not None:
                if P.ERROR_FIELD in found:
                    raise LMServerError(P.text(found[P.ERROR_FIELD]))
                return found

    # ---- protocol
    def open(self, timeout: float | None = None) -> None:
        """Register the session and wait for the server's answer.

        The default session has no registration: wait instead until the server has put its
        options on ``remote_lm_args`` (as a published server does when it starts).
        """
        if not self.session:
            self._wait_for_args(self.timeout if timeout is None else timeout)
            return
        rid = self._send(P.SESSIONS_STREAM, {P.SESSION_FIELD: self.session, P.ACTION_FIELD: "open"})
        self._opened = True
        self._wait(self.streams.done_opening, rid, timeout)

    def _wait_for_args(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.r.xlen(self.streams.args):
            if self.abort is not None and self.abort():
                raise LMAborted("gave up waiting for the LM server")
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise LMTimeout(f"no LM server answered on {self.address} within {timeout:.0f} s")
            self.r.xread({self.streams.args: "0-0"}, count=1, block=max(1, min(self.slice_ms, left_ms)))

    def close_session(self) -> None:
        if self.session:
            self.r.xadd(P.SESSIONS_STREAM, {P.SESSION_FIELD: self.session, P.ACTION_FIELD: "close"})

    def reset(self) -> None:
        rid = self._send(self.streams.reset, {P.DONE_FIELD: 1})
        self._wait(self.streams.done_resetting, rid)

    def send_logits(self, logits: np.ndarray) -> str:
        """One chunk (``[T, 41]``, LM column order); returns the partial result."""
        rid = self._send(self.streams.input, P.logits_fields(logits))
        return P.text(self._wait(self.streams.partial, rid).get(P.PARTIAL_FIELD))

    def finalize(self) -> FinalResult:
        rid = self._send(self.streams.finalize, {P.DONE_FIELD: 1})
        final = self._wait(self.streams.final, rid)
        self._wait(self.streams.done_finalizing, rid)
        return FinalResult(P.text(final.get(P.FINAL_FIELD)), parse_scoring(P.text(final.get(P.SCORING_FIELD))),
                           P.text(final.get(P.CONTEXT_FIELD)))

    def decode(self, logits: np.ndarray, chunk_frames: int | None = None) -> FinalResult:
        """A whole trial: reset, the logits (in chunks of ``chunk_frames``), finalize.

        Without chunks the three requests go out in one pipelined round trip (the server orders
        a session's requests by millisecond and kind, so reset < logits < finalize holds) and
        the four replies are collected as they come: the Redis path adds the least latency.
        """
        if not chunk_frames or chunk_frames >= len(logits):
            return self._decode_pipelined(logits)
        self.reset()
        step = chunk_frames
        for start in range(0, len(logits), max(step, 1)):
            self.send_logits(logits[start:start + step])
        return self.finalize()

    def _decode_pipelined(self, logits: np.ndarray) -> FinalResult:
        s = self.streams
        rid = self._new_id()
        # MULTI/EXEC: the server's blocked read sees the three requests together, never the logits
        # without their finalize, so the trial takes the one-pass path
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(s.reset, {P.DONE_FIELD: 1, P.REQUEST_ID_FIELD: rid})
        pipe.xadd(s.input, {**P.logits_fields(logits), P.REQUEST_ID_FIELD: rid})
        pipe.xadd(s.finalize, {P.DONE_FIELD: 1, P.REQUEST_ID_FIELD: rid})
        for stream, ids in self._consumed.items():
            pipe.xdel(stream, *ids)
        self._consumed = {}
        pipe.execute()
        replies = self._wait_all([s.done_resetting, s.partial, s.final, s.done_finalizing], rid)
        final = replies[s.final]
        return FinalResult(P.text(final.get(P.FINAL_FIELD)), parse_scoring(P.text(final.get(P.SCORING_FIELD))),
                           P.text(final.get(P.CONTEXT_FIELD)))

    def _wait_all(self, streams: list[str], request_id: str) -> dict[str, dict[str, Any]]:
        """The replies to ``request_id`` on every stream of ``streams`` (read together); deletes deferred."""
        deadline = time.monotonic() + self.timeout
        found: dict[str, dict[str, Any]] = {}
        while len(found) < len(streams):
            if self.abort is not None and self.abort():
                raise LMAborted("gave up waiting for a trial's replies")
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                missing = [x for x in streams if x not in found]
                raise LMTimeout(f"no reply on {', '.join(missing)} within {self.timeout:.0f} s "
                                f"(is the LM server running on {self.address}?{self._open_hint()})")
            want = {x: self._last[x] for x in streams if x not in found}
            for stream_name, items in self.r.xread(want, count=100, block=max(1, min(self.slice_ms, left_ms))) or []:
                stream = P.text(stream_name)
                for entry_id, raw in items:
                    self._last[stream] = P.text(entry_id)
                    if self.trim:
                        self._consumed.setdefault(stream, []).append(entry_id)
                    fields = P.fields_text(raw)
                    if stream not in found and P.text(fields.get(P.REQUEST_ID_FIELD)) in ("", request_id):
                        if P.ERROR_FIELD in fields:
                            raise LMServerError(P.text(fields[P.ERROR_FIELD]))
                        found[stream] = fields
        return found

    def update_params(self, **params: Any) -> dict[str, str]:
        """Change decoder options (published or our names); returns the options now in force."""
        rid = self._send(self.streams.update_params, {k: str(v) for k, v in params.items()})
        self._wait(self.streams.done_updating_params, rid)
        return self.args()

    def args(self) -> dict[str, str]:
        entries = self.r.xrevrange(self.streams.args, count=1)
        return {P.text(k): P.text(v) for k, v in entries[0][1].items()} if entries else {}

    def set_context(self, context: str) -> None:
        self.r.set(self.streams.context_key, context)
