"""The whole DAG, end to end, on the tiny config: Snakemake and DVC, real tools, real files."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from b2txt.ground.config import merge, read_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
RUN = "results/tiny"
pytestmark = pytest.mark.slow


def make_project(dest: Path) -> Path:
    """A copy of the workflow files whose config files carry the tiny config's values.

    The tiny values go into the files both tools read (config/config.yaml and the training
    preset), so Snakemake and `dvc repro` run the same configuration without flags.
    """
    for name in ("Snakefile", "dvc.yaml", "workflow", "src", "envs", "config", "scripts"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    tiny = read_yaml(TINY)
    base = dest / "config" / "config.yaml"
    preset = dest / "config" / "model" / "baseline.yaml"
    base.write_text(yaml.safe_dump(merge(read_yaml(base), {k: v for k, v in tiny.items() if k != "train"})))
    preset.write_text(yaml.safe_dump(merge(read_yaml(preset), {"train": tiny["train"]})))
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, B2TXT_PROGRESS="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


#: Rules downstream of the logits and of the LM graph; rules that build the LM from the data's text.
DECODING = {"decode", "score_words", "evaluate", "figures"}
LM_BUILD = {"lm_text", "lm_ngram", "lm_graph"}


def planned_rules(out: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", out, flags=re.MULTILINE)) - {"all"}


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("smk"))
    run(["snakemake", "--cores", "1"], project)
    return project


def test_snakemake_runs_every_stage(snakemake_project):
    p = snakemake_project
    assert "no problems found" in (p / RUN / "validation.txt").read_text()
    manifest = pd.read_csv(p / RUN / "manifest.csv")
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (p / RUN / "model/checkpoint/best_checkpoint").is_file()
    assert (p / RUN / "model/checkpoint/args.yaml").is_file()
    for split in ("val", "test"):
        assert (p / RUN / f"logits/{split}.hdf5").is_file()
    metrics = json.loads((p / RUN / "scores/val/metrics.json").read_text())
    assert 0 < metrics["n_trials"] < (manifest["split"] == "val").sum() and metrics["PER"] >= 0
    per_session = pd.read_csv(p / RUN / "scores/val/per_session.csv")
    held_out = sorted(manifest["session"].unique())[-1]  # the preset holds out the last session
    assert set(per_session["session"]) == set(manifest["session"]) - {held_out}
    calibration = pd.read_csv(p / RUN / "calibration/calibration.csv")
    assert calibration["n_sentences"].tolist() == [0, 2, 4] and (calibration["session"] == held_out).all()
    assert (p / RUN / "calibration/model/checkpoint/best_checkpoint").is_file()
    assert (p / RUN / "lm/2gram/TLG.fst").stat().st_size > 0 and (p / RUN / "lm/2gram/lm.bin").is_file()
    lm_stats = json.loads((p / RUN / "lm/text.json").read_text())
    assert lm_stats  # the LM text's statistics (sentences, OOV rate) are reported
    decoded = pd.read_csv(p / RUN / "decode/val/decoded.csv", keep_default_na=False)
    logits_trials = metrics["n_trials"]
    assert len(decoded) == logits_trials and (decoded["reference"] != "").all()
    wer = json.loads((p / RUN / "scores/val/wer.json").read_text())
    assert wer["n_trials"] == logits_trials and 0 <= wer["WER"]
    via_redis = pd.read_csv(p / RUN / "evaluate/val/decoded.csv", keep_default_na=False)
    assert via_redis["decoded"].tolist() == decoded["decoded"].tolist()  # Redis path == in process
    submission = pd.read_csv(p / RUN / "evaluate/test/submission.csv", keep_default_na=False)
    assert submission["id"].tolist() == list(range(len(submission))) and len(submission) > 0
    for name in ("training_curve", "per_session_per"):
        for ext in ("pdf", "png"):
            assert (p / RUN / f"figures/{name}.{ext}").stat().st_size > 1000


def test_second_run_does_nothing(snakemake_project):
    r = run(["snakemake", "--cores", "1"], snakemake_project)
    assert "Nothing to be done" in r.stdout + r.stderr


def test_changed_train_params_rerun_only_downstream(snakemake_project):
    r = run(["snakemake", "-n", "--cores", "1", "--config", "train={seed: 11}"], snakemake_project)
    assert planned_rules(r.stdout) == {"train", "infer", "score", "figures", "calibrate"} | DECODING
    r = run(["snakemake", "-n", "--cores", "1", "--config", "calibrate={steps: 4}"], snakemake_project)
    assert planned_rules(r.stdout) == {"calibrate", "figures"}  # the calibration curve
    r = run(["snakemake", "-n", "--cores", "1", "--config", "decode={beam: 12}"], snakemake_project)
    assert planned_rules(r.stdout) == DECODING
    r = run(["snakemake", "-n", "--cores", "1", "--config", "simulate={seed: 4}"], snakemake_project)
    assert planned_rules(r.stdout) == {"simulate", "validate", "preprocess", "train", "infer", "score", "figures",
                                       "calibrate"} | LM_BUILD | DECODING


def test_bad_config_stops_before_anything_runs(snakemake_project):
    r = run(["snakemake", "-n", "--cores", "1", "--config", "train={batch_size: 0}"], snakemake_project, check=False)
    assert r.returncode != 0 and "train.batch_size" in r.stdout + r.stderr


def test_report_is_self_contained(snakemake_project):
    run(["snakemake", "--cores", "1", "--report", "report.html"], snakemake_project)
    html = (snakemake_project / "report.html").read_text(errors="replace")
    assert "per_session_per.png" in html


def test_dvc_repro_runs_the_same_stages_with_the_same_results(snakemake_project, tmp_path):
    project = make_project(tmp_path)
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "config", "core.analytics", "false"], project)
    r = run(["dvc", "repro"], project)
    stages = set(re.findall(r"Running stage '([\w@]+)'", r.stdout))
    assert stages == {"corpus", "data", "validate", "preprocess", "train", "infer@val", "infer@test",
                      "score", "figures", "calibrate", "kenlm_tools", "lm_text", "lm_ngram@2", "lm_graph@2",
                      "decode", "score_words", "evaluate@val", "evaluate@test"}
    for rel in ("manifest.csv", "scores/val/per_session.csv", "scores/val/trials.csv", "calibration/calibration.csv",
                "lm/text.txt", "lm/2gram/lm.arpa", "decode/val/decoded.csv", "scores/val/wer_per_session.csv",
                "evaluate/test/submission.csv"):
        assert (project / RUN / rel).read_text() == (snakemake_project / RUN / rel).read_text(), rel
    assert "up to date" in run(["dvc", "status"], project).stdout.lower()
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "PER" in shown and "WER" in shown


def test_workflow_passes_snakemake_lint(tmp_path):
    project = make_project(tmp_path)
    r = run(["snakemake", "--lint"], project, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_existing_data_directory_skips_corpus_and_simulation(tmp_path, tiny_sim):
    project = make_project(tmp_path)
    r = run(["snakemake", "-n", "--cores", "1", "--config", f"data={{source: dir, dir: {tiny_sim}}}"], project)
    assert planned_rules(r.stdout) == {"validate", "preprocess", "train", "infer", "score", "figures",
                                       "calibrate"} | LM_BUILD | DECODING


def test_given_graph_directory_skips_the_lm_build(tmp_path, tiny_sim):
    """lm.source dir (e.g. a published TLG.fst + words.txt): no LM stages, decoding reads it."""
    project = make_project(tmp_path)
    graph = tmp_path / "published-lm"
    graph.mkdir()
    (graph / "TLG.fst").write_bytes(b"")
    (graph / "words.txt").write_text("<eps> 0\n")
    r = run(["snakemake", "-n", "-p", "--cores", "1", "--config", f"data={{source: dir, dir: {tiny_sim}}}",
             f"lm={{source: dir, dir: {graph}}}"], project)
    assert planned_rules(r.stdout) == {"validate", "preprocess", "train", "infer", "score", "figures",
                                       "calibrate"} | DECODING
    assert f"--lm {graph}" in r.stdout
    r = run(["snakemake", "-n", "--cores", "1", "--config", "lm={source: dir}"], project, check=False)
    assert r.returncode != 0 and "lm.dir" in r.stdout + r.stderr
