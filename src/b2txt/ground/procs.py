"""Child processes that die with their parent, even when the parent is SIGKILLed.

A child (lmplz, build_binary, redis-server, an LM worker) outlives a killed parent unless it
asks the kernel for ``PR_SET_PDEATHSIG`` (Linux; elsewhere nothing is done). We chose it over a
process group killed on exit: nothing runs in a parent killed with -9, while the kernel's
signal always fires. It fires when the *thread* that started the child exits, so children are
started from long-lived threads (the main one). A killed run's temporary files are removed by
the next run (:func:`b2txt.ground.fileio.clean_leftovers`: their names carry the owner's pid).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _load_libc() -> ctypes.CDLL | None:
    # loaded once, in the parent: a child between fork and exec should not dlopen (locks of
    # other threads stay held in the child)
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    Called in a child right after fork (``parent``: the pid it was forked from, when known); if
    the parent already died in between (the child was re-parented), exit at once instead of
    living on as an orphan.
    """
    if parent is None:
        parent = os.getppid()
    if _LIBC is None:
        return
    _LIBC.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent or parent == 1:
        os._exit(1)


def dies_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for :mod:`subprocess` (and an ``initializer`` for a fork pool): the child
    gets ``sig`` when this process dies."""
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent(sig, parent)

    return preexec
