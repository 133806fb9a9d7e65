"""The bootstrap: idempotent, and without root it names the apt packages to install."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to switch to a normal user")
def test_without_root_missing_packages_are_named(tmp_path):
    r = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", "B2TXT_APT_PACKAGES=redis-server b2txt-no-such-package",
         "bash", str(ROOT / "scripts" / "bootstrap.sh")],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "sudo apt-get install -y b2txt-no-such-package" in r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "apt-get install" in ln)
    assert "redis-server" not in line  # only what is missing
    assert "b2txt-no-such-package: (needed by the pipeline)" in r.stderr  # each with what it serves


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to switch to a normal user")
def test_without_venv_support_python3_venv_is_named_with_its_use(tmp_path):
    """A Python without ensurepip (stock Debian/Ubuntu without python3-venv): named, with what it is for."""
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\nexec {shutil.which("python3")} "$@"\n')
    python.chmod(0o755)
    tmp_path.chmod(0o777)
    r = subprocess.run(
        ["runuser", "-u", "nobody", "--", "env", "B2TXT_APT_PACKAGES=redis-server", f"PYTHON={python}",
         f"VENV={tmp_path / 'venv'}", "bash", str(ROOT / "scripts" / "bootstrap.sh")],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "python3-venv: creating" in r.stderr and "sudo apt-get install -y python3-venv" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_bootstrap_is_idempotent():
    """Once bootstrapped (the first run may install), a second run changes and prints nothing."""
    stamp = ROOT / ".venv" / ".b2txt-bootstrap"
    if not stamp.exists():
        pytest.skip("not running inside a bootstrapped checkout")
    boot = ["bash", str(ROOT / "scripts" / "bootstrap.sh")]
    assert subprocess.run(boot, capture_output=True, timeout=600).returncode == 0
    before = stamp.stat().st_mtime_ns
    r = subprocess.run(boot, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert stamp.stat().st_mtime_ns == before
