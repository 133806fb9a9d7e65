"""Waiting for other processes, and a free TCP port."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60, proc: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.02) -> Any:
    """``predicate()``'s first true value; fails when ``proc`` exits first (with its stderr, or ``log``'s
    tail) or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            output = log.read_text()[-3000:] if log is not None else (
                proc.communicate()[1][-3000:] if proc.stderr is not None else "")
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f":\n{log.read_text()[-3000:]}" if log is not None else ""))
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
