"""``b2txt evaluate``'s session mode: a private redis-server and ``b2txt lm-server``, and the trials
sent over the published protocol from several client sessions at once.

No trial is lost or duplicated when things fail mid-run:

- a monitor thread (:class:`.Supervisor`) owns both children: it restarts whichever dies
  (bounded) and bumps a *generation* counter; a client waiting on a reply from the old
  generation gives up at once and re-sends its trial (re-opening its session first), instead
  of waiting out its timeout;
- a reply that does not come within ``timeout`` also gets the trial re-sent;
- replies are matched to requests by ``request_id``, so a late reply to an abandoned attempt
  is never taken for another trial's; results are stored by trial index, once.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..ground.console import Log, progress
from ..ground.errors import B2txtError
from . import protocol as P
from .client import LMAborted, LMClient, LMServerError, LMTimeout
from .connection import CONNECTION_ERRORS, RedisAddress, connect
from .evaluate_common import EvalSettings, ModeRun, TrialOutcome
from .redis_process import RedisServer
from .supervisor import Supervisor, decoder_config


class Services(Supervisor):
    """redis-server + lm-server on a Unix socket of the run directory (see :class:`Supervisor`)."""

    def __init__(self, run_dir: Path, settings: EvalSettings, log: Log):
        super().__init__(run_dir, RedisServer(run_dir), settings.max_restarts, ["lm-server"], log, "b2txt-services")
        self.settings = settings

    @property
    def address(self) -> RedisAddress:
        return self.redis.address

    def _start_children(self) -> None:
        self._start_redis()
        self._start_child("lm-server")

    def _start_child(self, name: str) -> None:
        """Start lm-server; its options appearing on remote_lm_args (deleted first) say it is serving."""
        s = self.settings
        try:
            connect(self.redis.address, timeout=5).delete(P.ARGS)
        except CONNECTION_ERRORS:
            pass  # Redis is being restarted too: it comes back empty
        config = decoder_config(self.run_dir / "lm-server-config.yaml", s.options, s.rescore)
        self._spawn(name, name, ["lm-server", "--lm_path", str(s.lm_dir), "--redis-socket", str(self.redis.socket),
                                 "--password-env", self.redis.password_env, "--workers", str(s.n_workers),
                                 "--config", str(config), "--alpha", str(s.alpha), "--log-level", s.server_log_level])


class TrialRunner:
    """Sends trials from ``n_sessions`` threads (one client session each) until all are answered."""

    def __init__(self, address: RedisAddress, settings: EvalSettings, n_sessions: int,
                 generation: Callable[[], int], failed: Callable[[], str | None], log: Log):
        self.address = address
        self.settings = settings
        self.n_sessions = n_sessions
        self.generation = generation
        self.failed = failed
        self.log = log
        self.results: dict[int, TrialOutcome] = {}
        self.error: str | None = None
        self.lock = threading.Lock()
        self.todo: queue.Queue[int] = queue.Queue()
        self.tag = uuid.uuid4().hex[:6]

    def run(self, logits: dict[int, np.ndarray]) -> dict[int, TrialOutcome]:
        for index in logits:
            self.todo.put(index)
        bar = progress(desc="evaluate", total=len(logits), unit="trial")
        threads = [threading.Thread(target=self._session, args=(k, logits, bar), name=f"b2txt-eval-{k}", daemon=True)
                   for k in range(max(self.n_sessions, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bar.close()
        reason = self._stop_reason()
        if reason is not None:
            raise B2txtError(reason)
        missing = sorted(set(logits) - set(self.results))
        if missing:
            raise B2txtError(f"{len(missing)} trial(s) got no answer, e.g. {missing[:5]}")
        return self.results

    def _stop_reason(self) -> str | None:
        return self.error or self.failed()

    def _connect(self, session: str | None) -> LMClient:
        """A client, waiting (bounded) while Redis is away (e.g. being restarted)."""
        deadline = time.monotonic() + self.settings.startup_timeout
        delay = 0.05
        while True:
            try:
                return LMClient(self.address, session=session, timeout=self.settings.timeout)
            except CONNECTION_ERRORS as exc:
                if time.monotonic() > deadline or self._stop_reason():
                    raise B2txtError(f"cannot reach Redis at {self.address}: {exc}") from None
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    def _session(self, k: int, logits: dict[int, np.ndarray], bar: Any) -> None:
        session = f"eval-{self.tag}-{k}" if self.n_sessions > 0 else None
        client: LMClient | None = None
        opened_generation = -1
        try:
            while self._stop_reason() is None:
                try:
                    index = self.todo.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                attempts, failures = 0, 0
                while True:
                    if self._stop_reason():
                        return
                    attempts += 1
                    generation = self.generation()
                    try:
                        if client is None:
                            client = self._connect(session)
                        client.abort = lambda g=generation: self.generation() != g or self._stop_reason() is not None
                        if opened_generation != generation:
                            client.open(timeout=self.settings.startup_timeout)
                            opened_generation = generation
                        result = client.decode(logits[index], self.settings.chunk_frames)
                        break
                    except LMAborted:
                        continue  # a child was restarted: send again at once
                    except CONNECTION_ERRORS:
                        if client is not None:
                            client.close()
                        client, opened_generation = None, -1
                        continue  # Redis went away: reconnect (bounded by startup_timeout) and send again
                    except (LMTimeout, LMServerError) as exc:
                        failures += 1
                        opened_generation = -1
                        if failures >= self.settings.max_attempts:
                            self.error = f"trial {index}: no result after {failures} failed attempts: {exc}"
                            return
                        self.log(f"trial {index}: {exc}; sending it again")
                with self.lock:
                    if index not in self.results:
                        self.results[index] = TrialOutcome(result, attempts, time.perf_counter() - t0)
                        bar.update(1)
        except B2txtError as exc:
            self.error = self.error or str(exc)
        finally:
            if client is not None:
                try:
                    client.close_session()
                    client.close()
                except CONNECTION_ERRORS:
                    pass



def run_sessions(run_dir: Path, settings: EvalSettings, logits: dict[int, np.ndarray], log: Log) -> ModeRun:
    """Every trial through the LM server (ours in ``run_dir``, or the one behind ``settings.external``)."""
    n_sessions = settings.sessions if settings.sessions is not None else 2 * settings.n_workers
    services: Services | None = None
    t0 = time.perf_counter()
    try:
        if settings.external is None:
            services = Services(run_dir, settings, log)
            services.start()
            address = services.address
            log(f"redis-server on {address}, lm-server with {settings.n_workers} worker(s) (run dir {run_dir})")
        else:
            address = settings.external
        svc = services
        runner = TrialRunner(address, settings, n_sessions, generation=lambda: svc.generation if svc else 0,
                             failed=lambda: svc.failed if svc else None, log=log)
        outcomes = runner.run(logits)
        seconds = time.perf_counter() - t0
        restarts = dict(services.restarts) if services else {}
    finally:
        if services is not None:
            services.stop()
    return ModeRun(outcomes, seconds, restarts,
                   {"sessions": n_sessions, "workers": settings.n_workers if settings.external is None else None})
