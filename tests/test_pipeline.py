"""The whole DAG, end to end, on the tiny config: Snakemake and DVC, real tools, real files."""

import json
import re

import helpers.project as hp
import pandas as pd
import pytest
import yaml
from helpers.project import DECODING, LM_BUILD, RUN, make_project, planned_rules, run

pytestmark = [pytest.mark.slow, pytest.mark.kenlm, pytest.mark.redis]

#: A preset of the tests' own on top of the tiny config: another architecture and another acoustic
#: scale, as config/model/paper.yaml changes both.
PRESET_FILE = "config/model/tiny-triple.yaml"
PRESET = {"train": {"model": {"architecture": "triple", "n_units": 16, "n_layers": 1, "noise_units": 8,
                              "noise_layers": 1, "noisy_units": 8, "noisy_layers": 1}},
          "decode": {"acoustic_scale": 0.8}}
#: Snakemake with the preset, as a user runs one.
SNAKEMAKE = ["snakemake", "--configfile", PRESET_FILE]


def with_preset(project):
    (project / PRESET_FILE).write_text(yaml.safe_dump(PRESET))
    return project


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory):
    """The tiny pipeline with the preset, run once; Python logs every import of every job
    (`-X importtime`, on stderr: into each rule's log)."""
    project = with_preset(make_project(tmp_path_factory.mktemp("smk")))
    run([*SNAKEMAKE, "--cores", "1"], project, env={"PYTHONPROFILEIMPORTTIME": "1"})
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
    assert (p / RUN / "evaluate/val/decoded.csv").read_bytes() == (p / RUN / "decode/val/decoded.csv").read_bytes()
    submission = pd.read_csv(p / RUN / "evaluate/test/submission.csv", keep_default_na=False)
    assert submission["id"].tolist() == list(range(len(submission))) and len(submission) > 0
    for name in ("training_curve", "per_session_per"):
        for ext in ("pdf", "png"):
            assert (p / RUN / f"figures/{name}.{ext}").stat().st_size > 1000


def module_file(module: str) -> str:
    path = "src/" + module.replace(".", "/")
    return f"{path}/__init__.py" if (hp.ROOT / path).is_dir() else f"{path}.py"


def test_every_command_imported_only_modules_its_dvc_stage_lists(snakemake_project):
    """DVC reruns a stage when its code changes: the b2txt modules each job really imported (its
    log, and the logs of the LM servers evaluate started) are among the deps dvc.yaml lists for it."""
    stages = yaml.safe_load((snakemake_project / "dvc.yaml").read_text())["stages"]
    checked = set()
    for log in sorted((snakemake_project / RUN / "logs").glob("*.log")):
        name = log.stem if log.stem in stages else log.stem.rsplit("_", 1)[0]  # infer_val -> infer
        if stages[name].get("do", stages[name])["cmd"].startswith("bash"):
            continue
        deps = set(stages[name].get("do", stages[name])["deps"])
        texts = [log.read_text()]
        if name == "evaluate":
            texts += [p.read_text() for p in (snakemake_project / RUN / "evaluate").rglob("lm-server.log")]
        imported = {m for text in texts for m in re.findall(r"\|\s+(b2txt(?:\.\w+)*)\s*$", text, flags=re.M)}
        assert imported and {module_file(m) for m in imported} <= deps, (name, {module_file(m) for m in imported} - deps)
        checked.add(name)
    assert {"data", "train", "infer", "decode", "evaluate", "figures", "lm_graph"} <= checked


def test_second_run_does_nothing(snakemake_project):
    r = run([*SNAKEMAKE, "--cores", "1"], snakemake_project)
    assert "Nothing to be done" in r.stdout + r.stderr


