"""``b2txt download``: the Dryad files of REFERENCE §1, checked and resumable.

The Dryad API (v2, HAL+JSON) is walked as the published data are laid out:
``<api root>/datasets/<url-encoded DOI>/versions`` → the last version's ``stash:files`` link →
each file entry (``path``, ``size``, ``digest``, ``digestType``) and its ``stash:download`` link.
Links are paths on the API host; list pages are followed through ``_links.next``.

Why each rule:

- A file counts as downloaded only when its size and digest match the API's listing; a wrong
  digest deletes the bytes and stops, so a damaged archive is never unpacked.
- Bytes go to ``<out>/.download/<name>.<digest>.part`` first (or into ``--partial-dir``: a
  workflow manager that empties the output directory before a rerun, as Snakemake does, would
  delete them there). An interrupted transfer (a dropped connection here, or a killed process
  earlier) resumes from the partial file with an HTTP ``Range`` request; the digest in the name
  keeps a partial from an older dataset version from being resumed by mistake.
- ``<out>/.download/<name>.ok.json`` remembers a checked file (digest, size, mtime) so a second
  run does not re-hash tens of gigabytes; any change of the file or of the listing re-checks it.
- Archives (zip, tar, tar.gz) are unpacked into a hidden staging directory inside ``<out>`` and
  renamed into place in one step: later stages never see a half tree. Each archive becomes one
  directory, known before it is opened: ``t15_copyTask_neuralData.zip`` → ``hdf5_data_final/``,
  any other ``X.zip`` / ``X.tar.gz`` → ``X/`` (``t15_pretrained_rnn_baseline/``). Whether the
  archive wraps its content in that directory or not, the result is the same layout.
- Every problem is one :class:`DownloadError` line naming the URL, file or member.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from . import __version__
from .errors import B2txtError
from .fileio import atomic_file, progress, write_text_atomic

DEFAULT_API_ROOT = "https://datadryad.org/api/v2"
#: Dataset choices of ``--dataset`` and their DOIs (REFERENCE §1).
DATASETS: dict[str, str] = {
    "data": "doi:10.5061/dryad.dncjsxm85",  # neural data, pickles, pretrained RNN
    "lm": "doi:10.5061/dryad.x69p8czpq",  # 3-gram and 5-gram language models
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar")
#: Archives whose directory is not their own name (REFERENCE §1: the neural data zip).
# "hdf5_data_final" is b2txt.data.dryad.DATA_SUBDIR (a test checks): not imported, so that `b2txt`
# starts without loading h5py and pandas for every command.
UNPACK_TARGETS: dict[str, str] = {"t15_copyTask_neuralData.zip": "hdf5_data_final"}
STATE_DIR = ".download"
#: Archive entries that are packing debris, never data (macOS zip resource forks).
IGNORED_MEMBERS = frozenset({"__MACOSX", ".DS_Store"})
CHUNK = 1 << 20

Log = Callable[[str], None]


class DownloadError(B2txtError):
    """A download problem: network, HTTP status, digest, disk, archive or an unknown file."""


@dataclass(frozen=True)
class HttpOptions:
    """How patient to be with the server: per-request timeout and retries of lost transfers."""

    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 2.0


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset version as the API lists it."""

    dataset: str
    path: str
    size: int
    digest: str
    digest_type: str
    url: str

    @property
    def is_archive(self) -> bool:
        return self.path.lower().endswith(ARCHIVE_SUFFIXES)


class _Transient(Exception):
    """A transfer that broke off mid-way; worth retrying (with Range when bytes arrived)."""


# ----------------------------------------------------------------------------- HTTP

def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": f"b2txt/{__version__}", **(headers or {})})


