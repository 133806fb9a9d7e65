"""Atomic outputs shared by every stage.

Every stage writes to a temporary sibling and renames it into place only when it succeeded,
so a killed or failing stage never leaves a half-written output that a later stage would read;
a directory (an LM, a model, a data set) is built whole beside its target and swapped in whole.
Temporary siblings carry the pid of their writer, and the next writer of the same place removes
those of dead processes. What b2txt wrote carries a provenance mark (:func:`mark_own`), so a
command replaces an existing output only when it is b2txt's own (``--force`` otherwise).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import B2txtError, DownloadError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


#: Inside a directory b2txt wrote: it travels with the directory (copies, DVC's cache, archives),
#: so a re-run recognises its own output wherever it came from. Its text never changes, so the
#: directory's hash (DVC's) does not depend on which run wrote it.
OWNER_MARK = ".b2txt-output"
OWNER_TEXT = ("written by b2txt: a b2txt command may replace this directory; "
              "anything else at an output path needs --force\n")
#: Beside a file b2txt wrote, ``.NAME.b2txt``: its size and SHA-256 (a file has no inside that
#: works for HDF5, CSV, JSON, ARPA and FST alike). A copy with the same bytes (DVC's checkout from
#: its cache) is recognised by the digest; a file edited since is not b2txt's any more.
SIDECAR_SUFFIX = ".b2txt"


def _host() -> str:
    """This host and pid namespace (containers may share a hostname and a file system)."""
    try:
        ns = f":{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        ns = ""
    return (socket.gethostname() + ns).replace("@", "_").replace("/", "_")


#: Temporary siblings are named ``.NAME.tmp-PID@HOST@XXXX`` (``old``: a replaced directory on its
#: way out; HOST with the pid namespace), so the next run can tell a dead run's leftovers from a
#: live one's and remove them.
_HOST = _host()
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[^@]*)@[^@]*$")


def temp_prefix(path: str | os.PathLike, kind: str = "tmp") -> str:
    """The name prefix of a temporary sibling of ``path`` (for :func:`tempfile.mkstemp`/``mkdtemp``)."""
    path = Path(path)
    return f".{path.name}.{kind}-{os.getpid()}@{_HOST}@"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove what killed b2txt runs left beside ``path`` (temporary files and directories of this
    host whose process is dead); a replaced directory that never got its successor goes back to
    ``path``, so a kill between the two renames of a swap loses nothing. Returns what was removed."""
    path = Path(path)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m is None or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        leftover, target = Path(entry.path), path.parent / m["name"]
        if m["kind"] == "old" and not os.path.lexists(target):
            os.replace(leftover, target)  # the swap was killed half-way: the old output is still whole
            continue
        _remove(leftover)
        removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; give the file the usual permissions
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _link_tree(src: Path, dst: Path) -> None:
    """``src``'s files into the new directory ``dst`` as hard links (copies across devices)."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link, symlinks=True, dirs_exist_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; it replaces ``path``, whole, on success.

    ``keep``: names of the old directory's entries to carry over into the new one where the
    caller did not write them (hard links, so nothing is copied): ``lm graph`` adds the graph
    to an LM directory, ``score`` its tables beside the other scores. They are gathered just
    before the swap, under a lock on the parent directory, so two such writers of one directory
    do not drop each other's files. Everything else of the old directory goes. The new directory
    holds :data:`OWNER_MARK`: b2txt may replace it again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        (tmp / OWNER_MARK).write_text(OWNER_TEXT)
        with _locked(path.parent) if keep is not None else contextlib.nullcontext():
            if keep is not None and path.is_dir() and not path.is_symlink():
                for entry in path.iterdir():
                    if keep(entry.name) and not os.path.lexists(tmp / entry.name):
                        if entry.is_dir() and not entry.is_symlink():
                            _link_tree(entry, tmp / entry.name)
                        else:
                            _link_tree_file(entry, tmp / entry.name)
            swap_into_place(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` itself (flock on its descriptor: no lock file is left)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _link_tree_file(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


_RENAME_EXCHANGE = 2
_libc: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):  # no renameat2 in this C library
        return False
    at_fdcwd = -100
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def swap_into_place(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the directory ``src`` at ``target`` (same file system), the old ``target`` removed after.

    Readers see the old directory or the new one, never a mix: one exchange where the file system
    can (Linux), else two renames, and a kill between them leaves the old directory under a name
    :func:`clean_leftovers` gives back to ``target``.
    """
    src, target = Path(src), Path(target)
    if not target.is_dir() or target.is_symlink():
        if os.path.lexists(target):
            target.unlink()
        os.replace(src, target)
        return
    if _exchange(src, target):
        old = src  # src now holds the old directory
    else:
        old = target.with_name(temp_prefix(target, "old") + secrets.token_hex(4))
        os.replace(target, old)
        os.replace(src, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def mark_own(path: str | os.PathLike) -> None:
    """Record that b2txt wrote ``path`` (a directory: :data:`OWNER_MARK` inside; a file: its sidecar)."""
    path = Path(path)
    if path.is_dir():
        mark = path / OWNER_MARK
        if not mark.is_file():
            write_text_atomic(mark, OWNER_TEXT)
    elif path.is_file():
        st = path.stat()
        record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}
        write_text_atomic(sidecar(path), json.dumps(record) + "\n")


def sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{SIDECAR_SUFFIX}")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_own(path: str | os.PathLike) -> bool:
    """Whether b2txt wrote what is at ``path`` (see :func:`mark_own`), so a command may replace it."""
    path = Path(path)
    if path.is_symlink():
        return False  # replacing a link would not replace what it points to; ask
    if path.is_dir():
        return (path / OWNER_MARK).is_file()
    try:
        record = json.loads(sidecar(path).read_text())
        st = path.stat()
        if st.st_size != record["size"]:
            return False
        return st.st_mtime_ns == record["mtime_ns"] or _sha256(path) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _only_layout(path: Path, layout: frozenset[str]) -> bool:
    if not layout or not path.is_dir() or path.is_symlink():
        return False
    return all(e.name in layout or _LEFTOVER.match(e.name) for e in path.iterdir())


def remove_output(path: str | os.PathLike) -> None:
    """Remove a file b2txt wrote, with its provenance record."""
    Path(path).unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


def nothing_to_lose(path: str | os.PathLike) -> bool:
    """Nothing at ``path``, or an empty directory (Snakemake makes the output's parents)."""
    path = Path(path)
    if not os.path.lexists(path):
        return True
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def check_replaceable(path: str | os.PathLike, flag: str, force: bool, layout: frozenset[str] = frozenset()) -> None:
    """Refuse to replace what is at ``path`` unless b2txt wrote it (or ``force``): one clear error
    naming the path and the way on, before anything is touched.

    ``layout``: for a directory several stages write file by file (an LM directory: ``lm ngram``
    and ``lm graph``; the scores of ``score`` and ``score --decoded``), the names they write there.
    DVC declares those files, not the directory, so its checkout of them carries no
    :data:`OWNER_MARK`; a directory holding nothing but such names is taken as b2txt's.
    """
    path = Path(path)
    if force or nothing_to_lose(path) or is_own(path) or _only_layout(path, layout):
        return
    what = ("a symbolic link" if path.is_symlink() else
            f"a directory without b2txt's {OWNER_MARK}" if path.is_dir() else
            f"a file b2txt did not write (no matching {sidecar(path).name} beside it)")
    raise B2txtError(f"{flag} {path} exists and is {what}: b2txt replaces only its own outputs; "
                     "remove or rename it, choose another path, or give --force to replace it")


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_full_error(path: Path, exc: OSError) -> DownloadError:
    """The one error for a full disk (or quota) while writing ``path``, with the space left."""
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return DownloadError(f"{path}: disk full ({exc.strerror}); {human_size(free)} free")
