"""Ensembles, checkpoint averaging (EMA) and test-time augmentation (issue 17, part 2).

Invariants, not snapshots: an ensemble of one is its member (up to log-softmax), a file with
itself is that file, an average of identical weights is those weights, TTA with the identity
transform is plain inference; mismatched members are clear errors naming the file and trial;
the ensemble preset's DAG is the same in Snakemake and DVC.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers.hostile import Case, check
from helpers.project import ROOT, make_project, planned_rules, run

from b2txt.cli import main
from b2txt.data.ensemble import average_log_probs, log_softmax
from b2txt.data.logits import read_logits, write_logits_trials
from b2txt.ground.config import TrainConfig, TTATransform, load_config, merge
from b2txt.ground.errors import B2txtError, ConfigError
from b2txt.models.checkpoint import build_model, safe_load
from b2txt.models.inference import infer_split
from b2txt.models.tta import shift_trial
from b2txt.training.averaging import WeightAverage
from b2txt.training.trainer import Trainer, TrainingInterrupted

TINY = {"seed": 1, "model": {"n_units": 16, "n_layers": 1}, "num_training_batches": 6, "batch_size": 4,
        "days_per_batch": 2, "lr_warmup_steps": 2, "lr_decay_steps": 6, "lr_warmup_steps_day": 2,
        "lr_decay_steps_day": 6, "batches_per_train_log": 2, "batches_per_val_step": 2, "batches_per_checkpoint": 2,
        "threads": 1, "holdout_sessions": []}
TRIPLE = {"architecture": "triple", "n_units": 16, "n_layers": 1, "noise_units": 8, "noise_layers": 1,
          "noisy_units": 8, "noisy_layers": 1}
BASE = [ROOT / "config/config.yaml", ROOT / "config/model/baseline.yaml"]


def tcfg(**overrides) -> TrainConfig:
    return TrainConfig.model_validate(merge(TINY, overrides))


def train(cfg: TrainConfig, sim, out: Path, stop_after: int | None = None) -> Trainer:
    trainer = Trainer(cfg, sim[0], sim[1], out, log=lambda msg: None)
    trainer.run(stop_after=stop_after)
    return trainer


@pytest.fixture(scope="module")
def models(small_sim, tmp_path_factory):
    """Two gru models (seeds 1, 2) and a triple one, trained a few batches; their val logits."""
    root = tmp_path_factory.mktemp("ensemble")
    out = {}
    for name, cfg in (("a", tcfg()), ("b", tcfg(seed=2)), ("t", tcfg(model=TRIPLE))):
        train(cfg, small_sim, root / name)
        infer_split(root / name, small_sim[0], small_sim[1], "val", root / f"{name}.hdf5", device="cpu")
        out[name] = root / name
    return root, out


def logits_of(path: Path) -> list[np.ndarray]:
    return [t.logits for t in read_logits(path)]


# ----------------------------------------------------------------------------- averaging

def test_average_of_one_and_of_copies_is_the_log_softmax():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 41)).astype(np.float32) * 3
    ls = log_softmax(x)
    np.testing.assert_allclose(average_log_probs([x]), ls, atol=1e-6)
    np.testing.assert_allclose(average_log_probs([x, x, x], [1, 2, 0.5]), ls, atol=1e-6)
    np.testing.assert_allclose(np.exp(average_log_probs([x, rng.normal(size=x.shape)])).sum(-1), 1, rtol=1e-5)
    # a zero weight leaves a member out
    np.testing.assert_allclose(average_log_probs([x, rng.normal(size=x.shape)], [1, 0]), ls, atol=1e-6)
    assert average_log_probs([np.zeros((0, 41))]).shape == (0, 41)
    with pytest.raises(B2txtError, match="frames must match"):
        average_log_probs([x, x[:-1]])


def test_ensemble_of_one_and_of_a_file_with_itself_is_that_file(models, tmp_path, capsys):
    root, _ = models
    a = root / "a.hdf5"
    assert main(["ensemble", "--logits", str(a), "--out", str(tmp_path / "one.hdf5")]) == 0
    assert main(["ensemble", "--logits", str(a), str(a), "--weights", "1", "3", "--out", str(tmp_path / "two.hdf5")]) == 0
    plain = read_logits(a)
    for out in ("one.hdf5", "two.hdf5"):
        ens = read_logits(tmp_path / out)
        assert len(ens) == len(plain)
        for p, e in zip(plain, ens):
            np.testing.assert_allclose(e.logits, log_softmax(p.logits), atol=1e-5)
            assert e.attrs == p.attrs and np.array_equal(e.labels, p.labels)
    # score reads it like any logits file: greedy PER is that of the model
    for name, path in (("plain", a), ("ens", tmp_path / "one.hdf5")):
        assert main(["score", "--logits", str(path), "--out", str(tmp_path / f"s-{name}")]) == 0
    assert (tmp_path / "s-plain/trials.csv").read_text() == (tmp_path / "s-ens/trials.csv").read_text()


def test_gru_and_triple_models_ensemble_and_weights_come_from_config(models, tmp_path):
    root, _ = models
    files = [root / "a.hdf5", root / "b.hdf5", root / "t.hdf5"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"ensemble": {"weights": [2.0, 1.0, 1.0]}}))
    assert main(["ensemble", "--config", str(cfg), "--logits", *map(str, files), "--out", str(tmp_path / "e.hdf5")]) == 0
    members = [logits_of(f) for f in files]
    for i, e in enumerate(logits_of(tmp_path / "e.hdf5")):
        np.testing.assert_allclose(e, average_log_probs([m[i] for m in members], [2, 1, 1]), atol=1e-6)


# ----------------------------------------------------------------------------- hostile members

@pytest.fixture()
def bad_files(models, tmp_path):
    root, _ = models
    a = root / "a.hdf5"
    trials = read_logits(a)
    fewer, other, shorter = tmp_path / "fewer.hdf5", tmp_path / "other.hdf5", tmp_path / "shorter.hdf5"
    write_logits_trials(fewer, trials[:-1])
    swapped = list(trials)
    swapped[1], swapped[2] = trials[2], trials[1]
    write_logits_trials(other, swapped)
    cut = [type(t)(t.logits[:-1] if i == 3 else t.logits, t.labels, t.attrs) for i, t in enumerate(trials)]
    write_logits_trials(shorter, cut)
    junk = tmp_path / "junk.hdf5"
    junk.write_text("not hdf5\n")
    return {"a": a, "fewer": fewer, "other": other, "shorter": shorter, "junk": junk, "o": tmp_path / "out.hdf5",
            "missing": tmp_path / "nope.hdf5"}


HOSTILE_MEMBERS = [
    Case("ensemble-fewer-trials", ["ensemble", "--logits", "{a}", "{fewer}", "--out", "{o}"],
         ["{fewer}", "trials, but {a}"], inputs=["a", "fewer"], outputs=["o"]),
    Case("ensemble-other-trials", ["ensemble", "--logits", "{a}", "{other}", "--out", "{o}"],
         ["{other}", "trial_00001", "same trials"], inputs=["a", "other"], outputs=["o"]),
    Case("ensemble-other-frames", ["ensemble", "--logits", "{a}", "{shorter}", "--out", "{o}"],
         ["{shorter}", "trial_00003", "frames", "patch size and stride"], inputs=["a", "shorter"], outputs=["o"]),
    Case("ensemble-not-hdf5", ["ensemble", "--logits", "{a}", "{junk}", "--out", "{o}"], ["{junk}"],
         inputs=["a", "junk"], outputs=["o"]),
    Case("ensemble-missing", ["ensemble", "--logits", "{a}", "{missing}", "--out", "{o}"], ["{missing}"],
         inputs=["a"], outputs=["o"]),
    Case("ensemble-weights-count", ["ensemble", "--logits", "{a}", "{a}", "--weights", "1", "--out", "{o}"],
         ["1 weight(s) for 2 member(s)"], inputs=["a"], outputs=["o"]),
    Case("ensemble-negative-weight", ["ensemble", "--logits", "{a}", "{a}", "--weights", "1", "-1", "--out", "{o}"],
         ["weights must be"], inputs=["a"], outputs=["o"]),
    Case("ensemble-nan-weight", ["ensemble", "--logits", "{a}", "--weights", "nan", "--out", "{o}"],
         ["weights must be"], inputs=["a"], outputs=["o"]),
    Case("train-unknown-member", ["train", "--member", "nope", "--data", "{a}", "--manifest", "{a}", "--out", "{o}"],
         ["ensemble.members", "'nope'"], inputs=["a"], outputs=["o"]),
    Case("ensemble-out-onto-member", ["ensemble", "--logits", "{a}", "{fewer}", "--out", "{fewer}"],
         ["--out {fewer} is the input --logits"], inputs=["a", "fewer"]),
]


@pytest.mark.parametrize("case", [c.param() for c in HOSTILE_MEMBERS])
def test_mismatched_members_are_clear_errors(case: Case, bad_files, capsys):
    check(case, bad_files, capsys)


def test_ensemble_config_errors_name_the_field(tmp_path):
    def cfg(**ensemble):
        p = tmp_path / "e.yaml"
        p.write_text(yaml.safe_dump({"ensemble": ensemble}))
        return load_config([*BASE, p])

    with pytest.raises(ConfigError, match="names must be unique"):
        cfg(members=[{"name": "x"}, {"name": "x"}])
    with pytest.raises(ConfigError, match="1 weight"):
        cfg(members=[{"name": "x"}, {"name": "y"}], weights=[1.0])
    with pytest.raises(ConfigError, match="patch_stride"):
        cfg(members=[{"name": "x"}, {"name": "y", "train": {"model": {"patch_stride": 2}}}])
    with pytest.raises(ConfigError, match="member 'y': train.batch_size"):
        cfg(members=[{"name": "x"}, {"name": "y", "train": {"batch_size": 0}}])
    with pytest.raises(ConfigError, match="ensemble.members"):
        cfg(members=[{"name": "bad/name"}])


# ----------------------------------------------------------------------------- checkpoint averaging

def test_average_of_identical_weights_changes_nothing():
    model = build_model(tcfg().model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightAverage(model, 0.9)
    for _ in range(50):
        ema.update(model)
    with ema.applied(model):
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
    # and a changed model gets its own weights back after the block
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied(model):
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, changed[k]) for k, v in model.state_dict().items())


def test_ema_with_zero_learning_rate_saves_the_initial_weights(small_sim, tmp_path):
    """A model that does not move (no optimizer steps change it) averages to itself: the saved
    weights are the initial ones, bit for bit."""
    cfg = tcfg(ema_decay=0.9, lr_max=1e-30, lr_min=0.0, lr_max_day=1e-30, lr_min_day=0.0, weight_decay=0.0,
               model={"rnn_dropout": 0.0, "input_dropout": 0.0})
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, 3).state_dict()
    trainer = train(cfg, small_sim, tmp_path / "m")
    saved = safe_load(tmp_path / "m/checkpoint/best_checkpoint")["model_state_dict"]
    for k, v in saved.items():
        torch.testing.assert_close(v, initial[k], rtol=0, atol=1e-20)
    assert trainer.ema.updates == cfg.num_training_batches


@pytest.mark.parametrize("model", [{"n_units": 16, "n_layers": 1}, TRIPLE], ids=["gru", "triple"])
def test_ema_is_what_is_saved_and_resume_restores_it_exactly(small_sim, tmp_path, model):
    cfg = tcfg(ema_decay=0.8, model=model, num_training_batches=8, lr_decay_steps=8, lr_decay_steps_day=8)
    full = train(cfg, small_sim, tmp_path / "full")
    best = safe_load(tmp_path / "full/checkpoint/best_checkpoint")
    raw = full.model.state_dict()
    assert any(not torch.equal(raw[k], v) for k, v in best["model_state_dict"].items())  # not the raw weights
    if best["step"] == cfg.num_training_batches:
        for k, v in full.ema.params.items():
            assert torch.equal(best["model_state_dict"][k], v), k
    with pytest.raises(TrainingInterrupted):
        train(cfg, small_sim, tmp_path / "resumed", stop_after=4)
    resumed = train(cfg, small_sim, tmp_path / "resumed")
    assert resumed.ema.updates == full.ema.updates == cfg.num_training_batches
    for k, v in full.ema.params.items():
        assert torch.equal(resumed.ema.params[k], v), k
    again = safe_load(tmp_path / "resumed/checkpoint/best_checkpoint")
    assert (again["step"], again["val_PER"]) == (best["step"], best["val_PER"])
    for k, v in best["model_state_dict"].items():
        assert torch.equal(again["model_state_dict"][k], v), k


def test_the_average_only_watches_the_raw_weights(small_sim, tmp_path):
    """Training with ema_decay takes the same steps as without it (benchmarks/ensemble.py relies on it)."""
    plain = train(tcfg(), small_sim, tmp_path / "plain")
    averaged = train(tcfg(ema_decay=0.5), small_sim, tmp_path / "ema")
    for k, v in plain.model.state_dict().items():
        assert torch.equal(averaged.model.state_dict()[k], v), k


# ----------------------------------------------------------------------------- test-time augmentation

def test_shift_keeps_the_length():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    assert np.array_equal(shift_trial(x, 0), x)
    assert np.array_equal(shift_trial(x, 2), np.r_[np.zeros((2, 2)), x[:4]])
    assert np.array_equal(shift_trial(x, -2), np.r_[x[2:], np.zeros((2, 2))])
    assert not shift_trial(x, 9).any() and shift_trial(x, -9).shape == x.shape


def test_tta_with_the_identity_is_plain_inference(models, small_sim, tmp_path):
    root, trained = models
    for name in ("a", "t"):
        out = tmp_path / f"{name}.hdf5"
        infer_split(trained[name], small_sim[0], small_sim[1], "val", out, device="cpu", tta=[TTATransform()])
        for p, e in zip(logits_of(root / f"{name}.hdf5"), logits_of(out)):
            np.testing.assert_allclose(e, log_softmax(p), atol=1e-5)


def test_tta_averages_the_transformed_runs_like_an_ensemble(models, small_sim, tmp_path):
    _, trained = models
    transforms = [TTATransform(), TTATransform(shift=1), TTATransform(smooth_std=1.5),
                  TTATransform(noise_seed=3, noise_scale=0.5)]
    runs = []
    for i, t in enumerate(transforms):
        infer_split(trained["a"], small_sim[0], small_sim[1], "val", tmp_path / f"{i}.hdf5", device="cpu", tta=[t])
        runs.append(logits_of(tmp_path / f"{i}.hdf5"))
    assert not np.allclose(runs[0][0], runs[1][0]) and not np.allclose(runs[0][0], runs[3][0])
    infer_split(trained["a"], small_sim[0], small_sim[1], "val", tmp_path / "all.hdf5", device="cpu",
                tta=transforms, batch_size=3)  # other batches: the noise is drawn per trial
    for i, e in enumerate(logits_of(tmp_path / "all.hdf5")):
        assert e.shape == runs[0][i].shape  # every transform keeps the frames
        np.testing.assert_allclose(e, average_log_probs([r[i] for r in runs]), atol=1e-5)


def test_infer_reads_tta_from_config_and_no_tta_turns_it_off(models, small_sim, tmp_path):
    root, trained = models
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"infer": {"tta": [{}, {"shift": 2}]}}))
    common = ["infer", "--config", str(cfg), "--model", str(trained["a"]), "--data", str(small_sim[0]),
              "--manifest", str(small_sim[1]), "--split", "val", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "tta.hdf5")]) == 0
    assert main([*common, "--no-tta", "--out", str(tmp_path / "plain.hdf5")]) == 0
    plain, tta = logits_of(tmp_path / "plain.hdf5"), logits_of(tmp_path / "tta.hdf5")
    np.testing.assert_array_equal(plain[0], logits_of(root / "a.hdf5")[0])
    assert not np.allclose(tta[0], log_softmax(plain[0]), atol=1e-4)


# ----------------------------------------------------------------------------- the DAG

PRESET = ["config/config.yaml", "config/model/baseline.yaml", "config/model/ensemble.yaml"]


def test_ensemble_preset_trains_three_seeds_and_decodes_their_ensemble():
    from b2txt.workflow import stages

    cfg = load_config([ROOT / f for f in PRESET])
    table = {s.name: s for s in stages(cfg)}
    assert [m.train_config(cfg.train).seed for m in cfg.ensemble.members] == [10, 11, 12]
    assert {"train_seed10", "train_seed11", "train_seed12", "infer_seed10", "ensemble"} <= set(table)
    assert "train" not in table and "infer" not in table
    assert table["decode"].inputs["logits"].path == "results/ensemble/logits/val.hdf5"
    assert table["ensemble"].outputs["logits"].path == "results/ensemble/logits/{split}.hdf5"
    assert [i.path for i in table["ensemble"].inputs.values()] == [
        f"results/ensemble/members/seed1{i}/logits/{{split}}.hdf5" for i in range(3)]
    assert load_config(BASE).ensemble.members == []  # the default run stays one model


def test_ensemble_preset_dag_is_the_same_in_snakemake_and_dvc(tmp_path):
    """The dry run's jobs and command lines are those of the dvc.yaml generated for the same files."""
    project = make_project(tmp_path / "p")
    (project / "config/model/ensemble.yaml").write_text((ROOT / "config/model/ensemble.yaml").read_text())
    run(["b2txt", "workflow", "dvc", *[x for f in PRESET for x in ("--config", f)]], project)
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    snakemake = Path(sys.executable).parent / "snakemake"
    r = run([str(snakemake), "-n", "-p", "--forceall", "--cores", "2", "--configfile", "config/model/ensemble.yaml"],
            project)
    assert planned_rules(r.stdout) == set(dvc)
    for name in ("train_seed11", "infer_seed12", "ensemble"):
        do = dvc[name].get("do", dvc[name])
        assert do["cmd"].startswith(f"b2txt {'train' if name.startswith('train') else name.split('_')[0]} ")
    assert "--member seed11" in dvc["train_seed11"]["cmd"]
    assert dvc["train_seed11"]["params"] == [{"config/config.yaml": ["ensemble.members"]},
                                             {"config/model/baseline.yaml": ["train"]},
                                             {"config/model/ensemble.yaml": ["ensemble.members"]}]
    ens = dvc["ensemble"]["do"]
    assert ens["cmd"].endswith("--logits results/ensemble/members/seed10/logits/${item}.hdf5 "
                               "results/ensemble/members/seed11/logits/${item}.hdf5 "
                               "results/ensemble/members/seed12/logits/${item}.hdf5 --out results/ensemble/logits/${item}.hdf5")
    assert "b2txt ensemble --config .snakemake/b2txt/ensemble-" in r.stdout
    assert "--logits results/ensemble/members/seed10/logits/val.hdf5 results/ensemble/members/seed11/logits/val.hdf5" in r.stdout
    assert "b2txt train --config .snakemake/b2txt/train-ensemble.members-" in r.stdout
    # other weights: the ensemble's config file changes (it reruns), the members' training's does not
    again = run([str(snakemake), "-n", "-p", "--forceall", "--cores", "2", "--configfile",
                 "config/model/ensemble.yaml", "--config", "ensemble={weights: [1, 2, 3]}"], project)

    def config_files(text: str, command: str) -> set[str]:
        return set(re.findall(rf"b2txt {command} --config (\S+)", text))

    assert config_files(again.stdout, "train") == config_files(r.stdout, "train") != set()
    assert config_files(again.stdout, "ensemble") != config_files(r.stdout, "ensemble")


@pytest.mark.slow
@pytest.mark.kenlm
def test_tiny_ensemble_preset_runs_end_to_end(tmp_path):
    project = make_project(tmp_path / "p")
    (project / "config/model/ensemble.yaml").write_text(yaml.safe_dump(
        {"ensemble": {"members": [{"name": "a", "train": {"seed": 1}}, {"name": "b", "train": {"seed": 2}}]},
         "calibrate": {"enabled": False}}))
    r = run(["snakemake", "results/tiny/scores/val/wer.json", "results/tiny/scores/val/metrics.json", "--cores", "1",
             "--configfile", "config/model/ensemble.yaml"], project)
    assert r.returncode == 0
    members = [logits_of(project / f"results/tiny/members/{m}/logits/val.hdf5") for m in ("a", "b")]
    for i, e in enumerate(logits_of(project / "results/tiny/logits/val.hdf5")):
        np.testing.assert_allclose(e, average_log_probs([m[i] for m in members]), atol=1e-6)
    assert (project / "results/tiny/scores/val/wer.json").is_file()
