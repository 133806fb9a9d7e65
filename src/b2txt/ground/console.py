"""What a command shows its user on stderr: one-line log messages and progress bars."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
#: Where a function reports what it does: ``log("message")``.
Log = Callable[[str], None]


def log(msg: str) -> None:
    """The CLI's log line: ``[b2txt] msg`` on stderr."""
    print(f"[b2txt] {msg}", file=sys.stderr, flush=True)


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
             unit: str = "it") -> tqdm:
    """A tqdm progress bar on stderr; ``B2TXT_PROGRESS=0`` turns it off (e.g. in CI logs).

    Iterate over it, or call ``update(n)`` when ``iterable`` is None.
    """
    disable = os.environ.get("B2TXT_PROGRESS", "1") == "0"
    # Outside a terminal (Snakemake logs) update rarely so log files stay readable.
    mininterval = 0.2 if sys.stderr.isatty() else 10.0
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable,
                mininterval=mininterval, dynamic_ncols=True)
