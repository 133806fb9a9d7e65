"""Each rule family in an environment of its own packages only (pyproject's core + its extras,
``b2txt.workflow.ENVS``): the pip twins of envs/*.yaml, which cannot be built here (no conda
channels). The tiny DAG runs once with every job in its rule's family venv and once in the one
full venv, and gives the same outputs; a command in a venv without its extra names the extra.

Marked ``envs`` (`make test-envs`, part of .ci/run): the venvs are built once into .venvs/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from helpers.project import RUN, make_project, run
from helpers.venvs import family_venv, size_mb

from b2txt.ground.config import load_config
from b2txt.ground.fileio import SIDECAR_SUFFIX
from b2txt.workflow import job_commands, stages

pytestmark = [pytest.mark.envs, pytest.mark.redis, pytest.mark.kenlm]

FAMILIES = ("data", "train", "lm", "figures")
CONFIG = ["config/config.yaml", "config/model/baseline.yaml"]
#: What each family venv must not hold (the other families' packages).
ABSENT = {"data": ("torch", "matplotlib", "kaldifst", "redis", "transformers"),
          "train": ("matplotlib", "kaldifst", "redis", "transformers"),
          "lm": ("torch", "matplotlib", "transformers"),
          "figures": ("torch", "kaldifst", "redis", "transformers")}


@pytest.fixture(scope="module")
def venvs(kenlm_dir) -> dict[str, Path]:
    built = {env: family_venv(env) for env in FAMILIES}
    full = Path(sys.executable).parent.parent
    print("\nvenv sizes (MB): " + ", ".join(f"{e} {size_mb(v):.0f}" for e, v in built.items())
          + f"; the full .venv {size_mb(full):.0f}")
    return built


def _path(venv: Path) -> dict[str, str]:
    return {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}


def test_family_venvs_hold_only_their_packages(venvs):
    for env, venv in venvs.items():
        for module in ABSENT[env]:
            r = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"], capture_output=True)
            assert r.returncode != 0, f".venvs/{env} holds {module}"


def test_a_command_in_a_venv_without_its_extra_names_it(venvs, tmp_path):
    data, scores = tmp_path / "data", tmp_path / "scores"
    cases = [("data", ["train", "--data", str(data), "--manifest", str(tmp_path / "m.csv"), "--out",
                       str(tmp_path / "m")], "train"),
             ("data", ["lm", "graph", "--arpa", str(tmp_path / "x.arpa"), "--out", str(tmp_path / "g")], "lm"),
             ("lm", ["figures", "--model", str(data), "--scores", str(scores), "--out", str(tmp_path / "f")],
              "figures")]
    for env, argv, extra in cases:
        r = subprocess.run([str(venvs[env] / "bin" / "b2txt"), *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (argv, r.stderr)
        assert f"'{extra}' extra" in r.stderr and f"b2txt[{extra}]" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not any(p.name in ("m", "g", "f") for p in tmp_path.iterdir())


def _same_file(a: Path, b: Path) -> None:
    if a.suffix == ".hdf5":
        with h5py.File(a) as fa, h5py.File(b) as fb:
            names = _names(fa)
            assert names == _names(fb), a
            for n in names:
                if isinstance(fa[n], h5py.Dataset):
                    np.testing.assert_array_equal(fa[n][()], fb[n][()], err_msg=f"{a}:{n}")
    elif a.suffix == ".json":
        assert _drop_times(json.loads(a.read_text())) == _drop_times(json.loads(b.read_text())), a
    elif a.suffix == ".csv":
        ta, tb = pd.read_csv(a), pd.read_csv(b)
        timed = [c for c in ta.columns if _timed(c)]
        pd.testing.assert_frame_equal(ta.drop(columns=timed), tb.drop(columns=timed), obj=str(a))
    else:
        assert a.read_bytes() == b.read_bytes(), a


def _timed(key: str) -> bool:
    return any(t in key for t in ("time", "second")) or key.endswith(("_s", "_ms"))


def _names(f: h5py.File) -> list[str]:
    out: list[str] = []
    f.visit(out.append)
    return out


def _drop_times(doc):
    if isinstance(doc, dict):
        return {k: _drop_times(v) for k, v in doc.items() if not _timed(k)}
    return doc


#: Files that hold wall times by design (logs, timings; PDFs hold their creation date).
TIMED = ("training_log", "metrics.csv", "timing.", ".log", ".pdf")


def _compared(rel: Path) -> bool:
    """Outputs to compare: not the timed ones, nor b2txt's ownership records (they hold mtimes)."""
    return not any(t in str(rel) for t in TIMED) and not rel.name.endswith(SIDECAR_SUFFIX)


def test_tiny_dag_in_family_venvs_equals_the_one_venv_run(venvs, tmp_path):
    one, fam = make_project(tmp_path / "one"), make_project(tmp_path / "family")
    cfg = load_config([one / f for f in CONFIG])
    full = Path(sys.executable).parent.parent
    ran = []
    for stage in stages(cfg):
        for argv in job_commands(stage, CONFIG):
            run(argv, one, env=_path(full))
            run(argv, fam, env=_path(venvs[stage.env]))
            ran.append(f"{stage.env}: {' '.join(argv[:3])}")
    assert {s.env for s in stages(cfg)} == set(FAMILIES)
    compared, differ = 0, []
    for a in sorted((one / RUN).rglob("*")):
        rel = a.relative_to(one)
        b = fam / rel
        assert b.exists() or a.is_dir(), f"{rel}: made in the full venv only"
        if a.is_file() and _compared(rel):
            try:
                _same_file(a, b)
            except AssertionError as exc:
                differ.append(f"{rel}: {exc}")
            compared += 1
    assert not differ, "\n".join(differ)
    assert compared > 20, ran
