"""The LM server's processes: N forked decoding workers and the optional LLM process.

The workers are forked after the core has loaded its graph, so they share it copy-on-write.
Each gets the requests of the sessions it owns through a pipe and acknowledges each finished
request on another; what is sent and not yet acknowledged is *in flight*. A worker that dies
is replaced at once: its sessions move to the successor, and its in-flight requests are handed
to ``on_lost`` (the router answers them with an error: the trial's state is gone).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from ..ground.errors import B2txtError
from ..lm.core import DecodingCore
from .decoding_worker import rescorer_main, worker_main
from .lm_server import OPEN, Job, ServerSettings

log = logging.getLogger("b2txt.server")

#: the LLM process's index in the in-flight table
LLM = -1


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


class ServerWorkers:
    """Starts, feeds, watches and replaces the worker processes (and the LLM process)."""

    def __init__(self, settings: ServerSettings, core: DecodingCore, on_lost: Callable[[Job], None]):
        self.settings = settings
        self.core = core
        self.on_lost = on_lost
        self.workers: list[WorkerHandle] = []
        self.inflight: dict[int, tuple[int, Job]] = {}  # seq -> (worker index, or LLM, job)
        self.seq = 0
        self.rescore_queue: Any | None = None
        self.rescorer: Any | None = None
        self.rescorer_done: Connection | None = None
        self.outbox: dict[int, list[Job]] | None = None  # inside batch(): jobs per worker, sent at its end

    # ---- starting
    def start(self) -> None:
        self._start_rescorer()
        self.workers = [self._start_worker(i) for i in range(self.settings.workers)]

    def _start_rescorer(self) -> None:
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

    def _start_worker(self, index: int) -> WorkerHandle:
        ctx = mp.get_context("fork")  # workers share the loaded graph copy-on-write
        jobs_r, jobs_w = ctx.Pipe(duplex=False)
        done_r, done_w = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker_main, name=f"b2txt-lm-worker-{index}", daemon=True,
                           args=(index, self.settings, self.core, jobs_r, done_w, self.rescore_queue))
        proc.start()
        jobs_r.close()
        done_w.close()
        grow_pipe(jobs_w)
        return WorkerHandle(index, proc, jobs_w, done_r)

    # ---- jobs
    def new_job(self, session: str, kind: str, stream: str = "", entry_id: bytes = b"",
                fields: dict[str, Any] | None = None, t_read: int = 0) -> Job:
        self.seq += 1
        return Job(self.seq, session, kind, stream, entry_id, fields or {}, t_read=t_read)

    def least_loaded(self) -> WorkerHandle:
        return min(self.workers, key=lambda w: (len(w.sessions), w.index))

    def send(self, index: int, job: Job) -> None:
        """Hand a job to worker ``index`` (inside :meth:`batch`: when the batch ends)."""
        if self.outbox is not None:
            self.outbox.setdefault(index, []).append(job)
        else:
            self._deliver(index, [job])

    def _deliver(self, index: int, jobs: list[Job]) -> None:
        message = jobs[0] if len(jobs) == 1 else jobs
        try:
            self.workers[index].jobs.send(message)
        except (BrokenPipeError, OSError):  # the worker is gone and never got them: give them to its successor
            self.replace(index)
            self.workers[index].jobs.send(message)
        for job in jobs:  # in flight once delivered (replace() answers only what the dead worker had)
            self.inflight[job.seq] = (index, job)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Jobs sent inside reach each worker as one message: a trial's logits and finalize read
        together arrive together, so the worker sees the finalize behind the logits (one pass)."""
        self.outbox = {}
        try:
            yield
        finally:
            outbox, self.outbox = self.outbox, None
            for index, jobs in outbox.items():
                self._deliver(index, jobs)

    def collect_done(self, timeout: float | None = 0.0) -> None:
        conns = [w.done for w in self.workers] + ([self.rescorer_done] if self.rescorer_done else [])
        for conn in wait(conns, timeout):
            try:
                while conn.poll():
                    self.inflight.pop(conn.recv(), None)
            except (EOFError, OSError):
                continue

    # ---- failures
    def check(self) -> str | None:
        """Replace dead workers; a fatal problem (the LLM process died) as a message."""
        for i, w in enumerate(self.workers):
            if not w.proc.is_alive():
                self.replace(i)
        if self.rescorer is not None and not self.rescorer.is_alive():
            return f"the LLM process died (exit status {self.rescorer.exitcode})"
        return None

    def replace(self, i: int) -> None:
        """Start a successor with the dead worker's sessions; its in-flight requests go to ``on_lost``."""
        w = self.workers[i]
        self.collect_done()
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        log.error("worker %d died (exit status %s); starting a new one", i, w.proc.exitcode)
        lost = [job for owner, job in list(self.inflight.values()) if owner == i]
        new = self._start_worker(i)
        new.sessions = w.sessions
        self.workers[i] = new
        for name in w.sessions:
            self.send(i, self.new_job(name, OPEN))
        for job in lost:
            self.inflight.pop(job.seq, None)
            self.on_lost(job)

    # ---- stopping
    def shutdown(self, kill: bool = False) -> None:
        """Stop the processes: each finishes what it was handed, or with ``kill`` stops now (the
        requests still in flight are then the caller's to answer). What they finished is collected."""
        for w in self.workers:
            if kill and w.proc.is_alive():
                w.proc.kill()
                continue
            try:
                w.jobs.send(None)
            except (BrokenPipeError, OSError):
                pass
        if self.rescorer is not None and kill and self.rescorer.is_alive():
            self.rescorer.kill()
        elif self.rescore_queue is not None:
            self.rescore_queue.put(None)
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
        if self.rescorer is not None:
            self.rescorer.join(timeout=10)
            if self.rescorer.is_alive():
                self.rescorer.kill()
                self.rescorer.join()
        try:
            self.collect_done()
        except (EOFError, OSError):
            pass
