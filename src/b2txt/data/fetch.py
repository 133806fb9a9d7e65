"""Dryad files fetched, checked and unpacked: resumable, and never half-written.

Why each rule:

- A file counts as downloaded only when its size and digest match the API's listing; a wrong
  digest deletes the bytes and stops, so a damaged archive is never unpacked.
- Bytes go to ``<out>/.download/<name>.<digest>.part`` first (or into ``partial_dir``: a
  workflow manager that empties the output directory before a rerun, as Snakemake does, would
  delete them there). An interrupted transfer (a dropped connection here, or a killed process
  earlier) resumes from the partial file with an HTTP ``Range`` request; the digest in the name
  keeps a partial from an older dataset version from being resumed by mistake.
- ``<out>/.download/<name>.ok.json`` remembers a checked file (digest, size, mtime) so a second
  run does not re-hash tens of gigabytes; any change of the file or of the listing re-checks it.
- Archives are unpacked atomically by :mod:`b2txt.ground.archive`.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..ground.archive import CHUNK, unpack_archive, unpack_target
from ..ground.console import Log, progress
from ..ground.errors import DownloadError
from ..ground.fileio import atomic_file, check_replaceable, disk_full_error, human_size, write_text_atomic
from .dryad_api import DEFAULT_API_ROOT, HttpOptions, RemoteFile, Transient, hasher, listed_files, open_url, retrying

STATE_DIR = ".download"


#: git's name for a file's bytes (the blob id the GitHub API lists): sha1 of ``blob <size>\0`` + the bytes.
GIT_BLOB_SHA1 = "git-blob-sha1"


def file_digest(path: Path, digest_type: str) -> str:
    """The hex digest of a file: a hashlib algorithm (as Dryad names it: md5, sha-256) or :data:`GIT_BLOB_SHA1`."""
    if digest_type == GIT_BLOB_SHA1:
        h = hashlib.sha1(b"blob %d\0" % Path(path).stat().st_size)
    else:
        h = hasher(digest_type, str(path))
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def partial_path(out_dir: Path, rf: RemoteFile, partial_dir: Path | None = None) -> Path:
    """Where the bytes of ``rf`` collect until they are checked."""
    where = Path(partial_dir) if partial_dir is not None else Path(out_dir) / STATE_DIR
    return where / f"{rf.path}.{rf.digest[:16]}.part"


def _ok_marker(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / STATE_DIR / f"{name}.ok.json"


def _unpacked_marker(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / STATE_DIR / f"{name}.unpacked.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def is_downloaded(out_dir: Path, rf: RemoteFile) -> bool:
    """True when ``<out>/<name>`` is this exact file (checked now or by an earlier run)."""
    final = Path(out_dir) / rf.path
    if not final.is_file() or final.stat().st_size != rf.size:
        return False
    st = final.stat()
    mark = _read_json(_ok_marker(out_dir, rf.path))
    if mark == {"digest": rf.digest, "size": rf.size, "mtime_ns": st.st_mtime_ns}:
        return True
    if file_digest(final, rf.digest_type) != rf.digest:
        return False
    _write_ok_marker(out_dir, rf)
    return True


def _write_ok_marker(out_dir: Path, rf: RemoteFile) -> None:
    st = (Path(out_dir) / rf.path).stat()
    write_text_atomic(_ok_marker(out_dir, rf.path),
                      json.dumps({"digest": rf.digest, "size": rf.size, "mtime_ns": st.st_mtime_ns}))




# ----------------------------------------------------------------------------- one file

def _content_range_start(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Range", "")
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit.strip() == "bytes" else None
    except ValueError:
        return None


def _copy_body(resp: BinaryIO, dst: BinaryIO, url: str, expected: int, bar) -> None:
    """Copy the response to ``dst``; a body shorter than ``expected`` is :class:`Transient`."""
    got = 0
    try:
        while block := resp.read(min(CHUNK, expected - got) if expected > got else CHUNK):
            dst.write(block)
            got += len(block)
            bar.update(len(block))
            if got >= expected:
                break
    except (ConnectionError, TimeoutError, http.client.HTTPException, socket.timeout) as exc:
        raise Transient(f"{url}: connection lost after {got} of {expected} bytes "
                         f"({type(exc).__name__})") from None
    finally:
        dst.flush()
    if got < expected:
        raise Transient(f"{url}: connection closed after {got} of {expected} bytes")


def _fetch_once(rf: RemoteFile, part: Path, options: HttpOptions, bar) -> None:
    """One request for the bytes still missing from ``part`` (a Range request when some are there)."""
    have = part.stat().st_size if part.exists() else 0
    if have >= rf.size:
        if have > rf.size:
            part.unlink()
            raise Transient(f"{part}: longer than the listed {rf.size} bytes, starting over")
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    resp = open_url(rf.url, options, headers, accept=(416,))
    with resp:
        if resp.status == 416:  # the server thinks we have it all already, but the size disagrees
            part.unlink()
            raise Transient(f"{rf.url}: HTTP 416 for bytes={have}-, starting over")
        if resp.status == 206 and _content_range_start(resp) != have:
            raise DownloadError(f"{rf.url}: asked for bytes={have}-, the server answered "
                                f"Content-Range {resp.headers.get('Content-Range')!r}")
        if have and resp.status != 206:
            bar.reset(total=rf.size)  # the server ignored the Range header: start over
            have = 0
        with open(part, "ab" if have else "wb") as dst:
            _copy_body(resp, dst, rf.url, rf.size - have, bar)
            os.fsync(dst.fileno())


def fetch_checked(rf: RemoteFile, part: Path, options: HttpOptions = HttpOptions(), log: Log = print) -> Path:
    """Download ``rf`` into ``part`` (resuming the bytes already there) and check size and digest.

    Returns ``part``, now holding exactly the listed file; a size or digest mismatch deletes the
    bytes and raises. The caller moves the checked file where it belongs.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have:
        log(f"{rf.path}: resuming after {human_size(have)} of {human_size(rf.size)}")
    bar = progress(desc=rf.path, total=rf.size, unit="B")
    bar.unit_scale = True  # kB/MB/GB instead of raw byte counts
    bar.update(have)
    try:
        retrying(rf.path, options, lambda: _fetch_once(rf, part, options, bar), log)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full_error(part, exc) from None
        raise DownloadError(f"{part}: cannot write: {exc.strerror or exc}") from None
    finally:
        bar.close()
    got = part.stat().st_size
    if got != rf.size:
        part.unlink()
        raise DownloadError(f"{rf.url}: got {got} bytes, {rf.size} listed; deleted")
    digest = file_digest(part, rf.digest_type)
    if digest != rf.digest:
        part.unlink()
        raise DownloadError(f"{rf.path}: {rf.digest_type} digest {digest} does not match the listed {rf.digest} "
                            f"(from {rf.url}); the download was deleted and nothing was used")
    return part


