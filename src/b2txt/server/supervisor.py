"""The child processes of ``b2txt evaluate``: a private redis-server and its LM processes
(one ``lm-server``, or N ``lm-worker``), started, watched and restarted by one monitor thread.

The monitor thread starts the children itself: ``PR_SET_PDEATHSIG`` fires when the thread that
forked a child ends, so the children must belong to a thread that lives exactly as long as they
should. It blocks on the children's pidfds (no polling) and a wake-up pipe. A child that exits
with status 2 (a usage or config error: bad graph, bad option) fails the run, since restarting
cannot help; any other exit is restarted, at most ``max_restarts`` times per kind of child.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import yaml

from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.errors import B2txtError
from ..ground.fileio import write_text_atomic
from .redis_process import RedisServer, die_with_parent, tail

Log = Callable[[str], None]
REDIS = "redis-server"


def decoder_config(path: Path, options: DecodeConfig, rescore: RescoreConfig | None) -> Path:
    """The config file an LM process starts with: the evaluator's decode and rescore sections
    (no LLM unless asked for)."""
    cfg = {"decode": options.model_dump(mode="json"),
           "rescore": (rescore or RescoreConfig(enabled=False)).model_dump(mode="json")}
    write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
    return path


class Supervisor:
    """Children by name (``RUN_DIR/NAME.log``, ``RUN_DIR/NAME.pid``), each of a kind whose
    restarts are counted together. Subclasses start them (:meth:`_start_children`) and start
    one again by name (:meth:`_start_child`)."""

    def __init__(self, run_dir: Path, redis_server: RedisServer | None, max_restarts: int, kinds: list[str],
                 log: Log, thread_name: str):
        self.run_dir = run_dir
        self.redis = redis_server
        self.max_restarts = max_restarts
        self.log = log
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.kind: dict[str, str] = {}
        self.restarts = {REDIS: 0, **{k: 0 for k in kinds}}
        self.generation = 0  # bumped by every restart: replies from before it will not come
        self.failed: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._monitor, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=60)
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- children
    def _start_children(self) -> None:
        raise NotImplementedError

    def _start_child(self, name: str) -> None:
        raise NotImplementedError

    def _spawn(self, name: str, kind: str, args: list[str]) -> None:
        """``python -m b2txt ARGS`` as child ``name``, killed with its parent."""
        cmd = [sys.executable, "-m", "b2txt", *args]
        with open(self.run_dir / f"{name}.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    preexec_fn=lambda: die_with_parent(signal.SIGKILL), close_fds=True)
        self.children[name], self.kind[name] = proc, kind
        (self.run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _start_redis(self) -> None:
        assert self.redis is not None
        self.redis.restart()
        (self.run_dir / f"{REDIS}.pid").write_text(f"{self.redis.pid}\n")

    def _restart(self, name: str) -> None:
        kind = self.kind.get(name, REDIS)
        self.restarts[kind] += 1
        if self.restarts[kind] > self.max_restarts:
            self.failed = f"{kind} died {self.restarts[kind]} times; giving up"
            return
        self.log(f"{name} died; restarting it (restart {self.restarts[kind]} of at most {self.max_restarts})")
        try:
            self._start_redis() if name == REDIS else self._start_child(name)
        except B2txtError as exc:
            self.failed = f"cannot restart {name}: {exc}"
        self.generation += 1

    def _monitor(self) -> None:
        try:
            self._start_children()
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._start_error = exc
            self._ready.set()
            self._stop_children()
            return
        self._ready.set()
        try:
            while self.failed is None:
                watched = dict(self.children)
                if self.redis is not None and self.redis.proc is not None:
                    watched[REDIS] = self.redis.proc
                fds = {os.pidfd_open(proc.pid): name for name, proc in watched.items()}
                try:
                    ready, _, _ = select.select([self._wake_r, *fds], [], [])
                finally:
                    for fd in fds:
                        os.close(fd)
                if self._wake_r in ready:
                    return
                for fd in ready:
                    name = fds[fd]
                    if watched[name].wait() == 2 and name != REDIS:
                        self.failed = f"{name} failed:\n{tail(self.run_dir / f'{name}.log')}"
                        return
                    self._restart(name)
        finally:
            self._stop_children()

    def _stop_children(self) -> None:
        live = [p for p in self.children.values() if p.poll() is None]
        for proc in live:
            proc.terminate()  # each finishes the trial under way, then exits
        for proc in live:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()
