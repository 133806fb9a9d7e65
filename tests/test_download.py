"""`b2txt download` against a real HTTP server on 127.0.0.1 that serves a Dryad-shaped API.

The server (http.server in a thread, port 0) answers the API walk of REFERENCE §1 with JSON
documents made here, redirects each file's download link to the bytes (as Dryad redirects to
its store), honours Range requests, and can misbehave on purpose: drop the connection
mid-file, ignore Range, answer 404. No test touches the internet.
"""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import pytest
from helpers.dryad_server import DATA_DOI, LM_DOI, Blob, FakeDryad, tar_gz_bytes, zip_bytes

from b2txt.cli import main
from b2txt.data.dryad import DATA_SUBDIR, discover
from b2txt.data.dryad_api import HttpOptions, list_files
from b2txt.data.fetch import download, partial_path
from b2txt.ground.archive import unpack_archive
from b2txt.ground.errors import DownloadError

FAST = HttpOptions(timeout_s=10, retries=3, backoff_s=0.01)


def hdf5_bytes(tmp_path: Path, lexicon) -> bytes:
    from helpers.data import make_trials

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
