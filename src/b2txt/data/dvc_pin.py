"""Published Dryad files pinned in DVC: ``.dvc`` files holding the md5 and size Dryad lists, so that a
collaborator's ``dvc pull`` brings exactly those bytes (``b2txt dvc-pin``).

What DVC 3.67 does with the alternatives, found by running it (README, "Sharing data and models"):

- an import ``.dvc`` file (``dvc import-url``) that records the md5 never makes ``dvc pull`` contact the
  source: only remotes are asked. Without the md5 (``--no-download``) ``dvc pull`` does fetch from the
  source but checks nothing (a corrupted body is checked out, exit 0), and ``dvc status`` never
  calls it up to date; ``dvc update`` downloads again and records whatever md5 arrived;
- from an HTTP remote, ``dvc pull`` checks what it downloads against the md5 only when the remote has
  ``verify = true`` (then a damaged object is dropped and nothing is checked out).

So a pin here is a data-source ``.dvc`` file (the kind ``dvc add`` writes: ``outs`` with ``md5``,
``size``, ``hash: md5``), with the Dryad DOI, download URL and digest under ``meta`` (which DVC
ignores). Its md5 is Dryad's own when Dryad lists md5 digests; for another digest type the file is
downloaded, checked against it and hashed. Downloads use :func:`b2txt.data.fetch.fetch_checked`
(resumable, size and digest checked) and only a checked file is renamed into the DVC cache
(``<cache>/files/md5/<2>/<30>``, read-only, the layout DVC documents); ``dvc checkout`` then links
it into place. ``dvc push`` shares it; ``dvc pull`` (with ``verify = true``) checks it again.

A directory of a GitHub repository at a fixed commit (the published 1-gram graph, REFERENCE §1;
:mod:`b2txt.data.github_api`) becomes one directory pin, ``<out>/<name>.dvc``, as ``dvc add <dir>``
writes it (``md5: <hex>.dir``, ``size``, ``nfiles``), so ``dvc pull <out>/<name>`` brings the whole
directory. Each file is downloaded and checked first (git's blob id and size; for a Git LFS pointer,
the LFS file against the pointer's sha256 and size); only when every file is checked do they enter
the DVC cache, with the ``.dir`` object listing their md5s (serialised as dvc-data does, so DVC
computes the same md5 from the checked-out directory); then the pin, and ``dvc checkout``. A failure
leaves the target and the cache as they were; checked partial files wait in the partial directory
for the next run. ``meta.github`` names the repository, commit and path, and each file's size, md5
and the digest it was checked against.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..ground.console import Log
from ..ground.errors import DownloadError, DvcError
from ..ground.fileio import atomic_file, human_size, write_text_atomic
from ..ground.procs import dies_with_parent
from .dryad_api import DEFAULT_API_ROOT, HttpOptions, RemoteFile, listed_files
from .fetch import check_free_space, fetch_checked, file_digest, move_file
from .github_api import DEFAULT_API_ROOT as GITHUB_API_ROOT
from .github_api import (
    DEFAULT_MEDIA_ROOT,
    LFS_POINTER_MAX,
    GitFile,
    GithubSource,
    lfs_file,
    list_tree,
    parse_lfs_pointer,
)

PIN_SUFFIX = ".dvc"
HEADER = ("# Written by `b2txt dvc-pin` from the Dryad API: a published file, pinned by the md5 and size Dryad\n"
          "# lists. `dvc pull` brings it from a DVC remote (checked there when the remote has verify = true);\n"
          "# `b2txt dvc-pin` downloads it from Dryad, checked, into the DVC cache. Commit this file.\n")


@dataclass(frozen=True)
class Pin:
    """One pinned file: what Dryad lists and the md5 DVC knows it by."""

    file: RemoteFile
    doi: str
    md5: str

    def text(self) -> str:
        rf = self.file
        doc: dict[str, Any] = {
            "outs": [{"md5": self.md5, "size": rf.size, "hash": "md5", "path": rf.path}],
            "meta": {"dryad": {"doi": self.doi, "dataset": rf.dataset, "file": rf.path, "url": rf.url,
                               "digest": rf.digest, "digestType": rf.digest_type}},
        }
        return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def pin_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}{PIN_SUFFIX}"


def read_pin(path: Path) -> dict[str, Any] | None:
    """The ``meta.dryad`` record and md5 of a pin this command wrote; None when ``path`` is not one."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict):
        return None
    dryad = (doc.get("meta") or {}).get("dryad") if isinstance(doc.get("meta"), dict) else None
    outs = doc.get("outs")
    if not isinstance(dryad, dict) or not isinstance(outs, list) or len(outs) != 1 or not isinstance(outs[0], dict):
        return None
    return {**dryad, "md5": outs[0].get("md5")}


