"""The trial queue: batch decoding by LM workers on many hosts, whole trials shared through a Redis
consumer group. This module is the queue's protocol (names, fields, the atomic answer, options);
the worker is :mod:`.lm_worker`, the evaluator's side :mod:`.evaluate_group`.

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
import socket
import time
from collections.abc import Callable

import redis

from ..ground.config import DecodeConfig
from ..ground.errors import B2txtError
from . import protocol as P
from .connection import CONNECTION_ERRORS, RedisAddress, connect, connect_error_message

log = logging.getLogger("b2txt.worker")

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

