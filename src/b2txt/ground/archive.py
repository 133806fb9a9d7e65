"""Archives unpacked safely and atomically (the Dryad zips and tarballs, REFERENCE §1).

Each archive becomes one directory, known before it is opened: ``t15_copyTask_neuralData.zip``
→ ``hdf5_data_final/``, any other ``X.zip`` / ``X.tar.gz`` → ``X/``
(``t15_pretrained_rnn_baseline/``). Whether the archive wraps its content in that directory or
not, the result is the same layout. Extraction happens in a hidden staging directory beside the
target and only a complete tree is renamed into place: later stages never see a half tree.
Absolute paths, ``..`` components, links and devices are refused (no zip-slip).
"""

from __future__ import annotations

import errno
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .console import Log
from .errors import DownloadError
from .fileio import (
    OWNER_MARK,
    OWNER_TEXT,
    check_replaceable,
    clean_leftovers,
    disk_full_error,
    swap_into_place,
    temp_prefix,
)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar")
#: Archives whose directory is not their own name (REFERENCE §1: the neural data zip).
# "hdf5_data_final" is b2txt.data.dryad.DATA_SUBDIR (a test checks): the ground layer cannot import it.
UNPACK_TARGETS: dict[str, str] = {"t15_copyTask_neuralData.zip": "hdf5_data_final"}
#: Archive entries that are packing debris, never data (macOS zip resource forks).
IGNORED_MEMBERS = frozenset({"__MACOSX", ".DS_Store"})
CHUNK = 1 << 20


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    lower = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def unpack_target(archive_name: str) -> str:
    """The directory an archive becomes: known ones by name, others by their name less the suffix."""
    return UNPACK_TARGETS.get(archive_name, archive_stem(archive_name))


def _safe_member(archive: Path, name: str) -> PurePosixPath | None:
    """The member's relative path, None for packing debris; absolute or ``..`` paths are refused."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DownloadError(f"{archive}: member {name!r} would be written outside the target, refusing")
    parts = [q for q in p.parts if q not in ("", ".")]
    if not parts or parts[0] in IGNORED_MEMBERS or parts[-1] in IGNORED_MEMBERS:
        return None
    return PurePosixPath(*parts)


def _write_member(src: BinaryIO, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _safe_member(archive, info.filename)
            if rel is None:
                continue
            if info.is_dir():
                (into / rel).mkdir(parents=True, exist_ok=True)
            else:
                with zf.open(info) as src:
                    _write_member(src, into / rel)


def _extract_tar(archive: Path, into: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:  # streamed: a 100 GB tar.gz is read once
            rel = _safe_member(archive, member.name)
            if rel is None:
                continue
            if member.isdir():
                (into / rel).mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                src = tf.extractfile(member)
                assert src is not None
                with src:
                    _write_member(src, into / rel)
            else:
                raise DownloadError(f"{archive}: member {member.name!r} is a link or device, refusing")


def unpack_archive(archive: Path, out_dir: Path, log: Log = print, *, force: bool = False) -> Path:
    """Unpack a zip or tar archive into ``out_dir`` atomically; returns the directory it made.

    Extraction happens in ``<out>/.unpack-<archive>-*``; only a complete tree is renamed into
    place (replacing an older one, only one b2txt unpacked, or with ``force``), so a failed or
    killed unpack leaves no partial layout; a killed run's staging goes with the next run.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    target = out_dir / unpack_target(archive.name)
    check_replaceable(target, "--out", force)
    for stale in out_dir.glob(f".unpack-{archive.name}-*"):  # left by a run of an earlier b2txt
        shutil.rmtree(stale, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=out_dir))
    staging.chmod(0o755)  # mkdtemp makes it private; it may become the data directory itself
    try:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, staging)
            else:
                _extract_tar(archive, staging)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
            raise DownloadError(f"{archive}: damaged archive ({exc}); nothing was unpacked") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(staging / "x", exc) from None
            raise
        entries = list(staging.iterdir())
        wrapped = len(entries) == 1 and entries[0].is_dir() and entries[0].name == target.name
        unpacked = entries[0] if wrapped else staging
        (unpacked / OWNER_MARK).write_text(OWNER_TEXT)  # b2txt's: a later unpack may replace it
        swap_into_place(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{archive.name}: unpacked into {target}")
    return target


