"""Outputs b2txt did not write are never replaced without --force (issue 15, point 1).

Every command that replaces an output (file or directory) refuses an existing one that b2txt did
not write: one error naming the path and saying how to proceed (--force), exit 2, and the
existing output byte-identical. What b2txt wrote itself, a byte-identical copy of it (DVC's
checkout from its cache), an empty directory (Snakemake makes the outputs' parents) and
anything with --force are replaced. The refusal happens before the command reads anything, so
the cases need no real inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers.hostile import Case, check, digest
from helpers.synthetic import synthetic_logits_file

from b2txt.cli import COMMANDS, build_parser, main
from b2txt.ground.fileio import OWNER_MARK, is_own, mark_own, sidecar


@pytest.fixture()
def paths(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "in"
    d.mkdir()
    for name in ("m.csv", "x.hdf5", "lm.arpa", "d.csv", "a.pkl"):
        (d / name).write_text("data\n")
    theirs = tmp_path / "theirs"  # a directory of the user's
    theirs.mkdir()
    (theirs / "notes.txt").write_text("irreplaceable\n")
    (theirs / "lm.arpa").write_text("their LM\n")
    f = tmp_path / "theirs.txt"  # a file of the user's
    f.write_text("irreplaceable\n")
    link = tmp_path / "link.csv"
    link.symlink_to(f)
    edited = tmp_path / "edited.csv"  # b2txt wrote it, then someone edited it
    edited.write_text("a,b\n1,2\n")
    mark_own(edited)
    edited.write_text("a,b\n1,3\n")
    archive = tmp_path / "model.zip"
    shutil.make_archive(str(tmp_path / "model"), "zip", theirs)
    unpacked = tmp_path / "unpacked"
    (unpacked / "model").mkdir(parents=True)
    (unpacked / "model" / "notes.txt").write_text("irreplaceable\n")
    text_dir = tmp_path / "lmtext"
    text_dir.mkdir()
    (text_dir / "t.json").write_text("{}\n")  # where `lm text --out t.txt` puts its statistics
    config = tmp_path / "c.yaml"
    config.write_text(f"corpus:\n  out: {f}\n")
    return {"d": d, "text": text_dir / "t.txt", "tjson": text_dir / "t.json", "cfg": config, "m": d / "m.csv", "x": d / "x.hdf5", "arpa": d / "lm.arpa", "csv": d / "d.csv",
            "pkl": d / "a.pkl", "fd": theirs, "f": f, "link": link, "edited": edited, "zip": archive,
            "unpacked": unpacked, "target": unpacked / "model"}


def refused(id_: str, argv: list[str], out: str, flag: str = "--out") -> Case:
    """``argv`` would replace the user's ``out``: refused, naming it and --force, ``out`` untouched."""
    return Case(id_, argv, [f"{flag} {{{out}}} exists", "--force"], inputs=[out, "d"])


