"""Hostile data, logits, decoded tables and checkpoints (issue 15, points 2, 4 and 5): one table.

Every row starts from the same small world, made fresh for it (copies of the tiny simulated data
set, a tiny model directory built for its sessions, the manifest, a logits file, a decoded test
table), corrupts one thing in it, runs one command, and ``helpers.hostile.check`` asserts the exit
status, the culprit (file, trial, field or flag) named, no traceback, every input byte-identical
afterwards and nothing left at the output path. A few rows expect exit 0 with a warning: data that
are suspicious but not provably wrong.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.hostile import Case, check
from helpers.synthetic import synthetic_logits_file

from b2txt.data.dryad import discover
from b2txt.data.store import build_manifest, write_manifest
from b2txt.ground.config import ModelConfig, TrainConfig, merge
from b2txt.models.checkpoint import build_model, published_args

TINY = ModelConfig(n_units=8, n_layers=1)  # the default patch: 14 bins, stride 4
TRAIN = {"seed": 1, "model": {"n_units": 8, "n_layers": 1}, "num_training_batches": 4, "batch_size": 2,
         "days_per_batch": 1, "lr_warmup_steps": 1, "lr_decay_steps": 4, "lr_warmup_steps_day": 1,
         "lr_decay_steps_day": 4, "batches_per_val_step": 2, "batches_per_checkpoint": 2, "threads": 1,
         "holdout_sessions": []}
Setup = Callable[[dict[str, Path]], None]


def write_model(directory: Path, sessions: list[str], seed: int = 0) -> Path:
    """A model directory as `b2txt train` writes it (args.yaml in the published layout + weights)."""
    torch.manual_seed(seed)
    model = build_model(TINY, len(sessions))
    (directory / "checkpoint").mkdir(parents=True)
    args = published_args(TrainConfig(model=TINY), sessions, "data", str(directory))
    (directory / "checkpoint" / "args.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
    torch.save({"model_state_dict": model.state_dict(), "val_PER": 0.5, "val_loss": 1.0},
               directory / "checkpoint" / "best_checkpoint")
    return directory


@pytest.fixture(scope="module")
def sessions(tiny_sim) -> list[str]:
    return sorted({f.session for f in discover(tiny_sim)[0]})


@pytest.fixture(scope="module")
def pristine_model(tmp_path_factory, sessions) -> Path:
    return write_model(tmp_path_factory.mktemp("hostile_model") / "model", sessions)


@pytest.fixture()
def world(tmp_path, tiny_sim, pristine_model, sessions, lexicon) -> dict[str, Path]:
    """Fresh copies of everything a row may corrupt, and the paths its placeholders name."""
    d = tmp_path / "data"
    shutil.copytree(tiny_sim, d, symlinks=True)
    m = tmp_path / "model"
    shutil.copytree(pristine_model, m)
    man = tmp_path / "manifest.csv"
    write_manifest(build_manifest(d), man)
    lg = synthetic_logits_file(tmp_path / "val_logits.hdf5", lexicon, 4)
    dec = tmp_path / "decoded.csv"
    pd.DataFrame({"trial": [0, 1], "session": sessions[:1] * 2, "split": ["test", "test"],
                  "source_trial": ["trial_0000", "trial_0001"], "block_num": [3, 3], "trial_num": [0, 1],
                  "reference": ["", ""], "decoded": ["hello there", "good night"]}).to_csv(dec, index=False)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"train": TRAIN}))
    root = d / "hdf5_data_final"
    paths = {"d": d, "m": m, "man": man, "lg": lg, "dec": dec, "cfg": cfg, "o": tmp_path / "result",
             "args": m / "checkpoint" / "args.yaml", "ckpt": m / "checkpoint" / "best_checkpoint",
             "csv": d / "t15_copyTaskData_description.csv", "tmp": tmp_path}
    for i, s in enumerate(sessions):
        paths[f"s{i}"] = Path(s)
        for split in ("train", "val", "test"):
            paths[f"{split}{i}"] = root / s / f"data_{split}.hdf5"
    return paths


# ----------------------------------------------------------------------------- corruptions

def shorten(key: str, group: str, n_steps: int) -> Setup:
    """Cut one trial to its first ``n_steps`` bins (its attrs kept consistent)."""
    def setup(p: dict[str, Path]) -> None:
        with h5py.File(p[key], "r+") as f:
            g = f[group]
            x = g["input_features"][:n_steps]
            del g["input_features"]
            g.create_dataset("input_features", data=x)
            g.attrs["n_time_steps"] = n_steps
    return setup


def scale_features(key: str, group: str, value: float) -> Setup:
    def setup(p: dict[str, Path]) -> None:
        with h5py.File(p[key], "r+") as f:
            f[group]["input_features"][3, 7] = value
    return setup


def duplicate_trial(key: str) -> Setup:
    """The file's first trial again under the next free group name (same block and trial number)."""
    def setup(p: dict[str, Path]) -> None:
        with h5py.File(p[key], "r+") as f:
            f.copy(f["trial_0000"], f"trial_{len(f):04d}")
    return setup