def is_md5(rf: RemoteFile) -> bool:
    return rf.digest_type.lower().replace("-", "") == "md5"


def known_md5(rf: RemoteFile, previous: dict[str, Any] | None) -> str | None:
    """The md5 of ``rf`` without downloading: Dryad's own, or that of an earlier pin of the same file."""
    if is_md5(rf):
        return rf.digest
    if previous and previous.get("digest") == rf.digest and previous.get("digestType") == rf.digest_type:
        return previous.get("md5")
    return None


# ----------------------------------------------------------------------------- writing pins

def check_writable(out_dir: Path, files: list[RemoteFile], force: bool) -> dict[str, dict[str, Any] | None]:
    """Each file's earlier pin (None if there is none); a ``.dvc`` file not written here is refused."""
    previous: dict[str, dict[str, Any] | None] = {}
    for rf in files:
        path = pin_path(out_dir, rf.path)
        previous[rf.path] = read_pin(path) if path.exists() else None
        if path.exists() and previous[rf.path] is None and not force:
            raise DvcError(f"{path}: a .dvc file not written by `b2txt dvc-pin` (no meta.dryad); left as it is "
                           "(--force replaces it)")
    return previous


def write_pin(out_dir: Path, pin: Pin, previous: dict[str, Any] | None, log: Log) -> Path:
    path = pin_path(out_dir, pin.file.path)
    if previous and previous.get("md5") not in (None, pin.md5):
        log(f"{path}: Dryad lists another version now (md5 {previous.get('md5')} -> {pin.md5}); pin updated")
    write_text_atomic(path, pin.text())
    return path


def ignore_in_git(out_dir: Path, names: list[str]) -> None:
    """``/<name>`` lines in ``<out>/.gitignore`` (as ``dvc add`` writes them): the files stay out of git."""
    path = Path(out_dir) / ".gitignore"
    lines = path.read_text().splitlines() if path.exists() else []
    missing = [f"/{n}" for n in names if f"/{n}" not in lines]
    if missing:
        write_text_atomic(path, "\n".join(lines + missing) + "\n")


# ----------------------------------------------------------------------------- the DVC cache

def run_dvc(args: list[str], cwd: Path) -> str:
    """``dvc ARGS`` in ``cwd``; its stdout, or a :class:`DvcError` with the tail of its stderr."""
    exe = shutil.which("dvc")
    if exe is None:
        raise DvcError("dvc is not installed (pip install 'b2txt[workflow]'); --no-download writes the pins "
                       "without it")
    r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, preexec_fn=dies_with_parent())
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-6:]
        raise DvcError(f"`dvc {' '.join(args)}` in {cwd} failed (exit {r.returncode}): " + " / ".join(tail))
    return r.stdout.strip()


@dataclass(frozen=True)
class DvcRepo:
    root: Path
    cache: Path

    @classmethod
    def around(cls, path: Path) -> "DvcRepo":
        """The DVC repository holding ``path`` (which need not exist yet): ``dvc root`` and ``dvc cache dir``."""
        here = Path(path).absolute()
        while not here.is_dir():
            here = here.parent
        root = (here / run_dvc(["root"], here)).resolve()
        return cls(root, Path(run_dvc(["cache", "dir"], here)).resolve())

    def object(self, md5: str) -> Path:
        """Where DVC 3 keeps a file with this md5 (``hash: md5``)."""
        return self.cache / "files" / "md5" / md5[:2] / md5[2:]

    def has(self, md5: str, size: int) -> bool:
        obj = self.object(md5)
        return obj.is_file() and obj.stat().st_size == size


def into_cache(repo: DvcRepo, checked: Path, md5: str) -> Path:
    """Move a checked file into the DVC cache under its md5, read-only as DVC keeps its objects."""
    obj = repo.object(md5)
    move_file(checked, obj)
    os.chmod(obj, 0o444)
    return obj


