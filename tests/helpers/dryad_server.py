"""A Dryad-shaped HTTP server on 127.0.0.1 (API v2: datasets -> versions -> files, downloads with
Range requests), and archive makers: the downloads, the published-model and the data-source tests
run against it (the ``dryad`` fixture of conftest.py)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import tarfile
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

from b2txt.data.dryad_api import DATASETS

from .local_http import serving

DATA_DOI, LM_DOI = DATASETS["data"], DATASETS["lm"]


@dataclass
class Blob:
    data: bytes
    digest: str | None = None  # what the API claims; the right one (of digest_type) when None
    digest_type: str = "md5"  # as the API names it ("md5", "sha-256")
    drop_after: int | None = None  # close the connection after this many body bytes, once
    ignore_range: bool = False
    status: int = 200
    size: int | None = None  # what the API claims; the real size when None


@dataclass
class FakeDryad:
    """The state behind the server: datasets (DOI -> {name: Blob}) and a log of requests."""

    datasets: dict[str, dict[str, Blob]]
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    per_page: int = 2
    url: str = ""

    def file_ids(self) -> dict[int, tuple[str, str]]:
        ids, n = {}, 100
        for doi, files in self.datasets.items():
            for name in files:
                ids[n] = (doi, name)
                n += 1
        return ids

    def blob_requests(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.requests if path == f"/store/{urllib.parse.quote(name)}"]


def _handler(state: FakeDryad) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _json(self, doc: dict) -> None:
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/hal+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            state.requests.append((self.path.split("?")[0], self.headers.get("Range")))
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            ids = state.file_ids()
            if m := re.fullmatch(r"/api/v2/datasets/([^/]+)/versions", url.path):
                doi = urllib.parse.unquote(m[1])
                if doi not in state.datasets:
                    return self.send_error(404, "dataset not found")
                key = list(state.datasets).index(doi)
                versions = [{"versionNumber": v, "_links": {
                    "self": {"href": f"/api/v2/versions/{key}{v}"},
                    "stash:files": {"href": f"/api/v2/versions/{key}{v}/files"}}} for v in (1, 2)]
                return self._json({"_links": {"self": {"href": url.path}}, "count": 2, "total": 2,
                                   "_embedded": {"stash:versions": versions}})
            if m := re.fullmatch(r"/api/v2/versions/(\d)(\d)/files", url.path):
                if m[2] != "2":  # only the last version has the files we check
                    return self._json({"_embedded": {"stash:files": []}})
                doi = list(state.datasets)[int(m[1])]
                entries = []
                for fid, (d, name) in ids.items():
                    if d != doi:
                        continue
                    blob = state.datasets[d][name]
                    entries.append({
                        "path": name, "size": blob.size or len(blob.data), "mimeType": "application/octet-stream",
                        "status": "created", "digestType": blob.digest_type,
                        "digest": blob.digest or hashlib.new(blob.digest_type.replace("-", ""), blob.data).hexdigest(),
                        "_links": {"stash:download": {"href": f"/api/v2/files/{fid}/download"}}})
                page = int(query.get("page", ["1"])[0])
                chunk = entries[(page - 1) * state.per_page: page * state.per_page]
                links = {"self": {"href": url.path}}
                if page * state.per_page < len(entries):
                    links["next"] = {"href": f"{url.path}?page={page + 1}"}
                return self._json({"_links": links, "count": len(chunk), "total": len(entries),
                                   "_embedded": {"stash:files": chunk}})
            if m := re.fullmatch(r"/api/v2/files/(\d+)/download", url.path):
                doi, name = ids[int(m[1])]
                self.send_response(302)
                self.send_header("Location", f"/store/{urllib.parse.quote(name)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if url.path.startswith("/store/"):
                name = urllib.parse.unquote(url.path[len("/store/"):])
                blob = next(f[name] for f in state.datasets.values() if name in f)
                return self._blob(blob)
            self.send_error(404)

        def _blob(self, blob: Blob) -> None:
            if blob.status != 200:
                return self.send_error(blob.status)
            start = 0
            rng = self.headers.get("Range")
            if rng and not blob.ignore_range:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(blob.data) - 1}/{len(blob.data)}")
            else:
                self.send_response(200)
            body = blob.data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if blob.drop_after is not None:
                cut, blob.drop_after = blob.drop_after, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def dryad_server() -> Iterator[FakeDryad]:
    """Start a fake Dryad on 127.0.0.1; tests fill ``state.datasets`` and use ``state.url``."""
    state = FakeDryad({DATA_DOI: {}, LM_DOI: {}})
    with serving(_handler(state)) as url:
        state.url = f"{url}/api/v2"
        yield state


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
