"""Rapid calibration: a new day layer for a held-out session, fitted on its first N sentences."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from b2txt.cli import main
from b2txt.data.store import TrialStore, read_manifest
from b2txt.ground.config import AugmentConfig, CalibrateConfig, TrainConfig
from b2txt.ground.errors import B2txtError
from b2txt.models.checkpoint import load_model
from b2txt.training.calibration import calibrate, fit, session_per, with_new_session
from b2txt.training.trainer import Trainer

TRAIN = {
    "seed": 2, "model": {"n_units": 16, "n_layers": 1}, "num_training_batches": 6, "batch_size": 4,
    "days_per_batch": 2, "lr_warmup_steps": 2, "lr_decay_steps": 6, "lr_warmup_steps_day": 2,
    "lr_decay_steps_day": 6, "batches_per_train_log": 3, "batches_per_val_step": 3, "batches_per_checkpoint": 3,
    "threads": 1, "holdout_sessions": [-1],
}
CAL = {"steps": 3, "batch_size": 2, "lr": 0.01}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_sim):
    """(data dir, manifest, model dir trained without the last session, all sessions). Read-only."""
    data, manifest = small_sim
    model = tmp_path_factory.mktemp("calibrate") / "model"
    Trainer(TrainConfig.model_validate(TRAIN), data, manifest, model, log=lambda m: None).run()
    return data, manifest, model, sorted(read_manifest(manifest)["session"].unique())


def held_out_store(trained, split: str, loaded) -> TrialStore:
    data, manifest, _, sessions = trained
    rows = read_manifest(manifest)
    rows = rows[rows["session"] == sessions[-1]]
    store = TrialStore.load(data, rows, split, loaded.sessions + [sessions[-1]])
    store.features = [loaded.select_features(f) for f in store.features]
    return store


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in after if k not in before or not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------- with_new_session

def test_with_new_session_appends_a_copy_of_the_latest_earlier_day_layer(trained):
    *_, model_dir, sessions = trained
    loaded = load_model(model_dir)
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    assert loaded.sessions == sessions[:2]

    model, day = with_new_session(loaded, sessions[2])
    assert day == 2 and len(model.day_weights) == len(model.day_biases) == 3 and model.n_days == 3
    new_state = model.state_dict()
    assert changed(original, new_state) == {"day_weights.2", "day_biases.2"}
    assert torch.equal(new_state["day_weights.2"], original["day_weights.1"])  # the session just before
    assert torch.equal(new_state["day_biases.2"], original["day_biases.1"])
    # a copy, not a shared tensor; the loaded model itself is untouched
    with torch.no_grad():
        model.day_weights[2].add_(1.0)
    assert torch.equal(model.day_weights[1], original["day_weights.1"])
    assert len(loaded.model.day_weights) == 2 and loaded.model.n_days == 2
    assert not changed(original, loaded.model.state_dict())
    assert all(p.requires_grad for p in model.parameters())

    model.eval()
    x = torch.randn(3, 40, 512)
    with torch.no_grad():
        old_days = torch.tensor([0, 1, 0])
        assert torch.equal(model(x, old_days), loaded.model(x, old_days))


def test_new_day_starts_with_the_outputs_of_its_source_day(trained):
    *_, model_dir, sessions = trained
    loaded = load_model(model_dir)
    model, day = with_new_session(loaded, sessions[2])
    model.eval()
    x = torch.randn(2, 40, 512)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([day, day])), loaded.model(x, torch.tensor([1, 1])))


def test_new_session_between_two_sessions_copies_the_earlier_one(trained):
    *_, model_dir, sessions = trained
    loaded = load_model(model_dir)
    with torch.no_grad():  # make the two day layers distinguishable
        loaded.model.day_biases[0].fill_(0.25)
        loaded.model.day_biases[1].fill_(-0.5)
    name = sessions[0] + "x"  # sorts between the two trained sessions
    assert sessions[0] < name < sessions[1]
    model, day = with_new_session(loaded, name)
    assert torch.equal(model.day_biases[day], loaded.model.day_biases[0])


# ----------------------------------------------------------------------------- fit

@pytest.mark.parametrize("mode", ["day", "all"])
def test_fit_changes_only_the_new_day_layer_or_everything(trained, mode):
    *_, model_dir, sessions = trained
    loaded = load_model(model_dir)
    model, day = with_new_session(loaded, sessions[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    store = held_out_store(trained, "train", loaded)
    fit(model, day, store.features[:4], store.labels[:4], CalibrateConfig(fit=mode, **CAL), AugmentConfig(),
        loaded.kernel, torch.device("cpu"))
    diff = changed(before, model.state_dict())
    if mode == "day":
        assert diff == {"day_weights.2", "day_biases.2"}
    else:
        assert {"day_weights.2", "day_biases.2", "gru.weight_ih_l0", "gru.weight_hh_l0", "out.weight", "h0"} <= diff
        # the old sessions' day layers get no gradient from the new session's trials
        assert not {"day_weights.0", "day_weights.1"} & diff
    assert all(p.requires_grad for p in model.parameters())  # restored for later use
    assert not model.training


# ----------------------------------------------------------------------------- calibrate

def test_calibrate_writes_table_and_a_model_that_infers_every_session_and_figures_draw_it(trained, tmp_path, capsys):
    data, manifest, model_dir, sessions = trained
    out = tmp_path / "cal"
    table = calibrate(model_dir, data, manifest, CalibrateConfig(n_sentences=[4, 0, 2, 2], **CAL), out,
                      log=lambda m: None)
    csv = pd.read_csv(out / "calibration.csv")
    assert csv["n_sentences"].tolist() == [0, 2, 4] == table["n_sentences"].tolist()
    assert (csv["session"] == sessions[-1]).all()
    assert np.isfinite(csv["PER"]).all() and (csv["PER"] >= 0).all()
    assert np.allclose(csv["PER"], csv["edits"] / csv["ref_len"], rtol=1e-5)
    assert table["PER"].tolist() == (table["edits"] / table["ref_len"]).tolist()
    assert (csv["n_val_trials"] == 4).all() and csv["steps"].tolist() == [0, 3, 3] and (csv["fit"] == "day").all()
    assert not list(out.glob("*.png")), "the figures stage draws the calibration curve, not calibrate"
    from b2txt.figures import calibration_curve, save

    save(calibration_curve(csv), tmp_path / "figs", "calibration_curve")
    for ext in ("pdf", "png"):
        assert (tmp_path / "figs" / f"calibration_curve.{ext}").stat().st_size > 1000

    args = yaml.safe_load((out / "model" / "checkpoint" / "args.yaml").read_text())
    assert args["dataset"]["sessions"] == sessions
    assert args["b2txt"]["calibrated_from"] == str(model_dir)
    cal = load_model(out / "model")
    assert cal.sessions == sessions and len(cal.model.day_weights) == 3
    assert cal.checkpoint["val_PER"] == pytest.approx(table["PER"].iloc[-1])

    logits = tmp_path / "val.hdf5"
    capsys.readouterr()
    assert main(["infer", "--model", str(out / "model"), "--data", str(data), "--manifest", str(manifest),
                 "--split", "val", "--out", str(logits), "--device", "cpu"]) == 0
    assert "unknown" not in capsys.readouterr().err
    with h5py.File(logits) as f:
        assert {g.attrs["session"] for g in f.values()} == set(sessions) and len(f) == 12
        assert all(g["logits"].shape[1] == 41 for g in f.values())


def test_calibrated_model_reproduces_the_calibration_per(trained, tmp_path):
    data, manifest, model_dir, sessions = trained
    out = tmp_path / "cal"
    table = calibrate(model_dir, data, manifest, CalibrateConfig(n_sentences=[3], **CAL), out, log=lambda m: None)
    cal = load_model(out / "model")
    val = held_out_store(trained, "val", load_model(model_dir))
    edits, ref_len = session_per(cal.model, val, 2, cal.kernel, torch.device("cpu"))
    assert (edits, ref_len) == (table["edits"].iloc[0], table["ref_len"].iloc[0])


def test_calibration_is_the_same_every_run(trained, tmp_path):
    """Dropout draws from torch's global generator: whatever state it is in, the fit is the same."""
    data, manifest, model_dir, _ = trained
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        calibrate(model_dir, data, manifest, CalibrateConfig(n_sentences=[3], fit="all", **CAL), tmp_path / str(seed),
                  log=lambda m: None)
        states.append(torch.load(tmp_path / str(seed) / "model" / "checkpoint" / "best_checkpoint")["model_state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_zero_sentences_is_the_uncalibrated_copy(trained, tmp_path):
    data, manifest, model_dir, sessions = trained
    table = calibrate(model_dir, data, manifest, CalibrateConfig(n_sentences=[0], **CAL), tmp_path / "cal",
                      log=lambda m: None)
    loaded = load_model(model_dir)
    model, day = with_new_session(loaded, sessions[-1])
    val = held_out_store(trained, "val", loaded)
    edits, ref_len = session_per(model, val, day, loaded.kernel, torch.device("cpu"))
    assert table["PER"].tolist() == [edits / ref_len]
    assert (table["edits"].iloc[0], table["ref_len"].iloc[0], table["steps"].iloc[0]) == (edits, ref_len, 0)


def test_calibrate_errors_are_clear(trained, tmp_path):
    data, manifest, model_dir, sessions = trained
    with pytest.raises(B2txtError, match=r"asks for 9 sentences .* has 8"):
        calibrate(model_dir, data, manifest, CalibrateConfig(n_sentences=[0, 9], **CAL), tmp_path / "a",
                  log=lambda m: None)
    with pytest.raises(B2txtError, match="holdout_sessions"):
        calibrate(model_dir, data, manifest, CalibrateConfig(session=0, **CAL), tmp_path / "b", log=lambda m: None)
    with pytest.raises(B2txtError, match="holdout_sessions"):
        calibrate(model_dir, data, manifest, CalibrateConfig(session=sessions[1], **CAL), tmp_path / "c",
                  log=lambda m: None)
    with pytest.raises(B2txtError, match="calibrate.session"):
        calibrate(model_dir, data, manifest, CalibrateConfig(session=5, **CAL), tmp_path / "d", log=lambda m: None)
    assert not any((tmp_path / n).exists() for n in "abcd")  # no half-written output


def test_empty_n_sentences_is_a_clear_error(trained, tmp_path):
    data, manifest, model_dir, _ = trained
    with pytest.raises(ValueError, match="n_sentences"):  # the config refuses it
        CalibrateConfig(n_sentences=[], **CAL)
    bad = CalibrateConfig(**CAL).model_copy(update={"n_sentences": []})  # as a CLI override would
    with pytest.raises(B2txtError, match="n_sentences"):
        calibrate(model_dir, data, manifest, bad, tmp_path / "cal", log=lambda m: None)


def test_negative_n_sentences_is_refused(trained, tmp_path):
    data, manifest, model_dir, _ = trained
    with pytest.raises((B2txtError, ValueError)):  # ValueError: pydantic's ValidationError
        calibrate(model_dir, data, manifest, CalibrateConfig(n_sentences=[-1, 2], **CAL), tmp_path / "cal",
                  log=lambda m: None)


def test_calibrate_cli_prints_a_table(trained, tmp_path, capsys):
    data, manifest, model_dir, sessions = trained
    config = tmp_path / "cal.yaml"
    config.write_text(yaml.safe_dump({"calibrate": CAL}))
    out = tmp_path / "cal"
    capsys.readouterr()
    assert main(["calibrate", "--config", str(config), "--model", str(model_dir), "--data", str(data),
                 "--manifest", str(manifest), "--out", str(out), "--n-sentences", "0", "2"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].split() == ["session", "n_sentences", "PER"]
    assert [line.split()[:2] for line in printed[1:]] == [[sessions[-1], "0"], [sessions[-1], "2"]]
    assert pd.read_csv(out / "calibration.csv")["n_sentences"].tolist() == [0, 2]
    assert main(["calibrate", "--config", str(config), "--model", str(model_dir), "--data", str(data),
                 "--manifest", str(manifest), "--out", str(tmp_path / "bad"), "--session", "0"]) == 2
    assert "holdout_sessions" in capsys.readouterr().err