def _open(url: str, options: HttpOptions, headers: dict[str, str] | None = None,
          accept: tuple[int, ...] = ()) -> http.client.HTTPResponse | urllib.error.HTTPError:
    """Open ``url``; HTTP statuses in ``accept`` are returned, every other failure is classified.

    Refused connections and unknown hosts are final (no network or a wrong API root); a
    connection that breaks, a timeout or a 5xx/429 status is :class:`_Transient`.
    """
    try:
        return urllib.request.urlopen(_request(url, headers), timeout=options.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code in accept:
            return exc
        exc.close()
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError, socket.timeout)):
            raise _Transient(f"{url}: {reason or type(reason).__name__}") from None
        raise DownloadError(f"{url}: cannot connect ({reason}); no network, or a wrong API root "
                            "(--api-root / download.api_root)?") from None
    except (ConnectionError, TimeoutError, http.client.HTTPException) as exc:
        raise _Transient(f"{url}: {exc or type(exc).__name__}") from None


def _retrying(what: str, options: HttpOptions, attempt: Callable[[], Any], log: Log) -> Any:
    """Run ``attempt`` until it does not raise :class:`_Transient`, at most ``retries`` more times."""
    for n in range(options.retries + 1):
        try:
            return attempt()
        except _Transient as exc:
            if n == options.retries:
                raise DownloadError(f"{exc}; gave up after {n + 1} attempts ({what})") from None
            log(f"{exc}; retrying ({n + 1}/{options.retries})")
            time.sleep(options.backoff_s * (n + 1))
    raise AssertionError("unreachable")


def get_json(url: str, options: HttpOptions, log: Log = print) -> dict[str, Any]:
    """One API document; a body that is not a JSON object is an error naming the URL."""
    def attempt() -> dict[str, Any]:
        with _open(url, options, {"Accept": "application/json"}) as resp:
            try:
                body = resp.read()
            except (ConnectionError, TimeoutError, http.client.HTTPException) as exc:
                raise _Transient(f"{url}: {exc or type(exc).__name__}") from None
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DownloadError(f"{url}: not a JSON document ({exc})") from None
        if not isinstance(doc, dict):
            raise DownloadError(f"{url}: expected a JSON object, got {type(doc).__name__}")
        return doc

    return _retrying(url, options, attempt, log)


# ----------------------------------------------------------------------------- the API walk

def _link(doc: dict[str, Any], rel: str, url: str) -> str | None:
    href = doc.get("_links", {}).get(rel, {})
    href = href.get("href") if isinstance(href, dict) else None
    return urllib.parse.urljoin(url, href) if href else None


def _embedded(doc: dict[str, Any], key: str, url: str) -> list[dict[str, Any]]:
    items = doc.get("_embedded", {}).get(key)
    if not isinstance(items, list):
        raise DownloadError(f"{url}: no _embedded.{key} list in the API answer")
    return items