FOREIGN_OUTPUTS = [
    refused("corpus-file", ["corpus", "--out", "{f}"], "f"),
    refused("simulate-dir", ["simulate", "--out", "{fd}"], "fd"),
    refused("data-simulated-dir", ["data", "--out", "{fd}"], "fd"),
    refused("preprocess-file", ["preprocess", "--data", "{d}", "--out", "{f}"], "f"),
    refused("validate-report", ["validate", "{d}", "--report", "{f}"], "f", "--report"),
    refused("train-dir", ["train", "--data", "{d}", "--manifest", "{m}", "--out", "{fd}"], "fd"),
    refused("infer-file", ["infer", "--model", "{d}", "--data", "{d}", "--split", "val", "--out", "{f}"], "f"),
    refused("calibrate-dir", ["calibrate", "--model", "{d}", "--data", "{d}", "--manifest", "{m}", "--out", "{fd}"],
            "fd"),
    refused("score-dir", ["score", "--logits", "{x}", "--out", "{fd}"], "fd"),
    refused("submission-file", ["submission", "--decoded", "{csv}", "--out", "{f}"], "f"),
    refused("lm-text-file", ["lm", "text", "--out", "{f}"], "f"),
    Case("lm-text-statistics-beside", ["lm", "text", "--out", "{text}"], ["--out's statistics {tjson} exists", "--force"],
         inputs=["tjson"], outputs=["text"]),
    Case("corpus-default-out", ["corpus", "--config", "{cfg}"], ["corpus.out {f} exists", "--force"], inputs=["f"]),
    refused("lm-ngram-dir", ["lm", "ngram", "--text", "{m}", "--order", "3", "--out", "{fd}"], "fd"),
    refused("lm-import-dir", ["lm", "import", "--arpa", "{arpa}", "--out", "{fd}"], "fd"),
    refused("lm-graph-dir-holding-its-arpa", ["lm", "graph", "--out", "{fd}"], "fd"),
    refused("decode-dir", ["decode", "--logits", "{x}", "--lm", "{d}", "--out", "{fd}"], "fd"),
    refused("evaluate-dir", ["evaluate", "--logits", "{x}", "--lm_path", "{d}", "--out", "{fd}"], "fd"),
    refused("figures-dir", ["figures", "--model", "{d}", "--scores", "{d}", "--out", "{fd}"], "fd"),
    refused("figures-paper-dir", ["figures-paper", "--copy-task", "{pkl}", "--out", "{fd}"], "fd"),
    refused("unpack-target-dir", ["unpack", "{zip}", "--out", "{unpacked}"], "target"),
    Case("config-schema-foreign-file", ["config-schema", "--out", "{f}"], ["--out {f} exists", "--force"],
         inputs=["f"]),
    Case("output-is-a-symlink", ["preprocess", "--data", "{d}", "--out", "{link}"],
         ["--out {link} exists and is a symbolic link", "--force"], inputs=["f", "link"]),
    Case("b2txt-output-edited-since", ["preprocess", "--data", "{d}", "--out", "{edited}"],
         ["--out {edited} exists", "--force"], inputs=["edited"]),
]


@pytest.mark.parametrize("case", [c.param() for c in FOREIGN_OUTPUTS])
def test_an_output_b2txt_did_not_write_is_refused_untouched(case: Case, paths, capsys):
    check(case, paths, capsys)
    if case.id == "unpack-target-dir":
        assert {p.name for p in paths["unpacked"].iterdir()} == {"model"}  # no staging left beside it


def test_every_command_with_an_output_has_force_and_a_known_policy():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    writers = 0
    for cmd in COMMANDS:
        assert cmd.outputs in ("replace", "add", "self"), cmd.name
        p = sub.choices[cmd.name.split()[0]]
        if " " in cmd.name:
            p = next(a for a in p._actions if a.dest.endswith("_command")).choices[cmd.name.split()[1]]
        dests = {a.dest for a in p._actions}
        if dests & {"out", "report"}:
            writers += 1
            assert "force" in dests, f"{cmd.name} has an output but no --force"
    assert writers >= 20


