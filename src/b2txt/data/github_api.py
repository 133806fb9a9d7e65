"""Files of a GitHub repository at one commit, through the REST contents API (the published 1-gram
graph lives there, REFERENCE §1).

``GET <api root>/repos/OWNER/REPO/contents/PATH?ref=COMMIT`` lists a directory as an array of entries
(``type``, ``path``, ``size``, ``sha``: the git blob id, ``download_url``: the bytes git holds). A file
kept in Git LFS is, in git, a small pointer (``version https://git-lfs.github.com/spec/v1``, ``oid
sha256:<hex>``, ``size <n>``): the API lists and serves the pointer, and the file itself comes from the
LFS media host (``<media root>/OWNER/REPO/COMMIT/PATH``), checked against the pointer's sha256 and size.
Every git file is checked against its blob id (:data:`b2txt.data.fetch.GIT_BLOB_SHA1`) and size; with
the commit given in full, what a source names can never change.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ..ground.config import GITHUB_SOURCE_PATTERN
from ..ground.console import Log
from ..ground.errors import DownloadError
from .dryad_api import HttpOptions, RemoteFile, get_json_value
from .fetch import GIT_BLOB_SHA1

DEFAULT_API_ROOT = "https://api.github.com"
DEFAULT_MEDIA_ROOT = "https://media.githubusercontent.com/media"
LFS_SPEC = b"version https://git-lfs.github.com/spec/v1\n"
#: Git LFS pointers are smaller than this (the LFS specification); larger git files are never pointers.
LFS_POINTER_MAX = 1024


@dataclass(frozen=True)
class GithubSource:
    """A directory of a repository at one commit: ``OWNER/REPO@COMMIT:PATH``."""

    repo: str
    commit: str
    path: str

    @classmethod
    def parse(cls, spec: str, where: str = "--github") -> "GithubSource":
        m = re.fullmatch(GITHUB_SOURCE_PATTERN, spec)
        if m is None:
            raise DownloadError(f"{where}: {spec!r} is not OWNER/REPO@COMMIT:PATH with a full 40-hex commit "
                                "(a branch or tag could change under the pin)")
        path = m[3].strip("/")
        parts = PurePosixPath(path).parts
        if not parts or any(p in (".", "..") for p in parts):
            raise DownloadError(f"{where}: {spec!r}: PATH must name a directory inside the repository")
        return cls(m[1], m[2], path)

    @property
    def name(self) -> str:
        """The directory's own name: what it is pinned as."""
        return PurePosixPath(self.path).name

    def __str__(self) -> str:
        return f"{self.repo}@{self.commit}:{self.path}"


@dataclass(frozen=True)
class GitFile:
    """One file of the directory as git holds it: its blob id and size (an LFS pointer's, for LFS files)."""

    relpath: str  # inside the source directory, with '/'
    path: str  # inside the repository
    size: int
    sha: str
    url: str

    def remote(self) -> RemoteFile:
        """The git bytes, as a download checked against the blob id."""
        return RemoteFile("github", self.relpath, self.size, self.sha, GIT_BLOB_SHA1, self.url)


@dataclass(frozen=True)
class LfsPointer:
    oid: str  # sha256, hex
    size: int


def contents_url(api_root: str, repo: str, path: str, commit: str) -> str:
    return (f"{api_root.rstrip('/')}/repos/{repo}/contents/{urllib.parse.quote(path)}"
            f"?ref={urllib.parse.quote(commit)}")


def media_url(media_root: str, repo: str, commit: str, path: str) -> str:
    return f"{media_root.rstrip('/')}/{repo}/{commit}/{urllib.parse.quote(path)}"


def _git_file(source: GithubSource, url: str, entry: dict[str, Any]) -> GitFile:
    path, size, sha, download = entry.get("path"), entry.get("size"), entry.get("sha"), entry.get("download_url")
    where = f"{url}: entry {path!r}"
    if not isinstance(path, str) or not path.startswith(f"{source.path}/"):
        raise DownloadError(f"{where}: not a path inside {source.path}/")
    relpath = path[len(source.path) + 1:]
    if any(p in ("", ".", "..") for p in relpath.split("/")):
        raise DownloadError(f"{where}: not a plain relative path, refusing to write it")
    if not isinstance(size, int) or size < 0:
        raise DownloadError(f"{where}: no valid size ({size!r})")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{40}", sha):
        raise DownloadError(f"{where}: no git blob sha ({sha!r}), so it cannot be checked")
    if not isinstance(download, str) or not download:
        raise DownloadError(f"{where}: no download_url (a submodule?); only files and directories can be pinned")
    return GitFile(relpath, path, size, sha, urllib.parse.urljoin(url, download))


def list_tree(source: GithubSource, api_root: str, options: HttpOptions, log: Log = print) -> list[GitFile]:
    """Every file under the source directory (sub-directories followed), sorted by relative path."""
    files: list[GitFile] = []
    todo = [source.path]
    while todo:
        url = contents_url(api_root, source.repo, todo.pop(), source.commit)
        doc = get_json_value(url, options, log)
        if isinstance(doc, dict):
            raise DownloadError(f"{url}: a {doc.get('type', 'non-directory')!r}, not a directory; --github pins "
                                "a directory")
        if not isinstance(doc, list):
            raise DownloadError(f"{url}: expected a JSON array (a directory listing), got {type(doc).__name__}")
        for entry in doc:
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind == "dir" and isinstance(entry.get("path"), str):
                todo.append(entry["path"])
            elif kind == "file":
                files.append(_git_file(source, url, entry))
            else:
                name = entry.get("path") if isinstance(entry, dict) else entry
                raise DownloadError(f"{url}: {name!r} is a {kind or 'malformed entry'}; only files and directories "
                                    "can be pinned")
    if not files:
        raise DownloadError(f"{contents_url(api_root, source.repo, source.path, source.commit)}: no files in "
                            f"{source}")
    return sorted(files, key=lambda f: f.relpath)


def parse_lfs_pointer(data: bytes, where: str) -> LfsPointer | None:
    """The pointer a git file holds when it is kept in Git LFS; None for any other file."""
    if len(data) >= LFS_POINTER_MAX or not data.startswith(LFS_SPEC):
        return None
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines()[1:]:
        key, _, value = line.partition(" ")
        fields[key] = value.strip()
    oid = re.fullmatch(r"sha256:([0-9a-f]{64})", fields.get("oid", ""))
    size = fields.get("size", "")
    if oid is None or not size.isdigit():
        raise DownloadError(f"{where}: a Git LFS pointer without a sha256 oid and a size "
                            f"(oid {fields.get('oid')!r}, size {size!r}); cannot check the file")
    return LfsPointer(oid[1], int(size))


def lfs_file(source: GithubSource, git: GitFile, pointer: LfsPointer, media_root: str) -> RemoteFile:
    """The LFS file a pointer names, as a download checked against its sha256 and size."""
    return RemoteFile("github", git.relpath, pointer.size, pointer.oid, "sha256",
                      media_url(media_root, source.repo, source.commit, git.path))
