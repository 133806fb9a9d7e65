"""A GitHub-shaped HTTP server on 127.0.0.1: the REST contents API at commits, raw downloads of what git
holds (an LFS pointer for an LFS file) and the Git LFS media host, for `b2txt dvc-pin --github`.

``/api/repos/OWNER/REPO/contents/PATH?ref=COMMIT`` answers as GitHub does: a directory is an array of
entries (``type``, ``name``, ``path``, ``sha`` = git blob id, ``size``, ``download_url``), a file one
object with its bytes in base64. ``/raw/OWNER/REPO/COMMIT/PATH`` serves the git bytes and
``/media/OWNER/REPO/COMMIT/PATH`` the LFS file (what a test put there: corrupted, cut short, ...).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from .local_http import serving

LFS_SPEC = "version https://git-lfs.github.com/spec/v1"


def lfs_pointer(data: bytes, oid: str | None = None, size: int | None = None) -> bytes:
    """The pointer git holds for ``data`` kept in Git LFS (``oid``/``size`` override what it claims)."""
    oid = oid or hashlib.sha256(data).hexdigest()
    return f"{LFS_SPEC}\noid sha256:{oid}\nsize {len(data) if size is None else size}\n".encode()


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class GitEntry:
    git: bytes  # what git holds: the file, or its LFS pointer
    media: bytes | None = None  # what the LFS media host serves (LFS files only)
    raw: bytes | None = None  # what the raw download serves, when not ``git`` (a damaged download)


@dataclass
class FakeGithub:
    """Trees by (OWNER/REPO, COMMIT), each {path in the repository: GitEntry}; a log of request paths."""

    trees: dict[tuple[str, str], dict[str, GitEntry]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""

    @property
    def api_root(self) -> str:
        return f"{self.url}/api"

    @property
    def media_root(self) -> str:
        return f"{self.url}/media"

    def add(self, repo: str, commit: str, path: str, data: bytes, lfs: bool = False) -> GitEntry:
        entry = GitEntry(lfs_pointer(data), data) if lfs else GitEntry(data)
        self.trees.setdefault((repo, commit), {})[path] = entry
        return entry

    def downloads(self) -> list[str]:
        return [p for p in self.requests if not p.startswith("/api/")]


def _listing(state: FakeGithub, repo: str, commit: str, path: str) -> list[dict] | dict | None:
    tree = state.trees.get((repo, commit), {})
    base = f"{state.url}"

    def entry(p: str, kind: str) -> dict:
        doc = {"name": p.rsplit("/", 1)[-1], "path": p, "type": kind,
               "url": f"{base}/api/repos/{repo}/contents/{p}?ref={commit}",
               "html_url": f"{base}/{repo}/{'blob' if kind == 'file' else 'tree'}/{commit}/{p}"}
        if kind == "file":
            git = tree[p].git
            doc.update(sha=git_blob_sha(git), size=len(git), download_url=f"{base}/raw/{repo}/{commit}/{p}")
        else:
            doc.update(sha="0" * 40, size=0, download_url=None)
        return doc

    if path in tree:
        doc = entry(path, "file")
        return {**doc, "encoding": "base64", "content": base64.encodebytes(tree[path].git).decode()}
    children: dict[str, str] = {}
    for p in tree:
        if p.startswith(f"{path}/"):
            first = p[len(path) + 1:].split("/", 1)
            children[f"{path}/{first[0]}"] = "dir" if len(first) > 1 else "file"
    return [entry(p, kind) for p, kind in sorted(children.items())] if children else None


def _handler(state: FakeGithub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            state.requests.append(path)
            if m := re.fullmatch(r"/api/repos/([^/]+/[^/]+)/contents/(.+)", path):
                ref = urllib.parse.parse_qs(url.query).get("ref", [""])[0]
                doc = _listing(state, m[1], ref, m[2].rstrip("/"))
                if doc is None:
                    return self.send_error(404, "Not Found")
                return self._send(json.dumps(doc).encode(), "application/json; charset=utf-8")
            if m := re.fullmatch(r"/(raw|media)/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path):
                entry = state.trees.get((m[2], m[3]), {}).get(m[4])
                if entry is None:
                    return self.send_error(404, "Not Found")
                if m[1] == "raw":
                    return self._send(entry.git if entry.raw is None else entry.raw, "text/plain; charset=utf-8")
                return self._send(entry.git if entry.media is None else entry.media, "application/octet-stream")
            self.send_error(404, "Not Found")

    return Handler


@contextlib.contextmanager
def github_server() -> Iterator[FakeGithub]:
    """Start a fake GitHub on 127.0.0.1; tests add files and use ``api_root`` and ``media_root``."""
    state = FakeGithub()
    with serving(_handler(state)) as url:
        state.url = url
        yield state