def test_force_replaces_and_b2txt_replaces_its_own(tiny_sim, lexicon, paths, tmp_path, capsys):
    f = paths["f"]
    assert main(["preprocess", "--data", str(tiny_sim), "--out", str(f), "--force"]) == 0
    assert f.read_text().startswith("session,") and is_own(f)
    assert main(["preprocess", "--data", str(tiny_sim), "--out", str(f)]) == 0  # its own: replaced
    json.loads(sidecar(f).read_text())

    # DVC checks an output out from its cache as a copy (new inode, new mtime): same bytes, still b2txt's
    copy = tmp_path / "copy.csv"
    shutil.copyfile(f, copy)
    shutil.copyfile(sidecar(f), sidecar(copy))
    os.utime(copy, ns=(1, 1))
    assert main(["preprocess", "--data", str(tiny_sim), "--out", str(copy)]) == 0
    # ... without the record beside it (a fresh clone + `dvc pull`): only with --force
    sidecar(copy).unlink()
    capsys.readouterr()
    assert main(["preprocess", "--data", str(tiny_sim), "--out", str(copy)]) == 2
    assert f"--out {copy} exists" in capsys.readouterr().err
    assert main(["preprocess", "--data", str(tiny_sim), "--out", str(copy), "--force"]) == 0

    # an empty directory is nothing to lose; a directory b2txt wrote carries its mark when copied
    fig = tmp_path / "scores"
    fig.mkdir()
    logits = synthetic_logits_file(tmp_path / "val.hdf5", lexicon, 6)
    assert main(["score", "--logits", str(logits), "--out", str(fig)]) == 0
    assert (fig / OWNER_MARK).is_file() and (fig / "metrics.json").is_file()
    moved = tmp_path / "scores-copy"
    shutil.copytree(fig, moved)
    before = digest(moved)
    assert main(["score", "--logits", str(logits), "--out", str(moved)]) == 0
    assert digest(moved) == before  # same inputs, same bytes; the directory was replaced whole
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    # --force over the user's directory
    assert main(["score", "--logits", str(logits), "--out", str(paths["fd"]), "--force"]) == 0
    assert not (paths["fd"] / "notes.txt").exists() and (paths["fd"] / "metrics.json").is_file()


def test_shared_directory_layouts_match_what_the_stages_write():
    from b2txt.cli.lm import LM_DIR_FILES
    from b2txt.cli.score import SCORE_FILES
    from b2txt.evaluation.reports import PER_FILES, WER_FILES
    from b2txt.lm.graph import GRAPH_FILES
    from b2txt.lm.ngram import ngram_paths

    assert SCORE_FILES == PER_FILES | WER_FILES
    assert LM_DIR_FILES == GRAPH_FILES | {p.name for p in ngram_paths("x")}


def test_a_dvc_checkout_of_an_lm_directory_without_its_mark_is_b2txts(tmp_path, capsys):
    """DVC declares the files of an LM directory (lm.arpa, lm.bin from `lm ngram`; TLG.fst, ... from
    `lm graph`), not the directory: its checkout carries no mark. Only those names: b2txt's."""
    from b2txt.cli.lm import LM_DIR_FILES
    from b2txt.ground.errors import B2txtError
    from b2txt.ground.fileio import check_replaceable

    lm = tmp_path / "3gram"
    lm.mkdir()
    for name in ("lm.arpa", "lm.bin", "TLG.fst", "words.txt"):
        (lm / name).write_text("x")
    check_replaceable(lm, "--out", False, LM_DIR_FILES)
    (lm / "notes.txt").write_text("mine")
    with pytest.raises(B2txtError, match="--force"):
        check_replaceable(lm, "--out", False, LM_DIR_FILES)


def test_download_never_unpacks_over_a_directory_it_did_not_unpack(dryad, tmp_path, capsys):
    from helpers.dryad_server import DATA_DOI, Blob, zip_bytes

    from b2txt.data.dryad import DATA_SUBDIR

    dryad.datasets[DATA_DOI] = {"t15_copyTask_neuralData.zip": Blob(zip_bytes({
        f"{DATA_SUBDIR}/t15.2023.08.13/data_train.hdf5": b"new"}))}
    out = tmp_path / "data"
    theirs = out / DATA_SUBDIR / "t15.2023.08.11"
    theirs.mkdir(parents=True)
    (theirs / "data_train.hdf5").write_bytes(b"the lab's own recording")
    before = digest(out / DATA_SUBDIR)
    argv = ["download", "--api-root", dryad.url, "--out", str(out), "--retries", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--out {out / DATA_SUBDIR} exists" in err and "--force" in err
    assert digest(out / DATA_SUBDIR) == before and not (out / "t15_copyTask_neuralData.zip").exists()  # nothing fetched
    assert main([*argv, "--force"]) == 0
    assert (out / DATA_SUBDIR / "t15.2023.08.13" / "data_train.hdf5").read_bytes() == b"new"
    assert main(argv) == 0  # its own now: a second run has nothing to do
