"""A writable HTTP store on 127.0.0.1: a DVC ``http://`` remote that a test can push to and pull from.

GET and HEAD serve the files under a directory; POST and PUT (DVC's http remote uploads with POST by
default, ``method = PUT`` in the remote's config switches) store the request body there, whether it
comes with a ``Content-Length`` or chunked (``Transfer-Encoding: chunked``, as DVC streams it).
Bodies are written to a temporary file and renamed into place, so a failed upload leaves nothing;
paths that would leave the directory are refused. ``uploads`` records every upload's method.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import BinaryIO

from .local_http import serving


@dataclass
class HttpStore:
    root: Path
    url: str = ""
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (method, path)

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def _chunked(rfile: BinaryIO, out: BinaryIO) -> None:
    while True:
        size = int(rfile.readline().split(b";", 1)[0].strip(), 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return
        out.write(rfile.read(size))
        rfile.readline()  # the CRLF after each chunk


def _handler(store: HttpStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _path(self) -> Path | None:
            rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            path = (store.root / rel).resolve()
            return path if path.is_relative_to(store.root.resolve()) and rel else None

        def _reply(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            path = self._path()
            if path is None or not path.is_file():
                return self._reply(404)
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if not head:
                with open(path, "rb") as f:
                    try:
                        shutil.copyfileobj(f, self.wfile)
                    except (BrokenPipeError, ConnectionResetError):  # DVC reads the start of a file, then hangs up
                        self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

        def _upload(self) -> None:
            path = self._path()
            if path is None:
                return self._reply(403)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                        _chunked(self.rfile, out)
                    else:
                        out.write(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            store.uploads.append((self.command, str(path.relative_to(store.root))))
            self._reply(201)

        do_POST = do_PUT = _upload  # noqa: N815

    return Handler


@contextlib.contextmanager
def http_store(root: Path) -> Iterator[HttpStore]:
    """Serve ``root`` (created) read-write on 127.0.0.1 until the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    store = HttpStore(root)
    with serving(_handler(store)) as url:
        store.url = url
        yield store