def move_file(src: Path, dest: Path) -> None:
    """Rename ``src`` onto ``dest``; across file systems, copy it in atomically, then delete ``src``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.stat().st_dev == dest.parent.stat().st_dev:
        os.replace(src, dest)
        return
    with atomic_file(dest) as tmp:
        shutil.copyfile(src, tmp)
    src.unlink()


def fetch_file(rf: RemoteFile, out_dir: Path, options: HttpOptions = HttpOptions(), log: Log = print,
               partial_dir: Path | None = None) -> Path:
    """Download ``rf`` into ``out_dir`` (resuming any partial bytes) and check size and digest.

    A digest mismatch deletes the downloaded bytes and raises; only a checked file is renamed
    to ``<out>/<name>``.
    """
    out_dir = Path(out_dir)
    final = out_dir / rf.path
    part = fetch_checked(rf, partial_path(out_dir, rf, partial_dir), options, log)
    move_file(part, final)
    _write_ok_marker(out_dir, rf)
    return final


def _is_unpacked(rf: RemoteFile, out_dir: Path) -> bool:
    mark = _read_json(_unpacked_marker(out_dir, rf.path))
    return mark.get("digest") == rf.digest and (out_dir / str(mark.get("target", ""))).is_dir()


def _unpack_if_needed(path: Path, rf: RemoteFile, out_dir: Path, log: Log, force: bool = False) -> Path:
    marker = _unpacked_marker(out_dir, rf.path)
    if _is_unpacked(rf, out_dir):
        return out_dir / _read_json(marker)["target"]
    target = unpack_archive(path, out_dir, log, force=force)
    write_text_atomic(marker, json.dumps({"digest": rf.digest, "target": target.name}))
    return target


# ----------------------------------------------------------------------------- the command

@dataclass
class PlannedFile:
    file: RemoteFile
    done: bool
    partial_bytes: int

    @property
    def missing_bytes(self) -> int:
        return 0 if self.done else self.file.size - self.partial_bytes


def plan(files: list[RemoteFile], out_dir: Path, partial_dir: Path | None = None) -> list[PlannedFile]:
    out = []
    for rf in files:
        part = partial_path(out_dir, rf, partial_dir)
        have = part.stat().st_size if part.exists() else 0
        out.append(PlannedFile(rf, is_downloaded(out_dir, rf), min(have, rf.size)))
    return out


def describe(planned: list[PlannedFile]) -> str:
    """The size table shown before anything is downloaded."""
    width = max((len(p.file.path) for p in planned), default=4)
    lines = []
    for p in planned:
        state = ("present, checked" if p.done else
                 f"{human_size(p.partial_bytes)} there, resumes" if p.partial_bytes else "to download")
        lines.append(f"  {p.file.path:<{width}}  {human_size(p.file.size):>9}  {p.file.dataset:<4}  {state}")
    total = sum(p.file.size for p in planned)
    todo = sum(p.missing_bytes for p in planned)
    lines.append(f"  {len(planned)} files, {human_size(total)}; {human_size(todo)} to download")
    return "\n".join(lines)


def space_needed(planned: list[PlannedFile], unpack: bool) -> int:
    """Bytes still to download, plus each archive's size again for its unpacked copy (at least that)."""
    need = sum(p.missing_bytes for p in planned)
    if unpack:
        need += sum(p.file.size for p in planned if p.file.is_archive and not p.done)
    return need


