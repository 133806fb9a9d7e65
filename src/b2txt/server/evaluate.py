"""Evaluation through the LM server: a logits file in, decoded sentences and scores out.

:func:`evaluate` starts a private ``redis-server`` (Unix socket in the run directory, no
persistence) and ``lm-server`` as children that die with this process even when it is
SIGKILLed, sends every trial over the published protocol from several sessions at once,
and writes the same ``decoded.csv`` / ``nbest.jsonl`` as ``b2txt decode`` plus
``submission.csv``, WER and PER tables.

No trial is lost or duplicated when things fail mid-run:

- a monitor thread owns both children: it restarts whichever dies (bounded) and bumps a
  *generation* counter; a client waiting on a reply from the old generation gives up at
  once and re-sends its trial (re-opening its session first), instead of waiting out its
  timeout;
- a reply that does not come within ``timeout`` also gets the trial re-sent;
- replies are matched to requests by ``request_id``, so a late reply to an abandoned attempt
  is never taken for another trial's; results are stored by trial index, once.

With ``group_workers`` or ``external_workers`` (the consumer-group mode, :mod:`.group`) the
trials go instead, whole, onto a Redis stream that ``b2txt lm-worker`` processes on any host
share; the outputs are the same files.
"""

from __future__ import annotations

import json
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.decoded import decoded_row
from ..data.logits import LogitsTrial, read_logits
from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.console import progress
from ..ground.errors import B2txtError
from ..ground.fileio import atomic_dir, write_text_atomic
from ..lm.core import trial_logits
from . import protocol as P
from .client import FinalResult, LMAborted, LMClient, LMServerError, LMTimeout
from .connection import CONNECTION_ERRORS, PASSWORD_ENV, RedisAddress, TlsFiles, connect
from .redis_process import RedisServer
from .supervisor import Supervisor, decoder_config

Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalSettings:
    logits: Path
    lm_dir: Path
    out: Path
    options: DecodeConfig = field(default_factory=DecodeConfig)
    rescore: RescoreConfig | None = None
    alpha: float = 0.55
    sessions: int | None = None  # None: 2 x workers; 0: the published default session only
    timeout: float = 60.0
    startup_timeout: float = 600.0
    max_attempts: int = 5
    chunk_frames: int | None = None
    run_dir: Path | None = None
    external: RedisAddress | None = None
    split: str | None = None
    max_restarts: int = 5
    server_log_level: str = "warning"
    workers: int | None = None
    # consumer-group mode (b2txt.server.group): whole trials shared by lm-worker processes
    group_workers: int = 0  # local lm-worker processes
    external_workers: bool = False  # workers started elsewhere take trials too (or only they do)
    queue: str = "b2txt:batch"
    claim_idle_ms: int = 60_000
    max_deliveries: int = 5
    window: int = 1024  # trials on the queue at once
    bind: str | None = None  # the private redis-server also listens on bind:port (for other hosts)
    port: int = 0
    tls: TlsFiles | None = None  # ... and speaks TLS there
    password_env: str = PASSWORD_ENV

    @property
    def n_workers(self) -> int:
        from ..ground.device import available_cores

        return self.workers or self.options.workers or available_cores()

    @property
    def group_mode(self) -> bool:
        return self.group_workers > 0 or self.external_workers


# ============================================================================ services

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


# ============================================================================ sending trials

@dataclass
class TrialOutcome:
    result: FinalResult
    attempts: int
    seconds: float


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


# ============================================================================ the evaluation

def decoded_table(trials: list[LogitsTrial], outcomes: dict[int, TrialOutcome]) -> pd.DataFrame:
    """One row per trial: the columns of ``b2txt decode``'s decoded.csv, + latency and attempts."""
    rows = []
    for i, t in enumerate(trials):
        o = outcomes.get(i)
        row = decoded_row(i, t, o.result.sentence if o else "", len(o.result.nbest) if o else 0)
        rows.append(row | {"decode_ms": round(1000 * o.seconds, 3) if o else 0.0, "attempts": o.attempts if o else 0})
    return pd.DataFrame(rows)


def write_outputs(tmp: Path, trials: list[LogitsTrial], table: pd.DataFrame,
                  outcomes: dict[int, TrialOutcome], split: str) -> dict[str, Any]:
    from ..evaluation.error_rates import phoneme_table
    from ..evaluation.reports import write_scores, write_submission, write_word_scores

    # decoded.csv is deterministic (the same file as `b2txt decode` writes); latency and
    # re-sends vary from run to run, so they go to timing.csv
    table.drop(columns=["decode_ms", "attempts"]).to_csv(tmp / "decoded.csv", index=False)
    table[["trial", "session", "decode_ms", "attempts"]].to_csv(tmp / "timing.csv", index=False)
    with open(tmp / "nbest.jsonl", "w") as f:
        for i, row in table.iterrows():
            o = outcomes.get(int(row["trial"]))
            cands = [list(c) for c in o.result.nbest.candidates] if o else []
            f.write(json.dumps({"trial": int(row["trial"]), "session": row["session"], "candidates": cands}) + "\n")
    write_submission(table, tmp / "submission.csv")
    metrics: dict[str, Any] = {"WER": None, "PER": None}
    if (table["reference"].astype(str).str.strip() != "").any():
        metrics["WER"] = write_word_scores(table, tmp, split)["WER"]
    phonemes = phoneme_table(trials)
    if len(phonemes):
        metrics["PER"] = write_scores(phonemes, tmp, split)["PER"]
    return metrics


