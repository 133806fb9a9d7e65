"""`b2txt download` against a real HTTP server on 127.0.0.1 that serves a Dryad-shaped API.

The server (http.server in a thread, port 0) answers the API walk of REFERENCE §1 with JSON
documents made here, redirects each file's download link to the bytes (as Dryad redirects to
its store), honours Range requests, and can misbehave on purpose: drop the connection
mid-file, ignore Range, answer 404. No test touches the internet.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from b2txt.cli import main
from b2txt.data.dryad import DATA_SUBDIR, discover
from b2txt.data.dryad_api import DATASETS, HttpOptions, list_files
from b2txt.data.fetch import download, partial_path
from b2txt.ground.archive import unpack_archive
from b2txt.ground.errors import DownloadError

FAST = HttpOptions(timeout_s=10, retries=3, backoff_s=0.01)
DATA_DOI, LM_DOI = DATASETS["data"], DATASETS["lm"]


@dataclass
class Blob:
    data: bytes
    digest: str | None = None  # what the API claims; the right md5 when None
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
                        "status": "created", "digestType": "md5",
                        "digest": blob.digest or hashlib.md5(blob.data).hexdigest(),
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


@pytest.fixture
def dryad(monkeypatch):
    """Start a fake Dryad on 127.0.0.1; tests fill ``state.datasets`` and use ``state.url``."""
    for name in ("no_proxy", "NO_PROXY"):  # a proxy set for the machine must not see these requests
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    state = FakeDryad({DATA_DOI: {}, LM_DOI: {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/api/v2"
    yield state
    server.shutdown()
    server.server_close()


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


def hdf5_bytes(tmp_path: Path, lexicon) -> bytes:
    from conftest import make_trials

    from b2txt.data.dryad import write_trials

    path = tmp_path / "src.hdf5"
    write_trials(path, make_trials(lexicon, 2))
    return path.read_bytes()


def quiet(msg: str) -> None:
    pass


def run(dryad: FakeDryad, out: Path, datasets=("data",), **kw) -> list[Path]:
    return download(list(datasets), out, api_root=dryad.url, options=FAST, log=quiet, **kw)


def test_lists_checks_and_unpacks_into_the_dryad_layout(dryad, tmp_path, lexicon):
    h5 = hdf5_bytes(tmp_path, lexicon)
    dryad.datasets[DATA_DOI] = {
        "t15_copyTaskData_description.csv": Blob(b"Date,Post-implant day\n"),
        "t15_copyTask.pkl": Blob(b"\x80\x04K\x01." * 1000),
        "t15_copyTask_neuralData.zip": Blob(zip_bytes({
            f"{DATA_SUBDIR}/t15.2023.08.13/data_train.hdf5": h5, "__MACOSX/._junk": b"x"})),
        "t15_pretrained_rnn_baseline.zip": Blob(zip_bytes({
            "checkpoint/best_checkpoint": b"weights", "checkpoint/args.yaml": b"a: 1\n"})),
    }
    out = tmp_path / "data"
    logs: list[str] = []
    download(["data"], out, api_root=dryad.url, options=FAST, log=logs.append)
    assert "4 files" in logs[0] and "to download" in logs[0]  # sizes are shown first
    assert (out / "t15_copyTask.pkl").read_bytes() == dryad.datasets[DATA_DOI]["t15_copyTask.pkl"].data
    files, problems = discover(out)
    assert [(f.session, f.split) for f in files] == [("t15.2023.08.13", "train")] and not problems
    assert (out / DATA_SUBDIR / "t15.2023.08.13" / "data_train.hdf5").read_bytes() == h5
    assert (out / "t15_pretrained_rnn_baseline" / "checkpoint" / "args.yaml").read_bytes() == b"a: 1\n"
    assert not (out / "__MACOSX").exists() and not list(out.glob(".unpack-*"))
    # A second run finds everything present and checked: no file is fetched again.
    before = len(dryad.requests)
    logs.clear()
    download(["data"], out, api_root=dryad.url, options=FAST, log=logs.append)
    assert not any(p.startswith("/store/") for p, _ in dryad.requests[before:])
    assert "0 B to download" in logs[0]


def test_connection_dropped_mid_file_resumes_with_range(dryad, tmp_path):
    data = bytes(range(256)) * 4000  # 1 MB
    dryad.datasets[DATA_DOI] = {"t15_copyTask.pkl": Blob(data, drop_after=300_000)}
    out = tmp_path / "data"
    run(dryad, out)
    assert (out / "t15_copyTask.pkl").read_bytes() == data
    assert dryad.blob_requests("t15_copyTask.pkl") == [None, "bytes=300000-"]


def test_partial_file_of_a_killed_run_resumes(dryad, tmp_path):
    data = b"0123456789" * 50_000
    dryad.datasets[DATA_DOI] = {"t15_personalUse.pkl": Blob(data)}
    out = tmp_path / "data"
    rf = list_files("data", DATA_DOI, dryad.url, FAST, quiet)[0]
    part = partial_path(out, rf)
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:123_457])
    run(dryad, out)
    assert (out / "t15_personalUse.pkl").read_bytes() == data
    assert dryad.blob_requests("t15_personalUse.pkl") == ["bytes=123457-"]
    assert not part.exists()


def test_partial_dir_outside_the_output_survives_the_output_being_emptied(dryad, tmp_path, capsys):
    """Snakemake and DVC delete a rule's output directory before they rerun it: partial bytes
    kept beside it (--partial-dir) still resume."""
    data = b"abcdefghij" * 60_000
    dryad.datasets[DATA_DOI] = {"t15_copyTask.pkl": Blob(data)}
    out, partial = tmp_path / "data", tmp_path / "data.partial"
    rf = list_files("data", DATA_DOI, dryad.url, FAST, quiet)[0]
    part = partial_path(out, rf, partial)
    assert part.parent == partial
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:200_000])  # what a killed run had fetched
    assert not out.exists()  # the workflow manager emptied the output
    code = main(["download", "--api-root", dryad.url, "--out", str(out), "--partial-dir", str(partial),
                 "--retries", "1"])
    assert code == 0
    assert (out / "t15_copyTask.pkl").read_bytes() == data
    assert dryad.blob_requests("t15_copyTask.pkl") == ["bytes=200000-"]
    assert "resuming after" in capsys.readouterr().err
    assert not part.exists() and not (out / ".download" / part.name).exists()


def test_server_ignoring_range_starts_over(dryad, tmp_path):
    data = b"abcdefgh" * 40_000
    dryad.datasets[DATA_DOI] = {"f.bin": Blob(data, drop_after=100_000, ignore_range=True)}
    out = tmp_path / "data"
    run(dryad, out)
    assert (out / "f.bin").read_bytes() == data


def test_wrong_digest_is_deleted_reported_and_never_unpacked(dryad, tmp_path):
    archive = zip_bytes({f"{DATA_SUBDIR}/t15.2023.08.13/data_val.hdf5": b"not really"})
    dryad.datasets[DATA_DOI] = {"t15_copyTask_neuralData.zip": Blob(archive, digest="0" * 32)}
    out = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"t15_copyTask_neuralData\.zip: md5 digest [0-9a-f]{32} does not match"):
        run(dryad, out)
    assert not (out / DATA_SUBDIR).exists()
    assert not (out / "t15_copyTask_neuralData.zip").exists()
    assert not list((out / ".download").glob("*.part"))


def test_http_404_names_url_and_status(dryad, tmp_path):
    dryad.datasets[DATA_DOI] = {"gone.csv": Blob(b"x", status=404)}
    with pytest.raises(DownloadError, match=r"http://127\.0\.0\.1:\d+/api/v2/files/\d+/download: HTTP 404"):
        run(dryad, tmp_path / "data")
    dryad.datasets = {LM_DOI: {}}  # the data DOI is unknown to this server
    with pytest.raises(DownloadError, match=r"/versions: HTTP 404"):
        run(dryad, tmp_path / "data")


def test_no_network_is_one_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"cannot connect .*no network, or a wrong API root"):
        download(["data"], tmp_path, api_root=f"http://127.0.0.1:{port}/api/v2", options=FAST, log=quiet)


def test_a_file_the_api_does_not_list(dryad, tmp_path):
    dryad.datasets[DATA_DOI] = {"a.csv": Blob(b"1"), "b.csv": Blob(b"2")}
    with pytest.raises(DownloadError, match=r"nope\.zip: not listed by data \(doi:10\.5061/dryad\.dncjsxm85\); "
                                            r"its files: a\.csv, b\.csv"):
        run(dryad, tmp_path / "data", names=["nope.zip"])
    run(dryad, tmp_path / "data", names=["b.csv"])
    assert not (tmp_path / "data" / "a.csv").exists() and (tmp_path / "data" / "b.csv").read_bytes() == b"2"


def test_disk_full(dryad, tmp_path):
    dryad.datasets[DATA_DOI] = {"huge.bin": Blob(b"x" * 10)}
    # The bytes go to /dev/full (writes fail with ENOSPC) through the partial file's path.
    out = tmp_path / "data"
    rf = list_files("data", DATA_DOI, dryad.url, FAST, quiet)[0]
    partial_path(out, rf).parent.mkdir(parents=True)
    partial_path(out, rf).symlink_to("/dev/full")
    with pytest.raises(DownloadError, match=r"huge\.bin\.[0-9a-f]+\.part: disk full"):
        run(dryad, out)


def test_not_enough_space_is_refused_before_downloading(dryad, tmp_path):
    dryad.datasets[DATA_DOI] = {"huge.bin": Blob(b"x", size=10**18)}  # an exabyte fits no test disk
    with pytest.raises(DownloadError, match=r"not enough disk space: 1000000\.0 TB needed to download "
                                            r"\(and unpack\), .* free"):
        run(dryad, tmp_path / "data")
    assert not dryad.blob_requests("huge.bin")


def test_language_model_tarball(dryad, tmp_path):
    dryad.datasets[LM_DOI] = {"languageModel.tar.gz": Blob(tar_gz_bytes(
        {"languageModel/TLG.fst": b"fst", "languageModel/words.txt": b"<eps> 0\n"}))}
    run(dryad, tmp_path / "data", datasets=("lm",))
    assert (tmp_path / "data" / "languageModel" / "words.txt").read_bytes() == b"<eps> 0\n"


def test_a_failing_unpack_leaves_no_half_tree(tmp_path):
    out = tmp_path / "data"
    (out / DATA_SUBDIR / "t15.2023.08.11").mkdir(parents=True)  # an older, complete tree
    raw = bytearray(zip_bytes({f"{DATA_SUBDIR}/t15.2023.08.13/data_train.hdf5": b"A" * 5000,
                               f"{DATA_SUBDIR}/t15.2023.08.20/data_train.hdf5": b"B" * 5000}, zipfile.ZIP_STORED))
    i = raw.index(b"B" * 100)
    raw[i:i + 100] = b"C" * 100  # the second member's CRC check fails after the first was written
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DownloadError, match=r"bad\.zip: damaged archive .*nothing was unpacked"):
        unpack_archive(bad, out, quiet)
    assert sorted(p.name for p in out.iterdir()) == [DATA_SUBDIR]  # no staging debris
    assert [p.name for p in (out / DATA_SUBDIR).iterdir()] == ["t15.2023.08.11"]  # old tree untouched


def test_archive_members_outside_the_target_are_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    evil.write_bytes(zip_bytes({"../../escaped.txt": b"x"}))
    with pytest.raises(DownloadError, match=r"member '\.\./\.\./escaped\.txt' would be written outside"):
        unpack_archive(evil, tmp_path / "data", quiet)
    assert not (tmp_path / "escaped.txt").exists()


def test_cli_pieces(dryad, tmp_path, capsys):
    dryad.datasets[DATA_DOI] = {"a.csv": Blob(b"1,2\n")}
    config = tmp_path / "config.yaml"
    config.write_text("run: test\n")
    out = tmp_path / "data"
    base = ["download", "--config", str(config), "--out", str(out), "--api-root", dryad.url]
    assert main([*base, "--list"]) == 0 and not (out / "a.csv").exists()
    assert "a.csv" in capsys.readouterr().err
    assert main([*base, "--files", "a.csv", "--retries", "1", "--timeout", "5"]) == 0
    assert (out / "a.csv").read_bytes() == b"1,2\n"
    capsys.readouterr()
    assert main([*base, "--files", "b.csv"]) == 2
    assert "b.csv: not listed" in capsys.readouterr().err


def test_unpack_target_of_the_data_zip_is_the_data_layers_directory():
    from b2txt.ground.archive import UNPACK_TARGETS
    assert UNPACK_TARGETS["t15_copyTask_neuralData.zip"] == DATA_SUBDIR


def test_cli_startup_loads_no_data_libraries():
    """`b2txt --help` and every command's start stay fast: h5py, pandas and torch load on use."""
    import subprocess
    import sys
    code = ("import sys, b2txt.cli; b2txt.cli.build_parser(); "
            "print(sorted(m for m in ('h5py', 'pandas', 'torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
