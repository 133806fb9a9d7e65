"""The `b2txt` CLI: help everywhere, clear errors with exit status 2, no half-written output."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from b2txt.cli import build_parser, main
from b2txt.ground.errors import B2txtError

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # noqa: SLF001


def test_every_command_has_help(capsys):
    assert {"corpus", "simulate", "validate", "preprocess", "train", "infer", "score", "figures"} <= set(COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: b2txt {cmd}" in out and len(out) > 150


def test_entry_point_runs_as_a_program():
    r = subprocess.run([sys.executable, "-m", "b2txt", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "simulate" in r.stdout


def test_validate_clean_data_writes_report(tiny_sim, tmp_path, capsys):
    report = tmp_path / "ok.txt"
    assert main(["validate", str(tiny_sim), "--report", str(report)]) == 0
    assert "no problems found" in report.read_text()


def test_validate_bad_data_exits_2_and_names_file_trial_field(tiny_sim, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_sim, bad)
    f = next((bad / "hdf5_data_final").glob("*/data_val.hdf5"))
    with h5py.File(f, "a") as h:
        h["trial_0001"].attrs["n_time_steps"] = 3
    report = tmp_path / "report.txt"
    assert main(["validate", str(tiny_sim), "--report", str(report)]) == 0  # b2txt's: it may go
    capsys.readouterr()
    assert main(["validate", str(bad), "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "trial_0001" in err and "n_time_steps" in err
    assert not report.exists()  # a stale 'clean' report is removed, never left behind
    assert not list(tmp_path.glob(".report.txt*"))  # its provenance record with it


def test_preprocess_refuses_bad_data_without_output(tiny_sim, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_sim, bad)
    f = next((bad / "hdf5_data_final").glob("*/data_train.hdf5"))
    f.write_bytes(f.read_bytes()[:2000])  # truncated
    out = tmp_path / "manifest.csv"
    assert main(["preprocess", "--data", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b2txt preprocess: error:" in err and str(f) in err
    assert not out.exists() and not list(tmp_path.glob(".manifest.csv.tmp-*"))


def test_config_errors_are_one_clear_message(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("simulate:\n  n_sessions: zero\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "simulate.n_sessions" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_missing_inputs_are_clear_errors(tmp_path, capsys):
    assert main(["infer", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--split", "val",
                 "--manifest", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o.hdf5")]) == 2
    assert "best_checkpoint" in capsys.readouterr().err
    assert main(["simulate", "--sentences", str(tmp_path / "none.txt"), "--out", str(tmp_path / "d")]) == 2
    assert "none.txt" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nowhere")]) == 2


def test_stages_chain_from_cli(tiny_sim, tmp_path, capsys):
    """preprocess -> train -> infer -> score -> figures through the CLI on simulated data."""
    cfg = Path(__file__).parent / "configs" / "tiny.yaml"
    manifest, model = tmp_path / "manifest.csv", tmp_path / "model"
    assert main(["preprocess", "--data", str(tiny_sim), "--out", str(manifest)]) == 0
    assert main(["train", "--config", str(cfg), "--data", str(tiny_sim), "--manifest", str(manifest),
                 "--out", str(model), "--threads", "1"]) == 0
    assert (model / "checkpoint" / "best_checkpoint").is_file() and (model / "training_log").is_file()
    for split in ("val", "test"):
        assert main(["infer", "--model", str(model), "--data", str(tiny_sim), "--split", split,
                     "--out", str(tmp_path / f"{split}.hdf5"), "--known-sessions-only"]) == 0  # -1 held out
    with h5py.File(tmp_path / "test.hdf5") as f:
        assert all("seq_class_ids" not in g for g in f.values())  # test split: no labels
        assert all(g["logits"].shape[1] == 41 for g in f.values())
    capsys.readouterr()
    assert main(["score", "--logits", str(tmp_path / "val.hdf5"), "--out", str(tmp_path / "scores")]) == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert printed["PER"] == metrics["PER"] and 0 <= metrics["PER"] <= 5
    assert main(["score", "--logits", str(tmp_path / "test.hdf5"), "--out", str(tmp_path / "s2")]) == 2
    assert main(["figures", "--model", str(model), "--scores", str(tmp_path / "scores"),
                 "--out", str(tmp_path / "fig")]) == 0
    pdf = (tmp_path / "fig" / "per_session_per.pdf").read_bytes()
    assert b"/FontFile2" in pdf  # TrueType fonts embedded (pdf.fonttype 42)
    assert (tmp_path / "fig" / "training_curve.png").stat().st_size > 1000


def test_lm_import_of_a_missing_arpa_names_the_field_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"lm: {{source: arpa, arpa: {tmp_path / 'lab.arpa'}}}\n")
    assert main(["lm", "import", "--config", str(cfg), "--out", str(tmp_path / "lm")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'lab.arpa'}: lm.arpa: ARPA file not found" in err and "Traceback" not in err
    assert not (tmp_path / "lm").exists()
    assert main(["lm", "import", "--out", str(tmp_path / "lm")]) == 2  # the defaults name no ARPA
    assert "lm.arpa is not set" in capsys.readouterr().err


def test_data_command_with_a_missing_dir_source_is_one_clear_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: dir, dir: nowhere}\n")
    assert main(["data", "--config", str(cfg), "--out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere: data.source is 'dir' but the directory does not exist" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["data", "--config", str(cfg), "--out", str(tmp_path / "empty")]) == 2
    assert "no Dryad-layout data files" in capsys.readouterr().err
    assert list((tmp_path / "empty").iterdir()) == []


def _tree_digest(root):
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("argv, culprit", [
    (["train", "--data", "{d}", "--manifest", "{m}", "--out", "{d}"], "--out {d} is the input --data"),
    (["train", "--data", "{d}/sub", "--manifest", "{m}", "--out", "{d}"], "--out {d} contains the input --data"),
    (["infer", "--model", "{m}", "--data", "{d}/sub", "--manifest", "{m}", "--split", "val",
      "--out", "{d}/sub/x.hdf5"], "lies inside the input --data"),
    (["validate", "{d}", "--report", "{d}/report.txt"], "lies inside the input DATA_DIR"),
    (["preprocess", "--data", "{d}", "--out", "{m}"], "lies inside the input --data"),
    (["score", "--logits", "{d}/sub/x.hdf5", "--out", "{d}"], "contains the input --logits"),
    (["workflow", "dvc", "--config", "{d}/c.yaml", "--out", "{d}/c.yaml"], "is the input --config"),
    (["unpack", "{d}/a.zip", "--out", "{d}"], "contains the input ARCHIVES"),
])
def test_an_output_onto_an_input_is_refused_and_the_input_kept(tmp_path, capsys, argv, culprit):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ("m.csv", "c.yaml", "a.zip", "sub/x.hdf5"):
        (d / name).write_text("data\n")
    before = _tree_digest(d)
    args = [a.format(d=d, m=d / "m.csv") for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert culprit.format(d=d) in err and "never writes over what it reads" in err
    assert _tree_digest(d) == before


def test_lm_graph_may_write_beside_the_arpa_it_reads(tmp_path):
    """The pipeline's lm_graph adds TLG.fst to the n-gram directory that holds its lm.arpa."""
    from b2txt.cli.common import guard_outputs

    ns = argparse.Namespace(arpa=tmp_path / "3gram" / "lm.arpa", out=tmp_path / "3gram", config=None)
    guard_outputs(ns, out_holds_inputs=True)
    with pytest.raises(B2txtError, match="contains the input --arpa"):
        guard_outputs(ns)


@pytest.mark.parametrize("argv, flag", [
    (["train", "--data", "d", "--manifest", "m", "--out", "o", "--threads", "0"], "--threads"),
    (["train", "--data", "d", "--manifest", "m", "--out", "o", "--nproc", "-1"], "--nproc"),
    (["infer", "--model", "m", "--data", "d", "--split", "val", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["lm", "ngram", "--text", "t", "--out", "o", "--order", "0"], "--order"),
    (["decode", "--logits", "l", "--lm", "g", "--out", "o", "--workers", "0"], "--workers"),
    (["download", "--out", "o", "--timeout", "nan"], "--timeout"),
    (["lm-server", "--lm_path", "g", "--redis_port", "70000"], "--redis_port"),
    (["evaluate", "--logits", "l", "--out", "o", "--window", "two"], "--window"),
])
def test_numeric_arguments_are_range_checked_by_the_parser(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