def _run_dir(settings: EvalSettings) -> tuple[Path, bool]:
    """(run directory, whether to remove it afterwards); short enough for a Unix socket path."""
    if settings.run_dir is not None:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        return settings.run_dir.resolve(), False
    return Path(tempfile.mkdtemp(prefix="b2txt-eval-")), True


def evaluate(settings: EvalSettings, log: Log = print) -> dict[str, Any]:
    """Decode every trial of ``settings.logits`` through Redis; write ``settings.out``; return a summary."""
    trials = read_logits(settings.logits)
    if not trials:
        raise B2txtError(f"{settings.logits}: no trials")
    logits = trial_logits(trials, settings.logits)
    split = settings.split or str(trials[0].attrs.get("split", "") or "unknown")
    n_sessions = settings.sessions if settings.sessions is not None else 2 * settings.n_workers
    run_dir, remove = _run_dir(settings)
    try:
        return _evaluate_in(run_dir, settings, trials, logits, split, n_sessions, log)
    finally:
        if remove:  # a failure's message already carries the lm-server log tail
            shutil.rmtree(run_dir, ignore_errors=True)


def _evaluate_group(run_dir: Path, settings: EvalSettings, logits: dict[int, np.ndarray],
                    log: Log) -> tuple[dict[int, TrialOutcome], float, dict[str, int], dict[str, Any]]:
    """The consumer-group mode: (outcomes, seconds, restarts, summary fields)."""
    from collections import Counter

    from . import group as G

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
    hint = G.worker_hint(redis_server.network_address if redis_server else None, settings)
    pool: G.WorkerPool | None = None
    if redis_server is not None or settings.group_workers:
        worker_args = ["--lm_path", str(settings.lm_dir),
                       "--config", str(decoder_config(run_dir / "lm-worker-config.yaml", settings.options,
                                                      settings.rescore)),
                       "--alpha", str(settings.alpha), "--queue", settings.queue,
                       "--claim-idle-ms", str(settings.claim_idle_ms), "--max-deliveries", str(settings.max_deliveries),
                       "--log-level", settings.server_log_level]
        pool = G.WorkerPool(run_dir, redis_server, address, settings.group_workers, worker_args,
                            settings.max_restarts, log)
    collector = G.GroupCollector(address, settings.queue, G.options_json(settings.options, settings.alpha, do_opt),
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
            log("workers on other hosts: " + (hint or f"b2txt lm-worker --lm_path DIR {' '.join(G.address_args(address))} "
                                                      f"--queue {settings.queue}"))
        results = collector.run(logits, startup_timeout=settings.startup_timeout)
        seconds = time.perf_counter() - t0
        restarts = dict(pool.restarts) if pool else {}
    finally:
        if pool is not None:
            pool.stop()
    outcomes = {i: TrialOutcome(FinalResult(r.sentence, r.nbest, ""), r.deliveries, r.seconds)
                for i, r in results.items()}
    extra = {"mode": "consumer-group", "queue": settings.queue,
             "consumers": dict(sorted(Counter(r.worker for r in results.values()).items())),
             "claimed_trials": sum(r.deliveries > 1 for r in results.values()),
             "duplicate_results": collector.duplicates, "resent_after_redis_loss": collector.resends}
    return outcomes, seconds, restarts, extra


def _evaluate_in(run_dir: Path, settings: EvalSettings, trials: list[LogitsTrial], logits: dict[int, np.ndarray],
                 split: str, n_sessions: int, log: Log) -> dict[str, Any]:
    if settings.group_mode:
        outcomes, seconds, restarts, extra = _evaluate_group(run_dir, settings, logits, log)
        return _finish(run_dir, settings, trials, logits, split, outcomes, seconds, restarts,
                       {"sessions": None, "workers": settings.group_workers, **extra})
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
    return _finish(run_dir, settings, trials, logits, split, outcomes, seconds, restarts,
                   {"sessions": n_sessions, "workers": settings.n_workers if settings.external is None else None})


def _finish(run_dir: Path, settings: EvalSettings, trials: list[LogitsTrial], logits: dict[int, np.ndarray],
            split: str, outcomes: dict[int, TrialOutcome], seconds: float, restarts: dict[str, int],
            mode: dict[str, Any]) -> dict[str, Any]:
    """Write the outputs (the same files in every mode) and evaluation.json; return the summary."""
    table = decoded_table(trials, outcomes)
    with atomic_dir(settings.out) as tmp:
        metrics = write_outputs(tmp, trials, table, outcomes, split)
        summary = {
            "n_trials": len(trials), "n_sent": len(logits), "seconds": round(seconds, 3),
            "trials_per_second": round(len(logits) / max(seconds, 1e-9), 3),
            "resent_trials": int((table["attempts"] > 1).sum()), "restarts": restarts,
            "sessions": mode.pop("sessions"), "workers": mode.pop("workers"),
            "split": split, **metrics, **mode,
        }
        write_text_atomic(tmp / "evaluation.json", json.dumps(summary, indent=2) + "\n")
        for name in ("lm-server.log", "redis.log", *sorted(p.name for p in run_dir.glob("lm-worker-*.log"))):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, tmp / name)
    return summary