def _pages(url: str, key: str, options: HttpOptions, log: Log) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every item of a paged HAL list, with the URL of the page it came from."""
    seen: set[str] = set()
    next_url: str | None = url
    while next_url and next_url not in seen:
        seen.add(next_url)
        doc = get_json(next_url, options, log)
        for item in _embedded(doc, key, next_url):
            yield next_url, item
        next_url = _link(doc, "next", next_url)


def versions_url(api_root: str, doi: str) -> str:
    return f"{api_root.rstrip('/')}/datasets/{urllib.parse.quote(doi, safe='')}/versions"


def _remote_file(dataset: str, page_url: str, entry: dict[str, Any]) -> RemoteFile:
    path = entry.get("path")
    where = f"{page_url}: file {path!r}"
    if not isinstance(path, str) or not path or PurePosixPath(path).name != path or path.startswith("."):
        raise DownloadError(f"{where}: not a plain file name, refusing to write it")
    url = _link(entry, "stash:download", page_url)
    if url is None:
        raise DownloadError(f"{where}: no stash:download link")
    size, digest, digest_type = entry.get("size"), entry.get("digest"), entry.get("digestType")
    if not isinstance(size, int) or size < 0:
        raise DownloadError(f"{where}: no valid size ({size!r})")
    if not digest or not digest_type:
        raise DownloadError(f"{where}: the API gives no digest/digestType, so it cannot be checked")
    _hasher(str(digest_type), where)  # fail before downloading when the type is unknown
    return RemoteFile(dataset, path, size, str(digest).lower(), str(digest_type), url)


def _version_number(version: dict[str, Any]) -> int:
    number = version.get("versionNumber")
    return number if isinstance(number, int) else -1


def list_files(dataset: str, doi: str, api_root: str, options: HttpOptions, log: Log = print) -> list[RemoteFile]:
    """The files of the dataset's last version (REFERENCE §1)."""
    url = versions_url(api_root, doi)
    versions = list(_pages(url, "stash:versions", options, log))
    if not versions:
        raise DownloadError(f"{url}: the dataset has no versions")
    # The newest version: highest versionNumber, else the last one listed.
    index = max(range(len(versions)), key=lambda i: (_version_number(versions[i][1]), i))
    page, last = versions[index]
    files_url = _link(last, "stash:files", page)
    if files_url is None:
        self_url = _link(last, "self", page)
        if self_url is None:
            raise DownloadError(f"{url}: the last version has neither a stash:files nor a self link")
        files_url = self_url.rstrip("/") + "/files"
    return [_remote_file(dataset, p, e) for p, e in _pages(files_url, "stash:files", options, log)]


def select_files(files: list[RemoteFile], names: list[str] | None, where: str) -> list[RemoteFile]:
    """The requested files in listing order; a name the API does not list is an error."""
    if not names:
        return files
    by_name = {f.path: f for f in files}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DownloadError(f"{', '.join(missing)}: not listed by {where}; its files: "
                            + ", ".join(sorted(by_name)))
    wanted = set(names)
    return [f for f in files if f.path in wanted]


# ----------------------------------------------------------------------------- files on disk

def _hasher(digest_type: str, where: str = "") -> "hashlib._Hash":
    name = digest_type.lower().replace("-", "").replace("_", "")
    try:
        return hashlib.new(name)
    except ValueError:
        raise DownloadError(f"{where}: unknown digestType {digest_type!r}") from None


def file_digest(path: Path, digest_type: str) -> str:
    h = _hasher(digest_type, str(path))
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


def _disk_full(path: Path, exc: OSError) -> DownloadError:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return DownloadError(f"{path}: disk full ({exc.strerror}); {human_size(free)} free")


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------- one file

def _content_range_start(resp: http.client.HTTPResponse) -> int | None:
    value = resp.headers.get("Content-Range", "")
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit.strip() == "bytes" else None
    except ValueError:
        return None


def _copy_body(resp: BinaryIO, dst: BinaryIO, url: str, expected: int, bar) -> None:
    """Copy the response to ``dst``; a body shorter than ``expected`` is :class:`_Transient`."""
    got = 0
    try:
        while block := resp.read(min(CHUNK, expected - got) if expected > got else CHUNK):
            dst.write(block)
            got += len(block)
            bar.update(len(block))
            if got >= expected:
                break
    except (ConnectionError, TimeoutError, http.client.HTTPException, socket.timeout) as exc:
        raise _Transient(f"{url}: connection lost after {got} of {expected} bytes "
                         f"({type(exc).__name__})") from None
    finally:
        dst.flush()
    if got < expected:
        raise _Transient(f"{url}: connection closed after {got} of {expected} bytes")