def adoptable(target: Path, rf: RemoteFile) -> bool:
    """A plain file already at the target (e.g. from ``b2txt download --no-unpack``) that is this exact file."""
    return (target.is_file() and not target.is_symlink() and target.stat().st_size == rf.size
            and file_digest(target, rf.digest_type) == rf.digest)


def cache_file(repo: DvcRepo, out_dir: Path, rf: RemoteFile, md5: str | None, options: HttpOptions,
               partial_dir: Path, log: Log) -> str:
    """Get ``rf`` into the DVC cache (adopted from the target, or downloaded and checked); returns its md5."""
    if md5 is not None and repo.has(md5, rf.size):
        return md5
    target = out_dir / rf.path
    if adoptable(target, rf):
        checked = target
        log(f"{target}: already there and checked; moved into the DVC cache")
    else:
        checked = fetch_checked(rf, partial_dir / f"{rf.path}.{rf.digest[:16]}.part", options, log)
    if md5 is None:
        md5 = file_digest(checked, "md5")
    into_cache(repo, checked, md5)
    return md5


# ----------------------------------------------------------------------------- the command

def _table(files: list[RemoteFile], state: dict[str, str]) -> str:
    width = max((len(f.path) for f in files), default=4)
    lines = [f"  {f.path:<{width}}  {human_size(f.size):>9}  {f.dataset:<4}  {state[f.path]}" for f in files]
    return "\n".join(lines)


def pin_files(datasets: list[str], out_dir: str | Path, names: list[str] | None = None,
              api_root: str = DEFAULT_API_ROOT, options: HttpOptions = HttpOptions(), download: bool = True,
              force: bool = False, dois: dict[str, str] | None = None, log: Log = print,
              partial_dir: str | Path | None = None) -> list[Path]:
    """Pin the chosen files of ``datasets`` in ``out_dir`` (one ``<name>.dvc`` each, and ``.gitignore``
    entries); with ``download``, also get each into the DVC cache, checked, and check it out.
    Returns the pin files. Partial downloads collect in ``partial_dir`` (default ``.dvc/tmp/b2txt-partial``)."""
    out_dir = Path(out_dir)
    files, where = listed_files(datasets, names, api_root, options, dois, log)
    previous = check_writable(out_dir, files, force)
    md5s = {f.path: known_md5(f, previous[f.path]) for f in files}
    unknown = [f"{f.path} ({f.digest_type})" for f in files if md5s[f.path] is None]
    if unknown and not download:
        raise DownloadError(f"{', '.join(unknown)}: Dryad lists no md5 digest, and DVC pins by md5: these must be "
                            "downloaded to be pinned (leave out --no-download)")
    repo = DvcRepo.around(out_dir) if download else None
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f.path: "pin only" for f in files}
    if repo is not None:
        state = {f.path: "in the DVC cache" if md5s[f.path] and repo.has(md5s[f.path], f.size) else "to download"
                 for f in files}
    log(f"files of {where}, pinned in {out_dir}:\n{_table(files, state)}")

    pins: dict[str, Path] = {}
    for f in files:  # pins first: they come from the listing alone
        if md5s[f.path] is not None:
            pins[f.path] = write_pin(out_dir, Pin(f, dois[f.dataset], md5s[f.path]), previous[f.path], log)
    ignore_in_git(out_dir, [f.path for f in files])
    if repo is not None:
        repo.cache.mkdir(parents=True, exist_ok=True)  # a new repository has none yet
        check_free_space(repo.cache, sum(f.size for f in files if state[f.path] == "to download"))
        partial = Path(partial_dir) if partial_dir is not None else repo.root / ".dvc" / "tmp" / "b2txt-partial"
        for f in files:
            md5 = cache_file(repo, out_dir, f, md5s[f.path], options, partial, log)
            if md5s[f.path] is None:
                pins[f.path] = write_pin(out_dir, Pin(f, dois[f.dataset], md5), previous[f.path], log)
        run_dvc(["checkout", *[p.name for p in pins.values()]], out_dir)
        if partial.is_dir() and not any(partial.iterdir()):
            partial.rmdir()
    return [pins[f.path] for f in files]


# ----------------------------------------------------------------------------- GitHub directories

