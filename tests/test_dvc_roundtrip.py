"""The DVC round trip users rely on, with the real `dvc` and `git` in a temp directory.

`dvc repro` on the tiny config -> `dvc push` to a remote -> a fresh `git clone` -> `dvc pull` ->
nothing changed for DVC, nothing to do for Snakemake, and `b2txt infer` runs on the pulled model.
"""

from __future__ import annotations

import configparser
import os
import shutil

import pytest
import yaml
from helpers.project import ROOT, RUN, init_dvc, make_project, run

GIT = ["git", "-c", "user.name=b2txt test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]


def test_default_remote_is_a_local_directory_beside_the_repository():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    assert cfg["core"]["remote"] == "local"
    url = cfg["'remote \"local\"'"]["url"]  # DVC writes the section name quoted
    assert "://" not in url and not os.path.isabs(url)  # a path relative to .dvc/: works out of the box
    assert (ROOT / ".dvc" / url).resolve().parent == ROOT.parent  # a sibling, never inside the repository


@pytest.mark.slow
@pytest.mark.kenlm
@pytest.mark.redis
def test_repro_push_clone_pull_is_up_to_date_and_runs(tmp_path):
    (tmp_path / "origin").mkdir()
    origin = make_project(tmp_path / "origin")
    shutil.copy(ROOT / ".gitignore", origin / ".gitignore")  # results/ and data/ never reach git
    remote = tmp_path / "remote"
    init_dvc(origin, *GIT)
    run(["dvc", "remote", "add", "-d", "test", str(remote)], origin)  # the test's own remote
    run(["dvc", "repro"], origin)
    run(GIT + ["add", "-A"], origin)
    run(GIT + ["commit", "-q", "-m", "tiny pipeline"], origin)
    tracked = run(GIT + ["ls-files"], origin).stdout.split()
    assert "dvc.lock" in tracked and not any(f.startswith(("results/", "data/")) for f in tracked)
    run(["dvc", "push"], origin)
    assert any(remote.rglob("*"))

    clone = tmp_path / "clone"
    run(GIT + ["clone", "-q", str(origin), str(clone)], tmp_path)
    assert not (clone / RUN / "model").exists()
    run(["dvc", "pull"], clone)
    assert (clone / RUN / "model/checkpoint/best_checkpoint").is_file()
    status = run(["dvc", "status"], clone).stdout.lower()
    assert "up to date" in status, status
    # Pulled files get new times and Snakemake keeps no metadata in git: --touch once (README).
    run(["snakemake", "--cores", "1", "--touch"], clone)
    r = run(["snakemake", "-n", "--cores", "1"], clone)
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout
    out = clone / "pulled-val.hdf5"
    run(["b2txt", "infer", "--model", f"{RUN}/model", "--data", "data/simulated-tiny", "--manifest",
         f"{RUN}/manifest.csv", "--split", "val", "--out", str(out), "--known-sessions-only"], clone)
    assert out.stat().st_size > 0

    # DVC reruns stages over the outputs it checked out (copies: no sidecars beside the files, no
    # mark in an LM or scores directory whose files it declares one by one): b2txt replaces them
    # without --force, and a rebuilt n-gram's stale graph is rebuilt by the next repro
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    order = stages["lm_ngram"]["foreach"][0]
    for stage in ("score", "score_words", f"lm_ngram@{order}", "preprocess"):
        run(["dvc", "repro", "--force", "--single-item", stage], clone)
    run(["dvc", "repro"], clone)
    status = run(["dvc", "status"], clone).stdout.lower()
    assert "up to date" in status, status