def _fetch_once(rf: RemoteFile, part: Path, options: HttpOptions, bar) -> None:
    """One request for the bytes still missing from ``part`` (a Range request when some are there)."""
    have = part.stat().st_size if part.exists() else 0
    if have >= rf.size:
        if have > rf.size:
            part.unlink()
            raise _Transient(f"{part}: longer than the listed {rf.size} bytes, starting over")
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    resp = _open(rf.url, options, headers, accept=(416,))
    with resp:
        if resp.status == 416:  # the server thinks we have it all already, but the size disagrees
            part.unlink()
            raise _Transient(f"{rf.url}: HTTP 416 for bytes={have}-, starting over")
        if resp.status == 206 and _content_range_start(resp) != have:
            raise DownloadError(f"{rf.url}: asked for bytes={have}-, the server answered "
                                f"Content-Range {resp.headers.get('Content-Range')!r}")
        if have and resp.status != 206:
            bar.reset(total=rf.size)  # the server ignored the Range header: start over
            have = 0
        with open(part, "ab" if have else "wb") as dst:
            _copy_body(resp, dst, rf.url, rf.size - have, bar)
            os.fsync(dst.fileno())


def fetch_file(rf: RemoteFile, out_dir: Path, options: HttpOptions = HttpOptions(), log: Log = print,
               partial_dir: Path | None = None) -> Path:
    """Download ``rf`` into ``out_dir`` (resuming any partial bytes) and check size and digest.

    A digest mismatch deletes the downloaded bytes and raises; only a checked file is renamed
    to ``<out>/<name>``.
    """
    out_dir = Path(out_dir)
    final = out_dir / rf.path
    part = partial_path(out_dir, rf, partial_dir)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have:
        log(f"{rf.path}: resuming after {human_size(have)} of {human_size(rf.size)}")
    bar = progress(desc=rf.path, total=rf.size, unit="B")
    bar.unit_scale = True  # kB/MB/GB instead of raw byte counts
    bar.update(have)
    try:
        _retrying(rf.path, options, lambda: _fetch_once(rf, part, options, bar), log)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(part, exc) from None
        raise DownloadError(f"{part}: cannot write: {exc.strerror or exc}") from None
    finally:
        bar.close()
    got = part.stat().st_size
    if got != rf.size:
        part.unlink()
        raise DownloadError(f"{rf.url}: got {got} bytes, the API lists {rf.size}; deleted")
    digest = file_digest(part, rf.digest_type)
    if digest != rf.digest:
        part.unlink()
        raise DownloadError(f"{rf.path}: {rf.digest_type} digest {digest} does not match the API's {rf.digest} "
                            f"(from {rf.url}); the download was deleted and nothing was unpacked")
    if part.stat().st_dev == out_dir.stat().st_dev:
        os.replace(part, final)
    else:  # a partial directory on another file system: copy, then rename within out_dir
        with atomic_file(final) as tmp:
            shutil.copyfile(part, tmp)
        part.unlink()
    _write_ok_marker(out_dir, rf)
    return final


# ----------------------------------------------------------------------------- archives

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