def link_instead(key: str, target: str) -> Setup:
    """Replace a data file (or, with key ``sdir0``, a session folder) by a symbolic link to ``target``
    (``"self"``: to itself, a loop)."""
    def setup(p: dict[str, Path]) -> None:
        path = p["train0"].parent if key == "sdir0" else p[key]
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.symlink_to(path if target == "self" else p["tmp"] / target)
        p["link"] = path
    return setup


def drop_description_row(session_key: str, split: str) -> Setup:
    """Remove the description CSV's row of one session's block of ``split``."""
    def setup(p: dict[str, Path]) -> None:
        with h5py.File(p[f"{split}{session_key}"], "r") as f:
            block = int(f["trial_0000"].attrs["block_num"])
        df = pd.read_csv(p["csv"], dtype=str, keep_default_na=False)
        date = str(p[f"s{session_key}"])[4:].replace(".", "-")
        keep = ~((df["Date"] == date) & (df["Block number"].astype(int) == block))
        assert (~keep).sum() == 1
        df[keep].to_csv(p["csv"], index=False)
        p["block"] = Path(str(block))
    return setup


def conflicting_description_row(p: dict[str, Path]) -> None:
    """The description CSV's first row again, with another corpus."""
    df = pd.read_csv(p["csv"], dtype=str, keep_default_na=False)
    again = df.iloc[[0]].assign(Corpus="Random")
    pd.concat([df, again]).to_csv(p["csv"], index=False)
    p["line"] = Path(f"line {len(df) + 2}")


def duplicate_manifest_row(p: dict[str, Path]) -> None:
    df = pd.read_csv(p["man"], keep_default_na=False)
    first_train = df[df["split"] == "train"].iloc[[0]]
    pd.concat([df, first_train]).to_csv(p["man"], index=False)
    p["dup_trial"] = Path(first_train["trial"].iloc[0])


def edit_args(path: str, value: object) -> Setup:
    """Set (or with ``...`` delete) one field of the model's args.yaml, ``model.n_units`` style."""
    def setup(p: dict[str, Path]) -> None:
        args = yaml.safe_load(p["args"].read_text())
        *parents, last = path.split(".")
        node = args
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            del node[last]
        else:
            node[last] = value
        p["args"].write_text(yaml.safe_dump(args, sort_keys=False))
    return setup


def model_of_sessions(names: list[str]) -> Setup:
    def setup(p: dict[str, Path]) -> None:
        shutil.rmtree(p["m"])
        write_model(p["m"], names)
    return setup


def nan_weights(p: dict[str, Path]) -> None:
    ckpt = torch.load(p["ckpt"], weights_only=True)
    ckpt["model_state_dict"]["out.bias"][5] = float("nan")
    torch.save(ckpt, p["ckpt"])


def truncate(key: str, keep: float = 0.5) -> Setup:
    def setup(p: dict[str, Path]) -> None:
        data = p[key].read_bytes()
        p[key].write_bytes(data[: int(len(data) * keep)])
    return setup


