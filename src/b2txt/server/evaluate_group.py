"""``b2txt evaluate``'s consumer-group mode: whole trials on the trial queue (:mod:`.trial_queue`),
decoded by ``b2txt lm-worker`` processes on this host (started and watched here) and on others.

The collector puts trials on the queue (a window of them at a time), keeps the first result of
each, counts duplicates, and sends every unanswered trial again if Redis lost its data. The
outputs are the same files as the session mode's.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from ..ground.console import Log, progress
from ..ground.errors import B2txtError
from ..lm.nbest import NBest, parse_scoring
from . import protocol as P
from . import trial_queue as Q
from .client import FinalResult
from .connection import CONNECTION_ERRORS, RedisAddress, connect, connect_error_message
from .evaluate_common import EvalSettings, ModeRun, TrialOutcome
from .redis_process import RedisServer
from .supervisor import Supervisor, decoder_config


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
        self.queue = Q.check_queue_name(queue)
        self.options = options
        self.log = log
        self.stall_timeout = stall_timeout
        self.window = max(1, window)
        self.failed = failed
        self.hint = hint
        self.job = uuid.uuid4().hex[:12]
        self.stream = Q.trials_stream(queue)
        self.reply_to = Q.results_stream(queue, self.job)
        self.key = Q.job_key(queue, self.job)
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
        self.r.set(self.key, "1", ex=Q.JOB_TTL_S)
        Q.ensure_group(self.r, self.queue)

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
                pipe.xadd(self.stream, {Q.JOB_FIELD: self.job, Q.TRIAL_FIELD: str(i), **P.logits_fields(
                    logits[i]), Q.OPTIONS_FIELD: self.options, Q.REPLY_TO_FIELD: self.reply_to})
            pipe.execute()
            outstanding.update(batch)

    def _consumers(self) -> str:
        try:
            assert self.r is not None
            rows = self.r.xinfo_consumers(self.stream, Q.GROUP)
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
                        self.r.expire(self.key, Q.JOB_TTL_S)
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
            trial = int(P.text(f.get(Q.TRIAL_FIELD)))
        except ValueError:
            self.log(f"result without a valid trial field ignored: {sorted(f)}")
            return
        if trial not in logits or P.text(f.get(Q.JOB_FIELD)) != self.job:
            return
        worker = P.text(f.get(Q.WORKER_FIELD), "?")
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
        self.results[trial] = GroupResult(P.text(f.get(Q.SENTENCE_FIELD)), nbest, worker,
                                          int(P.text(f.get(Q.DELIVERIES_FIELD), "1") or 1),
                                          float(P.text(f.get(Q.SECONDS_FIELD), "0") or 0))
        bar.update(1)


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


def run_group(run_dir: Path, settings: EvalSettings, logits: dict[int, np.ndarray], log: Log) -> ModeRun:
    """Every trial through the trial queue: local lm-workers (and those of other hosts)."""
    t0 = time.perf_counter()
    redis_server: RedisServer | None = None
    if settings.external is None:
        redis_server = RedisServer(run_dir, port=settings.port, password_env=settings.password_env,
                                   bind=settings.bind, tls=settings.tls)
        redis_server.check_bind()
        address = redis_server.address
    else:
        address = settings.external
    do_opt = bool(settings.rescore and settings.rescore.enabled)
    hint = worker_hint(redis_server.network_address if redis_server else None, settings)
    pool: WorkerPool | None = None
    if redis_server is not None or settings.group_workers:
        worker_args = ["--lm_path", str(settings.lm_dir),
                       "--config", str(decoder_config(run_dir / "lm-worker-config.yaml", settings.options,
                                                      settings.rescore)),
                       "--alpha", str(settings.alpha), "--queue", settings.queue,
                       "--claim-idle-ms", str(settings.claim_idle_ms), "--max-deliveries", str(settings.max_deliveries),
                       "--log-level", settings.server_log_level]
        pool = WorkerPool(run_dir, redis_server, address, settings.group_workers, worker_args,
                          settings.max_restarts, log)
    collector = GroupCollector(address, settings.queue, Q.options_json(settings.options, settings.alpha, do_opt),
                               log, stall_timeout=settings.startup_timeout, window=settings.window,
                               failed=lambda: pool.failed if pool else None, hint=hint)
    try:
        if pool is not None:
            pool.start()
        where = f"redis-server on {address}" if redis_server else f"Redis at {address}"
        if redis_server is not None and redis_server.network_address:
            where += f" and {redis_server.network_address}" + (" (TLS)" if settings.tls else "")
        log(f"{where}; {settings.group_workers} local lm-worker(s) on queue {settings.queue} (run dir {run_dir})")
        if settings.external_workers:
            log("workers on other hosts: " + (hint or f"b2txt lm-worker --lm_path DIR {' '.join(address_args(address))} "
                                                      f"--queue {settings.queue}"))
        results = collector.run(logits, startup_timeout=settings.startup_timeout)
        seconds = time.perf_counter() - t0
        restarts = dict(pool.restarts) if pool else {}
    finally:
        if pool is not None:
            pool.stop()
    outcomes = {i: TrialOutcome(FinalResult(r.sentence, r.nbest, ""), r.deliveries, r.seconds)
                for i, r in results.items()}
    return ModeRun(outcomes, seconds, restarts, {
        "sessions": None, "workers": settings.group_workers, "mode": "consumer-group", "queue": settings.queue,
        "consumers": dict(sorted(Counter(r.worker for r in results.values()).items())),
        "claimed_trials": sum(r.deliveries > 1 for r in results.values()),
        "duplicate_results": collector.duplicates, "resent_after_redis_loss": collector.resends})

