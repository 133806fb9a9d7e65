"""Virtual environments that hold one rule family's packages only (pyproject's core + the extras of
``b2txt.workflow.ENVS[env]``), built once into ``.venvs/<env>`` and rebuilt when pyproject.toml or
requirements.lock change. The package is installed editable, so they run the checkout's code."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from b2txt.workflow import ENVS

from .project import ROOT

VENVS = ROOT / ".venvs"


def _key(env: str) -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "requirements.lock"):
        h.update((ROOT / name).read_bytes())
    h.update(env.encode())
    return h.hexdigest()


def family_venv(env: str) -> Path:
    """``.venvs/<env>`` with the core and ``env``'s extras (``data``: the core alone)."""
    dest, want = VENVS / env, _key(env)
    stamp = dest / ".b2txt-env"
    if stamp.is_file() and stamp.read_text() == want and (dest / "bin" / "b2txt").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, timeout=300)
    extras = ",".join(ENVS[env])
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    r = subprocess.run([str(dest / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements.lock"),
                        "-e", target], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise AssertionError(f"building {dest} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    stamp.write_text(want)
    return dest


def size_mb(venv: Path) -> float:
    """The venv's size on disk in MB (site-packages and all)."""
    return sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6