def resume_state(kind: str) -> Setup:
    """A resume checkpoint in OUT.partial: ``truncated`` (a copy of a real checkpoint, cut) or
    ``incomplete`` (the run's own fingerprint, the rest missing)."""
    def setup(p: dict[str, Path]) -> None:
        from b2txt.training.trainer import Trainer, partial_dir

        cfg = TrainConfig.model_validate(merge(TRAIN, {}))
        work = partial_dir(p["o"]) / "checkpoint"
        work.mkdir(parents=True)
        p["resume"] = work / "last_checkpoint"
        if kind == "truncated":
            data = p["ckpt"].read_bytes()
            p["resume"].write_bytes(data[: len(data) // 3])
        else:
            fingerprint = Trainer(cfg, p["d"], p["man"], p["o"], log=lambda msg: None).fingerprint
            torch.save({"fingerprint": fingerprint, "step": 2}, p["resume"])
        p["partial"] = partial_dir(p["o"])
    return setup


def train_config(**overrides: object) -> Setup:
    """The train config of the world with these overrides (``augment.smooth_kernel_std`` style keys)."""
    def setup(p: dict[str, Path]) -> None:
        train = copy.deepcopy(TRAIN)
        for key, value in overrides.items():
            *parents, last = key.split("__")
            node = train
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = value
        p["cfg"].write_text(yaml.safe_dump({"train": train}))
    return setup


def logits_with(kind: str) -> Setup:
    """A logits file whose second trial has NaN, Inf or no frames, or whose column order is unknown."""
    def setup(p: dict[str, Path]) -> None:
        if kind == "order":
            with h5py.File(p["lg"], "r+") as f:
                f.attrs["column_order"] = "lm"
            return
        with h5py.File(p["lg"], "r+") as f:
            g = f["trial_00001"]
            x = g["logits"][()]
            del g["logits"]
            if kind == "empty":
                x = np.zeros((0, x.shape[1]), np.float32)
            else:
                x[2, 5] = np.nan if kind == "nan" else np.inf
            g.create_dataset("logits", data=x)
    return setup


def mismatched_words(p: dict[str, Path]) -> None:
    """The template graph with a words.txt cut to its first 50 entries (another table's)."""
    lm = p["tmp"] / "lm"
    shutil.copytree(p["template_lm"], lm)
    lines = (lm / "words.txt").read_text().splitlines()[:50]
    (lm / "words.txt").write_text("\n".join(lines) + "\n")
    p["lm"] = lm


def decoded_split(*splits: str) -> Setup:
    """The decoded table's rows of these splits (one per row; none: no split column at all)."""
    def setup(p: dict[str, Path]) -> None:
        df = pd.read_csv(p["dec"], keep_default_na=False)
        if splits:
            df["split"] = list(splits)
        else:
            df = df.drop(columns=["split"])
        df.to_csv(p["dec"], index=False)
    return setup


def nothing(p: dict[str, Path]) -> None:
    pass


# ----------------------------------------------------------------------------- the table

VALIDATE = ["validate", "{d}", "--report", "{o}"]
PREPROCESS = ["preprocess", "--data", "{d}", "--out", "{o}"]
INFER = ["infer", "--model", "{m}", "--data", "{d}", "--split", "val", "--out", "{o}", "--device", "cpu"]
INFER_TEST = [*INFER[:5], "--split", "test", *INFER[7:]]
TRAIN_CMD = ["train", "--config", "{cfg}", "--data", "{d}", "--manifest", "{man}", "--out", "{o}"]
DATA = ["d"]
MODEL_AND_DATA = ["d", "m"]

ROWS: list[tuple[Case, Setup]] = [
    # --- point 2: no silent empties ------------------------------------------------------------
    (Case("validate-test-trial-shorter-than-patch", VALIDATE, ["{test0}", "trial_0001", "shorter than the model's patch"],
          DATA, ["o"]), shorten("test0", "trial_0001", 10)),
    (Case("validate-train-labels-ctc-cannot-fit", VALIDATE, ["{train1}", "trial_0002", "CTC"], DATA, ["o"]),
     shorten("train1", "trial_0002", 30)),
    (Case("validate-val-labels-ctc-cannot-fit", VALIDATE, ["{val0}", "trial_0000", "CTC"], DATA, ["o"]),
     shorten("val0", "trial_0000", 40)),
    (Case("infer-trial-shorter-than-patch", INFER_TEST, ["{test1}", "trial_0000", "no output frames"],
          MODEL_AND_DATA, ["o"]), shorten("test1", "trial_0000", 13)),
    (Case("infer-trial-shorter-than-patch-manifest", [*INFER_TEST, "--manifest", "{man}"],
          ["trial_0002", "no output frames"], [*MODEL_AND_DATA, "man"], ["o"]), shorten("test0", "trial_0002", 5)),
    (Case("infer-batch-size-zero", [*INFER, "--batch-size", "0"], ["--batch-size"], MODEL_AND_DATA, ["o"]), nothing),
    (Case("infer-chunk-bins-zero", [*INFER, "--chunk-bins", "0"], ["--chunk-bins"], MODEL_AND_DATA, ["o"]), nothing),
    (Case("score-nan-logits", ["score", "--logits", "{lg}", "--out", "{o}"], ["{lg}", "trial_00001", "NaN/Inf"],
          ["lg"], ["o"]), logits_with("nan")),
    (Case("score-inf-logits", ["score", "--logits", "{lg}", "--out", "{o}"], ["{lg}", "trial_00001", "NaN/Inf"],
          ["lg"], ["o"]), logits_with("inf")),
    (Case("score-unknown-column-order", ["score", "--logits", "{lg}", "--out", "{o}"], ["{lg}", "column_order", "'lm'"],
          ["lg"], ["o"]), logits_with("order")),
    (Case("score-trial-without-frames", ["score", "--logits", "{lg}", "--out", "{o}"], ["{lg}", "trial_00001", "no frames"],
          ["lg"], ["o"]), logits_with("empty")),
    (Case("decode-trial-without-frames", ["decode", "--logits", "{lg}", "--lm", "{template_lm}", "--out", "{o}",
                                          "--workers", "1"], ["{lg}", "trial_00001", "no frames"], ["lg"], ["o"]),
     logits_with("empty")),
    (Case("decode-nan-logits", ["decode", "--logits", "{lg}", "--lm", "{template_lm}", "--out", "{o}",
                                "--workers", "1"], ["{lg}", "trial_00001", "NaN/Inf"], ["lg"], ["o"]),
     logits_with("nan")),
    (Case("decode-words-txt-of-another-graph", ["decode", "--logits", "{lg}", "--lm", "{lm}", "--out", "{o}",
                                                "--workers", "1"], ["{lm}/words.txt", "does not list"],
          ["lg", "lm"], ["o"]), mismatched_words),
    (Case("submission-of-the-val-split", ["submission", "--decoded", "{dec}", "--out", "{o}"],
          ["{dec}", "'val'", "test split only"], ["dec"], ["o"]), decoded_split("val", "val")),
    (Case("submission-of-mixed-splits", ["submission", "--decoded", "{dec}", "--out", "{o}"],
          ["{dec}", "'train'", "'test'"], ["dec"], ["o"]), decoded_split("train", "test")),
    (Case("submission-without-split-column", ["submission", "--decoded", "{dec}", "--out", "{o}"],
          ["{dec}", "no split column"], ["dec"], ["o"]), decoded_split()),
    # --- point 4: validation sees everything -------------------------------------------------------
    (Case("validate-dangling-link-to-a-split", VALIDATE, ["{link}", "dangling symbolic link"], DATA, ["o"]),
     link_instead("val1", "gone.hdf5")),
    (Case("validate-looping-link", VALIDATE, ["{link}", "looping symbolic link"], DATA, ["o"]),
     link_instead("test0", "self")),
    (Case("validate-dangling-session-folder", VALIDATE, ["{link}", "dangling symbolic link"], DATA, ["o"]),
     link_instead("sdir0", "moved-away")),
    (Case("preprocess-dangling-link-to-a-split", PREPROCESS, ["{link}", "dangling symbolic link"], DATA, ["o"]),
     link_instead("train1", "gone.hdf5")),
    (Case("infer-dangling-link-to-the-split", INFER, ["{link}", "dangling symbolic link"], MODEL_AND_DATA, ["o"]),
     link_instead("val0", "gone.hdf5")),
    (Case("lm-text-dangling-link-to-a-split", ["lm", "text", "--data", "{d}", "--out", "{o}"],
          ["{link}", "dangling symbolic link", "evaluation sentences"], DATA, ["o"]), link_instead("val0", "gone.hdf5")),
    (Case("validate-description-lacks-a-block", VALIDATE, ["{csv}", "{s1}", "block {block}"], DATA, ["o"]),
     drop_description_row("1", "val")),
    (Case("preprocess-description-lacks-a-block", PREPROCESS, ["{csv}", "{s0}", "block {block}"], DATA, ["o"]),
     drop_description_row("0", "train")),
    (Case("validate-description-block-twice", VALIDATE, ["{csv}", "{line}", "unlike line 2"], DATA, ["o"]),
     conflicting_description_row),
    (Case("preprocess-description-block-twice", PREPROCESS, ["{csv}", "{line}", "unlike line 2"], DATA, ["o"]),
     conflicting_description_row),
    (Case("validate-duplicate-trial", VALIDATE, ["{train0}", "trial_0003", "duplicate trial"], DATA, ["o"]),
     duplicate_trial("train0")),
    (Case("preprocess-duplicate-trial", PREPROCESS, ["duplicate trial", "trial_0000", "trial_0003"], DATA, ["o"]),
     duplicate_trial("val1")),
    (Case("train-manifest-lists-a-trial-twice", TRAIN_CMD, ["{man}", "duplicate trial", "{dup_trial}"],
          ["d", "man"], ["o"]), duplicate_manifest_row),
    (Case("infer-manifest-lists-a-trial-twice", [*INFER, "--manifest", "{man}"], ["{man}", "duplicate trial"],
          [*MODEL_AND_DATA, "man"], ["o"]), duplicate_manifest_row),
    (Case("validate-implausible-feature-values", VALIDATE, ["warning", "{train1}", "trial_0001", "1e+07"], DATA,
          status=0), scale_features("train1", "trial_0001", 1e7)),
    (Case("preprocess-implausible-feature-values", PREPROCESS, ["warning", "{test0}", "trial_0000"], DATA,
          status=0), scale_features("test0", "trial_0000", -3e5)),
    # --- point 5: checkpoints are checked ---------------------------------------------------------
    *[(Case(f"infer-args-{field}={value!r}", INFER, ["{args}", field], MODEL_AND_DATA, ["o"]), edit_args(field, value))
      for field, value in [
          ("model.n_units", 0), ("model.n_units", -8), ("model.n_units", "eight"), ("model.n_units", 10**9),
          ("model.n_units", ...), ("model.n_layers", 0), ("model.n_layers", 2.5), ("model.patch_size", -1),
          ("model.patch_size", 10**6), ("model.patch_stride", 0), ("model.patch_stride", True),
          ("model.n_input_features", 0), ("model.n_input_features", 513), ("model.rnn_dropout", 1.5),
          ("model.architecture", "lstm"), ("model.input_network.input_layer_dropout", -0.1),
          ("dataset.sessions", []), ("dataset.sessions", ...), ("dataset.sessions", "t15.2023.08.13"),
          ("dataset.sessions", [None]), ("dataset.feature_subset", [600] * 512), ("dataset.feature_subset", [-1]),
          ("dataset.feature_subset", [1, 1]), ("dataset.feature_subset", list(range(10))),
          ("dataset.data_transforms.smooth_kernel_std", 0), ("dataset.data_transforms.smooth_kernel_std", -2),
          ("dataset.data_transforms.smooth_kernel_std", float("nan")),
          ("dataset.data_transforms.smooth_kernel_std", float("inf")),
          ("dataset.data_transforms.smooth_kernel_std", 500), ("dataset.data_transforms.smooth_kernel_std", "two"),
          ("dataset.data_transforms.smooth_kernel_size", 0), ("dataset.data_transforms.smooth_data", "yes"),
      ]],
    *[(Case(f"train-config-{key}={value!r}", TRAIN_CMD, ["{cfg}", key.replace("__", ".")], ["d", "man", "cfg"], ["o"]),
       train_config(**{key: value}))
      for key, value in [("feature_subset", [600]), ("feature_subset", [-1, 3]), ("feature_subset", [4, 4]),
                         ("augment__smooth_kernel_std", float("inf")), ("augment__smooth_kernel_std", float("nan")),
                         ("augment__smooth_kernel_std", 0), ("augment__smooth_kernel_size", 0),
                         ("model__patch_size", 0), ("model__patch_stride", 0), ("model__n_layers", 0),
                         ("model__n_units", 10**6)]],
    (Case("infer-args-sessions-listed-twice", INFER, ["{args}", "dataset.sessions", "listed twice"], MODEL_AND_DATA,
          ["o"]), lambda p: edit_args("dataset.sessions", [str(p["s0"]), str(p["s0"])])(p)),
    (Case("infer-args-not-a-mapping", INFER, ["{args}", "expected a mapping"], MODEL_AND_DATA, ["o"]),
     lambda p: p["args"].write_text("- just\n- a list\n")),
    (Case("infer-checkpoint-truncated", INFER, ["{ckpt}", "cannot load checkpoint"], MODEL_AND_DATA, ["o"]),
     truncate("ckpt")),
    (Case("infer-checkpoint-nan-weights", INFER, ["{m}", "NaN/Inf logits"], MODEL_AND_DATA, ["o"]), nan_weights),
    (Case("infer-model-of-other-sessions", INFER, ["t15.2020.01.01", "unknown to the model"], MODEL_AND_DATA, ["o"]),
     model_of_sessions(["t15.2020.01.01", "t15.2020.01.02"])),
    (Case("infer-known-sessions-only-none-known", [*INFER, "--known-sessions-only"],
          ["none of the val trials' session(s)", "{m}"], MODEL_AND_DATA, ["o"]),
     model_of_sessions(["t15.2020.01.01", "t15.2020.01.02"])),
    (Case("train-resume-checkpoint-truncated", TRAIN_CMD, ["{resume}", "start afresh", "rm -r"],
          ["d", "man", "resume"], ["o"]), resume_state("truncated")),
    (Case("train-resume-checkpoint-incomplete", TRAIN_CMD, ["{resume}", "incomplete", "start afresh"],
          ["d", "man", "resume"], ["o"]), resume_state("incomplete")),
]


@pytest.mark.parametrize("case,setup", [pytest.param(c, s, id=c.id) for c, s in ROWS])
def test_hostile_data_logits_and_checkpoints(case: Case, setup: Setup, world, template_lm, capsys):
    world["template_lm"] = template_lm
    setup(world)
    capsys.readouterr()  # what setting up printed is not the command's output
    check(case, world, capsys)


def test_known_sessions_only_warns_of_the_trials_it_skips(world, capsys):
    """Some sessions unknown: they are skipped with a warning naming them, the rest are inferred."""
    from b2txt.cli import main

    model_of_sessions([str(world["s0"])])(world)
    assert main([*[a.format(**{k: str(v) for k, v in world.items()}) for a in INFER], "--known-sessions-only"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping" in err and str(world["s1"]) in err
    with h5py.File(world["o"]) as f:
        assert len(f) > 0 and {g.attrs["session"] for g in f.values()} == {str(world["s0"])}


def test_the_rows_cover_every_promise():
    """Each bullet of the brief has rows: a guard against the table shrinking unnoticed."""
    ids = [c.id for c, _ in ROWS]
    for prefix in ("validate-test-trial-shorter", "validate-train-labels-ctc", "infer-trial-shorter", "decode-trial-without",
                   "decode-words-txt", "score-nan", "score-unknown-column", "submission-of-the-val",
                   "validate-dangling-link", "validate-looping", "validate-description-lacks", "preprocess-duplicate",
                   "train-manifest-lists", "validate-implausible", "infer-args-", "infer-known-sessions-only",
                   "train-resume-checkpoint-truncated"):
        assert any(i.startswith(prefix) for i in ids), prefix