def _swap_into_place(src: Path, target: Path) -> None:
    """Rename ``src`` onto ``target`` (same file system); an old ``target`` is removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "x")
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def unpack_archive(archive: Path, out_dir: Path, log: Log = print) -> Path:
    """Unpack a zip or tar archive into ``out_dir`` atomically; returns the directory it made.

    Extraction happens in ``<out>/.unpack-<archive>-*``; only a complete tree is renamed into
    place (replacing an older one), so a failed or killed unpack leaves no partial layout.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    for stale in out_dir.glob(f".unpack-{archive.name}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".unpack-{archive.name}-", dir=out_dir))
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
                raise _disk_full(staging / "x", exc) from None
            raise
        target = out_dir / unpack_target(archive.name)
        entries = list(staging.iterdir())
        wrapped = len(entries) == 1 and entries[0].is_dir() and entries[0].name == target.name
        _swap_into_place(entries[0] if wrapped else staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{archive.name}: unpacked into {target}")
    return target


def _unpack_if_needed(path: Path, rf: RemoteFile, out_dir: Path, log: Log) -> Path:
    marker = _unpacked_marker(out_dir, rf.path)
    mark = _read_json(marker)
    if mark.get("digest") == rf.digest and (out_dir / str(mark.get("target", ""))).is_dir():
        return out_dir / mark["target"]
    target = unpack_archive(path, out_dir, log)
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
             partial_dir: str | Path | None = None) -> list[Path]:
    """List, download, check and (for archives) unpack the chosen files; returns the paths made.
    Partial files collect in ``partial_dir`` (default ``<out>/.download``)."""
    partial_dir = Path(partial_dir) if partial_dir is not None else None
    dois = {**DATASETS, **(dois or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[RemoteFile] = []
    for name in datasets:
        if name not in dois:
            raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(sorted(dois))}")
        files += list_files(name, dois[name], api_root, options, log)
    where = " and ".join(f"{d} ({dois[d]})" for d in datasets)
    planned = plan(select_files(files, names, where), out_dir, partial_dir)
    log(f"files of {where}:\n{describe(planned)}")
    if list_only:
        return []
    check_free_space(out_dir, space_needed(planned, unpack))
    made = []
    for p in planned:
        path = out_dir / p.file.path if p.done else fetch_file(p.file, out_dir, options, log, partial_dir)
        made.append(path)
        if unpack and p.file.is_archive:
            made.append(_unpack_if_needed(path, p.file, out_dir, log))
    return made


def add_download_command(add: Callable[..., argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register ``b2txt download`` with the CLI's ``add(name, func, help, description)``."""
    from .cli import _add_config

    p = add("download", cmd_download, "download the Dryad files, checked against their digests and resumable",
            "Walk the Dryad API (dataset -> last version -> files), show the sizes, download each file with a "
            "progress bar (resuming partial files with HTTP Range requests), check size and digest, and unpack "
            "zip/tar archives atomically into OUT (hdf5_data_final/, t15_pretrained_rnn_baseline/, ...). "
            "Running it again skips what is already there and checked.")
    _add_config(p)
    p.add_argument("--dataset", choices=[*DATASETS, "all"], default="data",
                   help="data: neural data, pickles and pretrained RNN; lm: language models; all: both (default: data)")
    p.add_argument("--files", nargs="+", metavar="NAME", help="only these files (names as Dryad lists them)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="data directory to download into")
    p.add_argument("--api-root", metavar="URL",
                   help=f"Dryad API root (default: download.api_root, else {DEFAULT_API_ROOT})")
    p.add_argument("--partial-dir", type=Path, metavar="DIR",
                   help="where partial downloads collect (default: download.partial_dir, else OUT/.download); "
                        "outside OUT they survive a workflow manager emptying OUT before a rerun")
    p.add_argument("--list", action="store_true", help="show the files and their sizes, download nothing")
    p.add_argument("--no-unpack", action="store_true", help="keep archives packed")
    p.add_argument("--retries", type=int, metavar="N", help="retries of a broken transfer (default 5)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="per-request timeout (default 60)")
    return p


def cmd_download(args: argparse.Namespace) -> int:
    from .cli import _config, log

    section = getattr(_config(args), "download", None)  # the `download:` config section, when present

    def setting(name: str, cli_value: Any, default: Any) -> Any:
        if cli_value is not None:
            return cli_value
        value = getattr(section, name, None)
        return default if value is None else value

    options = HttpOptions(timeout_s=setting("timeout_s", args.timeout, HttpOptions.timeout_s),
                          retries=setting("retries", args.retries, HttpOptions.retries))
    datasets = list(DATASETS) if args.dataset == "all" else [args.dataset]
    made = download(datasets, args.out, setting("files", args.files, None),
                    setting("api_root", args.api_root, DEFAULT_API_ROOT), options,
                    unpack=not args.no_unpack, list_only=args.list,
                    dois=setting("datasets", None, None), log=log,
                    partial_dir=setting("partial_dir", args.partial_dir, None))
    if not args.list:
        log(f"{args.out}: {len(made)} files and directories ready")
    return 0