GITHUB_HEADER = ("# Written by `b2txt dvc-pin --github`: a directory of a GitHub repository at a fixed commit, pinned as\n"
                 "# `dvc add` would (md5.dir); each file was checked against git's blob id or its Git LFS sha256. `dvc pull`\n"
                 "# brings it from a DVC remote; `b2txt dvc-pin --github` from GitHub. Commit this file.\n")


@dataclass(frozen=True)
class DirEntry:
    """One file of a pinned directory: its md5 (what DVC knows it by) and what it was checked against."""

    relpath: str
    size: int
    md5: str
    blob: str  # the git blob id the API lists (an LFS pointer's, for an LFS file)
    digest: str
    digest_type: str  # git-blob-sha1, or sha256 for a Git LFS file
    url: str

    def record(self) -> dict[str, Any]:
        return {"path": self.relpath, "size": self.size, "md5": self.md5, "digestType": self.digest_type,
                "digest": self.digest, "blob": self.blob, "url": self.url}


def tree_object(entries: list[DirEntry]) -> bytes:
    """DVC's ``.dir`` object: ``[{"md5", "relpath"}]`` sorted by path, serialised as dvc-data does."""
    listing = [{"md5": e.md5, "relpath": e.relpath} for e in sorted(entries, key=lambda e: e.relpath)]
    return json.dumps(listing, sort_keys=True).encode("utf-8")