def check_free_space(out_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if needed > free:
        raise DownloadError(f"{out_dir}: not enough disk space: {human_size(needed)} needed to download "
                            f"(and unpack), {human_size(free)} free")


def download(datasets: list[str], out_dir: str | Path, names: list[str] | None = None,
             api_root: str = DEFAULT_API_ROOT, options: HttpOptions = HttpOptions(), unpack: bool = True,
             list_only: bool = False, dois: dict[str, str] | None = None, log: Log = print,
             partial_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """List, download, check and (for archives) unpack the chosen files; returns the paths made.
    Partial files collect in ``partial_dir`` (default ``<out>/.download``). An archive's target
    directory that b2txt did not unpack is replaced only with ``force`` (checked before any
    download)."""
    partial_dir = Path(partial_dir) if partial_dir is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, where = listed_files(datasets, names, api_root, options, dois, log)
    planned = plan(files, out_dir, partial_dir)
    log(f"files of {where}:\n{describe(planned)}")
    if list_only:
        return []
    if unpack:
        for p in planned:
            if p.file.is_archive and not _is_unpacked(p.file, out_dir):
                check_replaceable(out_dir / unpack_target(Path(p.file.path).name), "--out", force)
    check_free_space(out_dir, space_needed(planned, unpack))
    made = []
    for p in planned:
        path = out_dir / p.file.path if p.done else fetch_file(p.file, out_dir, options, log, partial_dir)
        made.append(path)
        if unpack and p.file.is_archive:
            made.append(_unpack_if_needed(path, p.file, out_dir, log, force))
    if partial_dir is not None and partial_dir.is_dir() and not any(partial_dir.iterdir()):
        partial_dir.rmdir()  # every file arrived: nothing left to resume
    return made


def partial_dir_for(out_dir: str | Path, configured: str | Path | None = None) -> Path:
    """Where the commands collect partial downloads: ``configured`` (``download.partial_dir``), else
    ``<out>.partial`` beside the output, which survives Snakemake and DVC emptying the output
    directory before a rerun, so a killed download resumes under them as it does by hand."""
    return Path(configured) if configured else Path(f"{Path(out_dir)}.partial")

