"""A full disk, a quota or a file-size limit while writing an output: one clear error naming it.

Without this, a full disk surfaced as whatever the writing library made of it: h5py raised from
deep inside ``close()`` and then crashed the interpreter at exit (its file stayed half-open in
the HDF5 library, which retried the flush), and ``torch.save`` aborted with a C++ "enforce fail
… unexpected pos" that does not say what happened. Here:

- :func:`writing` turns an ``OSError`` of a full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``: a size
  limit) raised anywhere inside it into one :class:`OutputError` naming the output; the atomic
  writers around it (:mod:`b2txt.ground.fileio`) then remove their temporary file or directory,
  so nothing is left at the output path;
- :func:`write_hdf5` builds an HDF5 file in memory and writes its bytes with plain writes, so
  HDF5 never meets a failing disk (no half-open file, no crash at exit);
- :func:`recorded_file` records the ``OSError`` behind a failed ``torch.save`` and raises it
  instead of the C++ message.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import B2txtError
from .fileio import human_size

#: errno values that mean "no room": disk full, quota exceeded, file-size limit (RLIMIT_FSIZE).
NO_ROOM = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}


class OutputError(B2txtError):
    """An output could not be written for lack of room (disk, quota, file-size limit)."""


def _free_bytes(path: Path) -> int | None:
    for parent in (path, *path.parents):
        try:
            return shutil.disk_usage(parent).free
        except OSError:
            continue
    return None


def no_room(exc: BaseException) -> OSError | None:
    """The ``OSError`` of a full disk behind ``exc`` (itself, or its cause / context), else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """The one message: the output, what ran out, and the space left where it goes."""
    path = Path(path)
    reason = NO_ROOM.get(exc.errno or 0, exc.strerror or str(exc))
    if exc.errno == errno.EFBIG:  # a per-process limit (ulimit -f) or the filesystem's largest file
        room = "; raise the file-size limit (ulimit -f) or write to another filesystem"
    else:
        free = _free_bytes(path.parent)
        room = (f"; {human_size(free)} free there" if free is not None else "") + "; free some space or write elsewhere"
    return OutputError(f"{path}: cannot write it: {reason} ({exc.strerror or exc}){room}, and run again "
                       f"(nothing was written there)")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """A full disk (or quota, or file-size limit) inside: one :class:`OutputError` naming ``path``.

    Other errors pass unchanged: only these errno values mean the output is what failed, so the
    block may read inputs too without a read error being blamed on the output.
    """
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - only a full disk is converted, the rest re-raised
        cause = no_room(exc)
        if cause is None:
            raise
        raise output_error(path, cause) from None


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """``data`` to ``path`` with plain writes: a full disk is an ``OSError`` here, nowhere else."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())  # a delayed-allocation filesystem reports ENOSPC here, not at close


def write_hdf5(path: str | os.PathLike, fill: Callable[[Any], None]) -> None:
    """An HDF5 file made by ``fill(h5py.File)`` in memory, then written to ``path``.

    HDF5 then never sees a failing write (after one, its file stays half-open in the library and
    the interpreter crashed at exit); the only write that can fail is :func:`write_bytes`'s.
    """
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    write_bytes(path, buf.getbuffer())


class RecordingWriter(io.RawIOBase):
    """A file that remembers the first ``OSError`` of its writes, for a library that reports a
    failed write only in its own words (``torch.save``: a C++ position mismatch)."""

    def __init__(self, fh: Any):
        super().__init__()
        self.fh = fh
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            return self.fh.write(b) or 0
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


@contextlib.contextmanager
def recorded_file(path: str | os.PathLike) -> Iterator[RecordingWriter]:
    """``path`` opened for a library's writes (``with recorded_file(tmp) as f: torch.save(obj, f)``):
    when a write failed, its ``OSError`` is raised in place of whatever the library made of it
    (so :func:`writing` sees a full disk)."""
    with open(path, "wb", buffering=0) as fh:
        writer = RecordingWriter(fh)
        try:
            yield writer
        except Exception:  # noqa: BLE001 - replaced by the write's own error when there was one
            if writer.error is not None:
                raise writer.error from None
            raise
        if writer.error is not None:  # the library carried on past a failed write
            raise writer.error
        os.fsync(fh.fileno())
