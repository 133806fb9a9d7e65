"""The Dryad API (v2, HAL+JSON), walked as the published data are laid out (REFERENCE §1).

``<api root>/datasets/<url-encoded DOI>/versions`` → the last version's ``stash:files`` link →
each file entry (``path``, ``size``, ``digest``, ``digestType``) and its ``stash:download`` link.
Links are paths on the API host; list pages are followed through ``_links.next``. Refused
connections and unknown hosts are final (no network, or a wrong API root); a connection that
breaks, a timeout or a 5xx/429 status is retried. Every problem is one :class:`DownloadError`
line naming the URL or the file.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .. import __version__
from ..ground.archive import is_archive
from ..ground.console import Log
from ..ground.errors import DownloadError

DEFAULT_API_ROOT = "https://datadryad.org/api/v2"
#: Dataset choices of ``--dataset`` and their DOIs (REFERENCE §1).
DATASETS: dict[str, str] = {
    "data": "doi:10.5061/dryad.dncjsxm85",  # neural data, pickles, pretrained RNN
    "lm": "doi:10.5061/dryad.x69p8czpq",  # 3-gram and 5-gram language models
}


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
        return is_archive(self.path)


class Transient(Exception):
    """A transfer that broke off mid-way; worth retrying (with Range when bytes arrived)."""


# ----------------------------------------------------------------------------- HTTP

def _request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"User-Agent": f"b2txt/{__version__}", **(headers or {})})


def open_url(url: str, options: HttpOptions, headers: dict[str, str] | None = None,
          accept: tuple[int, ...] = ()) -> http.client.HTTPResponse | urllib.error.HTTPError:
    """Open ``url``; HTTP statuses in ``accept`` are returned, every other failure is classified.

    Refused connections and unknown hosts are final (no network or a wrong API root); a
    connection that breaks, a timeout or a 5xx/429 status is :class:`Transient`.
    """
    try:
        return urllib.request.urlopen(_request(url, headers), timeout=options.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code in accept:
            return exc
        exc.close()
        if exc.code >= 500 or exc.code == 429:
            raise Transient(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (ConnectionResetError, ConnectionAbortedError, TimeoutError, socket.timeout)):
            raise Transient(f"{url}: {reason or type(reason).__name__}") from None
        raise DownloadError(f"{url}: cannot connect ({reason}); no network, or a wrong API root "
                            "(--api-root / download.api_root)?") from None
    except (ConnectionError, TimeoutError, http.client.HTTPException) as exc:
        raise Transient(f"{url}: {exc or type(exc).__name__}") from None


def retrying(what: str, options: HttpOptions, attempt: Callable[[], Any], log: Log) -> Any:
    """Run ``attempt`` until it does not raise :class:`Transient`, at most ``retries`` more times."""
    for n in range(options.retries + 1):
        try:
            return attempt()
        except Transient as exc:
            if n == options.retries:
                raise DownloadError(f"{exc}; gave up after {n + 1} attempts ({what})") from None
            log(f"{exc}; retrying ({n + 1}/{options.retries})")
            time.sleep(options.backoff_s * (n + 1))
    raise AssertionError("unreachable")


def get_json(url: str, options: HttpOptions, log: Log = print) -> dict[str, Any]:
    """One API document; a body that is not a JSON object is an error naming the URL."""
    doc = get_json_value(url, options, log)
    if not isinstance(doc, dict):
        raise DownloadError(f"{url}: expected a JSON object, got {type(doc).__name__}")
    return doc


def get_json_value(url: str, options: HttpOptions, log: Log = print) -> Any:
    """One JSON document of any shape (GitHub lists a directory as an array); retried like a download."""
    def attempt() -> Any:
        with open_url(url, options, {"Accept": "application/json"}) as resp:
            try:
                body = resp.read()
            except (ConnectionError, TimeoutError, http.client.HTTPException) as exc:
                raise Transient(f"{url}: {exc or type(exc).__name__}") from None
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DownloadError(f"{url}: not a JSON document ({exc})") from None
        return doc

    return retrying(url, options, attempt, log)


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
    hasher(str(digest_type), where)  # fail before downloading when the type is unknown
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


def listed_files(datasets: list[str], names: list[str] | None, api_root: str, options: HttpOptions,
                 dois: dict[str, str] | None = None, log: Log = print) -> tuple[list[RemoteFile], str]:
    """The chosen files of ``datasets`` (``names``; None: all) as the API lists them, and a phrase
    naming the datasets for messages. An unknown dataset or an unlisted name is an error."""
    dois = {**DATASETS, **(dois or {})}
    files: list[RemoteFile] = []
    for name in datasets:
        if name not in dois:
            raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(sorted(dois))}")
        files += list_files(name, dois[name], api_root, options, log)
    where = " and ".join(f"{d} ({dois[d]})" for d in datasets)
    return select_files(files, names, where), where



def hasher(digest_type: str, where: str = "") -> "hashlib._Hash":
    name = digest_type.lower().replace("-", "").replace("_", "")
    try:
        return hashlib.new(name)
    except ValueError:
        raise DownloadError(f"{where}: unknown digestType {digest_type!r}") from None
