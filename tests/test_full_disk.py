"""A full disk (issue 15, point 7): one clear error naming the output, nothing at the output path.

A real full disk without root: each command runs in a child process under ``RLIMIT_FSIZE``
(with ``SIGXFSZ`` ignored), so its writes beyond the limit fail with ``EFBIG`` exactly where a
full disk fails them with ``ENOSPC``. Before, ``infer`` crashed the interpreter at exit (h5py),
``train`` ended in a C++ "enforce fail" trace (torch.save), ``simulate`` and ``preprocess`` in
tracebacks. ``ENOSPC`` itself: on ``/dev/full`` (the kernel's always-full device), and, where a
private mount namespace is allowed, ``infer`` onto a 16 KiB tmpfs (skipped elsewhere).
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.hostile import Case, check
from helpers.project import ROOT

from b2txt.cli import main
from b2txt.ground.outputs import OutputError, recorded_file, write_hdf5, writing

TINY = ROOT / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_sim) -> dict[str, Path]:
    """The tiny data set, its manifest, a model trained on it and a sentence file (read-only)."""
    root = tmp_path_factory.mktemp("full-disk")
    manifest, model = root / "manifest.csv", root / "model"
    assert main(["preprocess", "--data", str(tiny_sim), "--out", str(manifest)]) == 0
    assert main(["train", "--config", str(TINY), "--data", str(tiny_sim), "--manifest", str(manifest),
                 "--out", str(model), "--threads", "1"]) == 0
    sentences = root / "sentences.txt"
    sentences.write_text("the cat sat\nmy friend is here\nwhere is the book\ni like the dog\n")
    return {"data": tiny_sim, "manifest": manifest, "model": model, "sentences": sentences}


@pytest.fixture()
def paths(work, tmp_path) -> dict[str, Path]:
    return {**work, "o": tmp_path / "out" / "result", "odir": tmp_path / "out"}


def limited(max_bytes: int):
    """Run the CLI in a child whose files may not grow beyond ``max_bytes``; echo its output."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    def run(argv: list[str]) -> int:
        done = subprocess.run([sys.executable, "-m", "b2txt", *argv], capture_output=True, text=True, timeout=600,
                              preexec_fn=limit, env={**os.environ, "B2TXT_PROGRESS": "0"})
        print(done.stdout + done.stderr, file=sys.stderr)
        return done.returncode
    return run


FULL = "file size limit reached"

FULL_DISK = [
    # (case, file-size limit in bytes)
    (Case("infer-logits-header", ["infer", "--model", "{model}", "--data", "{data}", "--split", "val",
                                  "--known-sessions-only", "--out", "{o}"], ["{o}: cannot write it", FULL],
          inputs=["model", "data"], outputs=["o"]), 2_000),
    (Case("infer-logits-data", ["infer", "--model", "{model}", "--data", "{data}", "--split", "val",
                                "--known-sessions-only", "--out", "{o}"], ["{o}: cannot write it", FULL],
          inputs=["model", "data"], outputs=["o"]), 20_000),
    (Case("train-checkpoint", ["train", "--config", str(TINY), "--data", "{data}", "--manifest", "{manifest}",
                               "--out", "{o}", "--threads", "1"], ["{o}: cannot write it", FULL],
          inputs=["data", "manifest"], outputs=["o"]), 1_000_000),
    (Case("simulate-data-files", ["simulate", "--config", str(TINY), "--sentences", "{sentences}", "--out", "{o}"],
          ["{o}: cannot write it", FULL], inputs=["sentences"], outputs=["o"]), 200_000),
    (Case("calibrate-model", ["calibrate", "--config", str(TINY), "--model", "{model}", "--data", "{data}",
                              "--manifest", "{manifest}", "--session", "-1", "--n-sentences", "0", "2",
                              "--out", "{o}"],
          ["{o}: cannot write it", FULL], inputs=["model", "data", "manifest"], outputs=["o"]), 1_000_000),
    (Case("preprocess-manifest", ["preprocess", "--data", "{data}", "--out", "{o}"],
          ["{o}: cannot write it", FULL], inputs=["data"], outputs=["o"]), 1_000),
]