def dir_pin_text(source: GithubSource, entries: list[DirEntry], tree_md5: str) -> str:
    doc: dict[str, Any] = {
        "outs": [{"md5": f"{tree_md5}.dir", "size": sum(e.size for e in entries), "nfiles": len(entries),
                  "hash": "md5", "path": source.name}],
        "meta": {"github": {"repo": source.repo, "commit": source.commit, "path": source.path,
                            "files": [e.record() for e in sorted(entries, key=lambda e: e.relpath)]}},
    }
    return GITHUB_HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def read_dir_pin(path: Path) -> dict[str, Any] | None:
    """The ``meta.github`` record of a directory pin this command wrote; None when ``path`` is not one."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    meta = doc.get("meta") if isinstance(doc, dict) else None
    github = meta.get("github") if isinstance(meta, dict) else None
    if not isinstance(github, dict) or not isinstance(github.get("files"), list):
        return None
    return github


def _cached_entries(previous: dict[str, Any] | None, source: GithubSource, files: list[GitFile],
                    repo: DvcRepo) -> dict[str, DirEntry]:
    """Files an earlier pin of the same source recorded with the same blob id, still in the DVC cache."""
    if not previous or (previous.get("repo"), previous.get("commit"), previous.get("path")) != (
            source.repo, source.commit, source.path):
        return {}
    blobs = {f.relpath: f.sha for f in files}
    known = {}
    for r in previous["files"]:
        try:
            e = DirEntry(str(r["path"]), int(r["size"]), str(r["md5"]), str(r["blob"]), str(r["digest"]),
                         str(r["digestType"]), str(r["url"]))
        except (KeyError, TypeError, ValueError):
            continue
        if blobs.get(e.relpath) == e.blob and repo.has(e.md5, e.size):
            known[e.relpath] = e
    return known


def _checked_git_files(source: GithubSource, files: list[GitFile], media_root: str, partial: Path,
                       options: HttpOptions, log: Log) -> dict[str, tuple[Path, RemoteFile, GitFile]]:
    """Download and check every file (an LFS pointer's file from the media host); nothing enters the cache."""
    resolved: list[tuple[RemoteFile, GitFile]] = []
    checked: dict[str, tuple[Path, RemoteFile, GitFile]] = {}
    for f in files:
        rf = f.remote()
        part = fetch_checked(rf, partial / f"{f.relpath}.{rf.digest[:16]}.part", options, log)
        pointer = parse_lfs_pointer(part.read_bytes(), f"{source}/{f.relpath}") if f.size < LFS_POINTER_MAX else None
        if pointer is None:
            checked[f.relpath] = (part, rf, f)
            continue
        part.unlink()
        lfs = lfs_file(source, f, pointer, media_root)
        log(f"{f.relpath}: a Git LFS file, {human_size(lfs.size)} from {lfs.url}")
        resolved.append((lfs, f))
    if resolved:
        check_free_space(partial, sum(lfs.size for lfs, _ in resolved))  # there: the pointers came there
    for lfs, f in resolved:
        checked[f.relpath] = (fetch_checked(lfs, partial / f"{f.relpath}.{lfs.digest[:16]}.part", options, log), lfs, f)
    return checked


def _into_cache_once(repo: DvcRepo, part: Path, md5: str, size: int) -> None:
    if repo.has(md5, size):
        part.unlink()
    else:
        into_cache(repo, part, md5)


def _write_tree(repo: DvcRepo, entries: list[DirEntry]) -> str:
    """The directory's ``.dir`` object in the cache (read-only); returns its md5."""
    data = tree_object(entries)
    tree_md5 = hashlib.md5(data).hexdigest()
    obj = repo.object(f"{tree_md5}.dir")
    if not (obj.is_file() and obj.read_bytes() == data):
        with atomic_file(obj) as tmp:
            Path(tmp).write_bytes(data)
        os.chmod(obj, 0o444)
    return tree_md5


def _prune_empty(top: Path) -> None:
    """Remove ``top`` and the directories under it that hold no file (partial downloads all done)."""
    if not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()
    if not any(top.iterdir()):
        top.rmdir()


def pin_github(source: GithubSource, out_dir: str | Path, api_root: str = GITHUB_API_ROOT,
               media_root: str = DEFAULT_MEDIA_ROOT, options: HttpOptions = HttpOptions(), force: bool = False,
               log: Log = print, partial_dir: str | Path | None = None) -> Path:
    """Pin the directory ``source`` names as ``<out_dir>/<name>.dvc``: every file downloaded and checked,
    then into the DVC cache with its ``.dir`` object, the pin written and the directory checked out.
    Returns the pin. Partial downloads collect in ``partial_dir`` (default ``.dvc/tmp/b2txt-partial``)."""
    out_dir = Path(out_dir)
    pin = pin_path(out_dir, source.name)
    previous = read_dir_pin(pin) if pin.exists() else None
    if pin.exists() and previous is None and not force:
        raise DvcError(f"{pin}: a .dvc file not written by `b2txt dvc-pin --github` (no meta.github); left as it "
                       "is (--force replaces it)")
    files = list_tree(source, api_root, options, log)
    repo = DvcRepo.around(out_dir)
    known = _cached_entries(previous, source, files, repo)
    width = max(len(f.relpath) for f in files)
    log(f"files of {source}, pinned as {out_dir / source.name} (sizes as git holds them; a Git LFS file's is "
        "its pointer's):\n" + "\n".join(
        f"  {f.relpath:<{width}}  {human_size(known[f.relpath].size if f.relpath in known else f.size):>9}  "
        f"{'in the DVC cache' if f.relpath in known else 'to download'}" for f in files))
    partial_root = Path(partial_dir) if partial_dir is not None else repo.root / ".dvc" / "tmp" / "b2txt-partial"
    partial = partial_root / f"github-{source.name}"
    todo = [f for f in files if f.relpath not in known]
    checked = _checked_git_files(source, todo, media_root, partial, options, log)
    repo.cache.mkdir(parents=True, exist_ok=True)  # every file is checked: now they enter the cache
    entries = dict(known)
    for relpath, (part, rf, f) in checked.items():
        md5 = file_digest(part, "md5")
        _into_cache_once(repo, part, md5, rf.size)
        entries[relpath] = DirEntry(relpath, rf.size, md5, f.sha, rf.digest, rf.digest_type, rf.url)
    ordered = [entries[f.relpath] for f in files]
    tree_md5 = _write_tree(repo, ordered)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(pin, dir_pin_text(source, ordered, tree_md5))
    if previous and [r.get("md5") for r in previous["files"] if isinstance(r, dict)] != [e.md5 for e in ordered]:
        log(f"{pin}: another directory than the earlier pin ({previous.get('repo')}@{previous.get('commit')}:"
            f"{previous.get('path')}); pin updated")
    ignore_in_git(out_dir, [source.name])
    try:
        run_dvc(["checkout", pin.name], out_dir)
    except DvcError as exc:
        raise DvcError(f"{exc}. The pin and the DVC cache are complete: move what is at {out_dir / source.name} "
                       f"aside, then `dvc checkout {pin}`") from None
    _prune_empty(partial)
    if partial_root.is_dir() and not any(partial_root.iterdir()):
        partial_root.rmdir()
    return pin