def test_changed_train_params_rerun_only_downstream(snakemake_project):
    r = run([*SNAKEMAKE, "-n", "--cores", "1", "--config", "train={seed: 11}"], snakemake_project)
    assert planned_rules(r.stdout) == {"train", "infer", "score", "figures", "calibrate"} | DECODING
    r = run([*SNAKEMAKE, "-n", "--cores", "1", "--config", "calibrate={steps: 4}"], snakemake_project)
    assert planned_rules(r.stdout) == {"calibrate", "figures"}  # the calibration curve
    r = run([*SNAKEMAKE, "-n", "--cores", "1", "--config", "decode={beam: 12}"], snakemake_project)
    assert planned_rules(r.stdout) == DECODING
    r = run([*SNAKEMAKE, "-n", "--cores", "1", "--config", "simulate={seed: 4}"], snakemake_project)
    assert planned_rules(r.stdout) == {"data", "validate", "preprocess", "train", "infer", "score", "figures",
                                       "calibrate"} | LM_BUILD | DECODING


def test_bad_config_stops_before_anything_runs(snakemake_project):
    r = run([*SNAKEMAKE, "-n", "--cores", "1", "--config", "train={batch_size: 0}"], snakemake_project, check=False)
    assert r.returncode != 0 and "train.batch_size" in r.stdout + r.stderr


def test_report_is_self_contained(snakemake_project):
    run([*SNAKEMAKE, "--cores", "1", "--report", "report.html"], snakemake_project)
    html = (snakemake_project / "report.html").read_text(errors="replace")
    assert "per_session_per.png" in html


def test_dvc_runs_the_preset_alike(snakemake_project, tmp_path):
    """One stage table, two tools: with the preset on top of the tiny config, `dvc repro` (dvc.yaml
    generated for the same files) runs the stages Snakemake (`--configfile`) ran, writes the same
    results and decodes with the preset's options."""
    smk, dvc = snakemake_project, with_preset(make_project(tmp_path / "dvc"))
    hp.regenerate_dvc(dvc, "config/config.yaml", "config/model/baseline.yaml", PRESET_FILE)
    hp.init_dvc(dvc)
    r = run(["dvc", "repro"], dvc)
    assert hp.ran_stages(r.stdout) == {"corpus", "data", "validate", "preprocess", "train", "infer@val", "infer@test",
                                       "score", "figures", "calibrate", "kenlm_tools", "lm_text", "lm_ngram@2",
                                       "lm_graph@2", "decode", "score_words", "evaluate@val", "evaluate@test"}
    for rel in ("manifest.csv", "scores/val/per_session.csv", "scores/val/trials.csv", "calibration/calibration.csv",
                "lm/text.txt", "lm/2gram/lm.arpa", "decode/val/decoded.csv", "decode/val/nbest.jsonl",
                "scores/val/wer_per_session.csv", "evaluate/val/decoded.csv", "evaluate/test/submission.csv",
                "model/checkpoint/args.yaml"):
        assert (dvc / RUN / rel).read_text() == (smk / RUN / rel).read_text(), rel
    args = yaml.safe_load((dvc / RUN / "model/checkpoint/args.yaml").read_text())
    assert args["model"]["architecture"] == "triple"
    nbest = [json.loads(line) for line in (dvc / RUN / "decode/val/nbest.jsonl").read_text().splitlines()]
    best = next(row["candidates"][0] for row in nbest if row["candidates"])
    sentence, acoustic, ngram, llm, total = best
    assert total == pytest.approx(0.8 * acoustic + ngram, rel=1e-5)  # the preset's acoustic scale, in both tools
    assert "up to date" in run(["dvc", "status"], dvc).stdout.lower()
    shown = run(["dvc", "metrics", "show", "--json"], dvc).stdout
    assert "PER" in shown and "WER" in shown


def test_workflow_passes_snakemake_lint(tmp_path):
    project = make_project(tmp_path)
    r = run(["snakemake", "--lint"], project, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_existing_data_directory_skips_corpus_and_simulation(tmp_path, tiny_sim):
    project = make_project(tmp_path)
    r = run(["snakemake", "-n", "--cores", "1", "--config", f"data={{source: dir, dir: {tiny_sim}}}"], project)
    assert planned_rules(r.stdout) == {"validate", "preprocess", "train", "infer", "score", "figures",
                                       "calibrate", "kenlm_tools"} | LM_BUILD | DECODING


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