@pytest.mark.parametrize("case, max_bytes", [pytest.param(c, n, id=c.id) for c, n in FULL_DISK])
def test_a_full_disk_is_one_error_naming_the_output(case: Case, max_bytes: int, paths, capsys):
    paths["odir"].mkdir()
    err = check(case, paths, capsys, run=limited(max_bytes))
    assert "Segmentation fault" not in err and "enforce fail" not in err
    assert err.count("error:") == 1, err
    # nothing half-written beside it either (a resumable training run keeps only OUT.partial)
    left = sorted(p.name for p in paths["odir"].iterdir() if not p.name.endswith(".partial"))
    assert left == [], left


# ----------------------------------------------------------------------------- ENOSPC: a full tmpfs, where allowed

def _can_mount_privately() -> bool:
    """A tmpfs in a private mount namespace (root or CAP_SYS_ADMIN): gone with the process, never
    seen by the rest of the machine. Elsewhere the test is skipped (RLIMIT_FSIZE covers the path)."""
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_privately(), reason="no private tmpfs mount here (needs CAP_SYS_ADMIN)")
def test_infer_onto_a_full_filesystem(paths, capsys):
    """A real ENOSPC: the output directory is a 16 KiB tmpfs (the logits need ~60 kB)."""
    odir = paths["odir"]
    odir.mkdir()
    script = ('mount -t tmpfs -o size=16k tmpfs "$0" || exit 99; "$@"; rc=$?; '
              'echo "left in $0: [$(ls -A "$0")]"; exit $rc')

    def run(argv: list[str]) -> int:
        done = subprocess.run(["unshare", "-m", "sh", "-c", script, str(odir), sys.executable, "-m", "b2txt", *argv],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "B2TXT_PROGRESS": "0"})
        print(done.stdout + done.stderr, file=sys.stderr)
        return done.returncode

    case = Case("infer-full-tmpfs", ["infer", "--model", "{model}", "--data", "{data}", "--split", "val",
                                     "--known-sessions-only", "--out", "{o}"],
                ["{o}: cannot write it: disk full (No space left on device)", f"left in {odir}: []"],
                inputs=["model", "data"], outputs=["o"])
    err = check(case, paths, capsys, run=run)
    assert err.count("error:") == 1 and "Segmentation fault" not in err


# ----------------------------------------------------------------------------- ENOSPC itself: /dev/full

needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")


@needs_dev_full
def test_hdf5_on_a_full_device_is_one_error_naming_the_output(tmp_path):
    out = tmp_path / "logits.h5"
    with pytest.raises(OutputError) as info, writing(out):
        write_hdf5("/dev/full", lambda f: f.create_dataset("x", data=np.zeros(10_000, np.float32)))
    assert str(info.value).startswith(f"{out}: cannot write it: disk full")
    # the same writer on a disk with room: the file is what h5py would have written directly
    write_hdf5(out, lambda f: f.create_dataset("x", data=np.arange(5, dtype=np.float32)))
    with h5py.File(out) as f:
        assert f["x"][()].tolist() == [0, 1, 2, 3, 4]


@needs_dev_full
def test_torch_save_on_a_full_device_raises_the_writes_error(tmp_path):
    torch = pytest.importorskip("torch")
    with pytest.raises(OSError) as info, recorded_file("/dev/full") as fh:
        torch.save({"w": torch.zeros(100_000)}, fh)
    assert info.value.errno == errno.ENOSPC  # not torch's "enforce fail ... unexpected pos"
    with recorded_file(tmp_path / "ok.pt") as fh:
        torch.save({"w": torch.arange(4.0)}, fh)
    assert torch.load(tmp_path / "ok.pt")["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError), writing(tmp_path / "x"):
        open(tmp_path / "missing" / "input")
