"""Training: exact resume (in-process and after a real SIGKILL), determinism, the published
optimizer groups and schedules, length bucketing, feature subsets, held-out sessions, the
triple architecture, early stopping, device selection and safe checkpoint loading.

Every model is tiny (16 units, 1 layer) and trains for a handful of batches on one thread.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers.processes import wait_for

from b2txt.cli import main
from b2txt.data.store import DayBatchSampler, TrialStore, read_manifest, split_by_length
from b2txt.ground.config import ModelConfig, TrainConfig, load_config, merge
from b2txt.ground.device import select_device, use_bf16
from b2txt.ground.errors import B2txtError
from b2txt.models.checkpoint import build_model, load_model, safe_load
from b2txt.models.decoders import TripleGRUDecoder
from b2txt.training.trainer import Trainer, TrainingInterrupted, build_optimizer, lr_lambda, partial_dir

ROOT = Path(__file__).resolve().parents[1]

TINY_GRU = {"n_units": 16, "n_layers": 1}
TINY_TRIPLE = {"architecture": "triple", "n_units": 16, "n_layers": 1, "noise_units": 8, "noise_layers": 1,
               "noisy_units": 8, "noisy_layers": 1}

BASE = {
    "seed": 1, "model": TINY_GRU, "num_training_batches": 8, "batch_size": 4, "days_per_batch": 2,
    "lr_warmup_steps": 2, "lr_decay_steps": 8, "lr_warmup_steps_day": 2, "lr_decay_steps_day": 8,
    "batches_per_train_log": 2, "batches_per_val_step": 2, "batches_per_checkpoint": 2, "threads": 1,
    "holdout_sessions": [],
}


def tcfg(**overrides) -> TrainConfig:
    return TrainConfig.model_validate(merge(BASE, overrides))


@pytest.fixture(scope="module")
def sim(small_sim):
    return small_sim


def sessions_of(manifest: Path) -> list[str]:
    return sorted(pd.read_csv(manifest)["session"].unique())


def run_trainer(cfg: TrainConfig, sim, out: Path, stop_after: int | None = None) -> tuple[Trainer, list[str]]:
    messages: list[str] = []
    trainer = Trainer(cfg, sim[0], sim[1], out, log=messages.append)
    trainer.run(stop_after=stop_after)
    return trainer, messages


def best_state(out: Path) -> dict[str, torch.Tensor]:
    return safe_load(out / "checkpoint" / "best_checkpoint")["model_state_dict"]


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics_without_seconds(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "metrics.csv").drop(columns="seconds")


def assert_published(out: Path) -> None:
    assert (out / "checkpoint" / "best_checkpoint").is_file()
    assert (out / "checkpoint" / "args.yaml").is_file()
    assert (out / "training_log").is_file() and (out / "metrics.csv").is_file()
    assert not (out / "checkpoint" / "last_checkpoint").exists()
    assert not partial_dir(out).exists()


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("model", [TINY_GRU, TINY_TRIPLE], ids=["gru", "triple"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run(sim, tmp_path, model):
    cfg = tcfg(model=model)
    full, _ = run_trainer(cfg, sim, tmp_path / "full")
    assert_published(tmp_path / "full")

    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        run_trainer(cfg, sim, out, stop_after=4)
    assert (partial_dir(out) / "checkpoint" / "last_checkpoint").is_file()
    assert (partial_dir(out) / "metrics.csv").is_file()
    assert not out.exists()  # a half-trained model never appears where infer would read it

    resumed, messages = run_trainer(cfg, sim, out)
    assert any("resuming from step 4" in m for m in messages), messages
    assert_published(out)
    # the final weights and the best checkpoint are bit-identical ...
    assert_states_equal(full.model.state_dict(), resumed.model.state_dict())
    assert_states_equal(best_state(tmp_path / "full"), best_state(out))
    a, b = (safe_load(p / "checkpoint" / "best_checkpoint") for p in (tmp_path / "full", out))
    assert (a["step"], a["val_PER"]) == (b["step"], b["val_PER"])
    # ... and so is the whole training history but its wall-clock column
    pd.testing.assert_frame_equal(metrics_without_seconds(tmp_path / "full"), metrics_without_seconds(out))
    assert metrics_without_seconds(out)["step"].max() == cfg.num_training_batches
    log = (out / "training_log").read_text()
    assert "resuming from step 4" in log and log.count(", val PER ") == cfg.num_training_batches // 2


def test_killed_cli_run_resumes_and_publishes(sim, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": merge(BASE, {
        "num_training_batches": 150, "lr_decay_steps": 150, "lr_decay_steps_day": 150,
        "batches_per_train_log": 25, "batches_per_val_step": 75, "batches_per_checkpoint": 5})}))
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "b2txt", "train", "--config", str(config), "--data", str(sim[0]),
           "--manifest", str(sim[1]), "--out", str(out), "--threads", "1"]
    env = dict(os.environ, B2TXT_PROGRESS="0")
    last = partial_dir(out) / "checkpoint" / "last_checkpoint"
    with open(tmp_path / "first.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path)
        try:
            wait_for(last.exists, "a resume checkpoint", 120, proc, tmp_path / "first.log")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert last.is_file() and not out.exists()

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_at = re.search(r"resuming from step (\d+)", r.stderr)
    assert resumed_at and int(resumed_at[1]) % 5 == 0 and 5 <= int(resumed_at[1]) < 150, r.stderr[-3000:]
    assert_published(out)
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].max() == 150 and metrics["step"].is_unique and metrics["step"].is_monotonic_increasing
    assert "resuming from step" in (out / "training_log").read_text()


def test_resume_checkpoint_of_another_config_is_not_used(sim, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(TrainingInterrupted):
        run_trainer(tcfg(seed=1), sim, out, stop_after=4)
    assert (partial_dir(out) / "checkpoint" / "last_checkpoint").is_file()

    new = tcfg(seed=2)
    trainer, messages = run_trainer(new, sim, out)
    assert not any("resuming" in m for m in messages)
    assert any("another config" in m and "starting afresh" in m for m in messages), messages
    assert_published(out)
    reference, _ = run_trainer(new, sim, tmp_path / "reference")
    assert_states_equal(reference.model.state_dict(), trainer.model.state_dict())
    assert_states_equal(best_state(tmp_path / "reference"), best_state(out))
    pd.testing.assert_frame_equal(metrics_without_seconds(tmp_path / "reference"), metrics_without_seconds(out))


def test_run_time_knobs_do_not_prevent_resuming(sim, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(TrainingInterrupted):
        run_trainer(tcfg(), sim, out, stop_after=2)
    # threads None keeps torch's current setting (1 here): other test modules are not affected
    _, messages = run_trainer(tcfg(threads=None, device="cpu", batches_per_checkpoint=3), sim, out)
    assert any("resuming from step 2" in m for m in messages), messages


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_weights_other_seed_other_weights(sim, tmp_path):
    a, _ = run_trainer(tcfg(seed=5), sim, tmp_path / "a")
    b, _ = run_trainer(tcfg(seed=5), sim, tmp_path / "b")
    c, _ = run_trainer(tcfg(seed=6), sim, tmp_path / "c")
    assert_states_equal(a.model.state_dict(), b.model.state_dict())
    assert_states_equal(best_state(tmp_path / "a"), best_state(tmp_path / "b"))
    pd.testing.assert_frame_equal(metrics_without_seconds(tmp_path / "a"), metrics_without_seconds(tmp_path / "b"))
    assert not states_equal(a.model.state_dict(), c.model.state_dict())
    assert not metrics_without_seconds(tmp_path / "a")["train_loss"].equals(
        metrics_without_seconds(tmp_path / "c")["train_loss"])


# ----------------------------------------------------------------------------- optimizer and schedules

@pytest.mark.parametrize("model", [TINY_GRU, TINY_TRIPLE], ids=["gru", "triple"])
def test_optimizer_groups_are_the_published_ones(model):
    cfg = tcfg(model=model, weight_decay=0.01, weight_decay_day=0.002, beta0=0.8, beta1=0.99, epsilon=0.05)
    net = build_model(cfg.model, n_days=3, neural_dim=32)
    opt, _ = build_optimizer(net, cfg)
    names = {id(p): n for n, p in net.named_parameters()}
    groups = opt.param_groups
    assert [g["group_type"] for g in groups] == ["bias", "day_layer", "other"]
    group_names = [{names[id(p)] for p in g["params"]} for g in groups]
    bias, day, other = group_names
    # every parameter in exactly one group
    assert sum(len(g) for g in group_names) == len(names) and bias | day | other == set(names.values())
    assert day == {f"day_weights.{i}" for i in range(3)} | {f"day_biases.{i}" for i in range(3)}
    for name in names.values():
        if not name.startswith("day_") and (name.endswith(".bias") or ".bias_" in name):
            assert name in bias, name
    assert all(not n.startswith("day_") and (n.endswith(".bias") or ".bias_" in n) for n in bias)
    if model is TINY_GRU:
        assert bias == {"gru.bias_ih_l0", "gru.bias_hh_l0", "out.bias"}
        assert other == {"gru.weight_ih_l0", "gru.weight_hh_l0", "out.weight", "h0"}
    else:
        assert {"clean_speech_model.h0", "noise_model.h0", "noisy_speech_model.h0",
                "noise_model.out.weight"} <= other
        assert {"noise_model.gru.bias_ih_l0", "clean_speech_model.out.bias"} <= bias
    assert [g["weight_decay"] for g in groups] == [0.0, 0.002, 0.01]
    assert [g["initial_lr"] for g in groups] == [cfg.lr_max, cfg.lr_max_day, cfg.lr_max]
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 0.05 for g in groups)
    assert isinstance(opt, torch.optim.AdamW)


def test_published_defaults_of_the_optimizer():
    """The paper preset carries the published training values (the built-in defaults are the small baseline's)."""
    cfg = load_config(Path(__file__).parents[1] / "config" / "model" / "paper.yaml").train
    assert (cfg.lr_max, cfg.lr_min, cfg.lr_warmup_steps, cfg.lr_decay_steps) == (0.005, 0.0001, 1000, 120_000)
    assert (cfg.beta0, cfg.beta1, cfg.epsilon, cfg.weight_decay, cfg.weight_decay_day) == (0.9, 0.999, 0.1, 0.001, 0)
    assert (cfg.grad_norm_clip_value, cfg.batch_size, cfg.days_per_batch) == (10, 64, 4)
    assert cfg.lr_scheduler_type == "cosine" and cfg.num_training_batches == 120_000


def test_lr_lambda_cosine_and_linear():
    f = lr_lambda(1.0, 0.1, 10, 110, "cosine")
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert [f(s) for s in range(11)] == pytest.approx([s / 10 for s in range(11)])
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.25)))
    assert f(60) == pytest.approx(0.55)
    decay = [f(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(decay, decay[1:]))  # monotone cosine decay
    assert f(110) == pytest.approx(0.1) and f(109) > 0.1
    assert f(111) == f(500) == pytest.approx(0.1)  # flat at lr_min / lr_max afterwards
    g = lr_lambda(2.0, 0.2, 10, 110, "linear")
    assert g(0) == 0.0 and g(5) == pytest.approx(0.5)
    assert g(35) == pytest.approx(1 - 0.9 * 0.25) and g(60) == pytest.approx(0.55)
    assert g(110) == pytest.approx(0.1) and g(1000) == pytest.approx(0.1)
    h = lr_lambda(1.0, 0.0, 0, 100, "cosine")  # no warm-up: full rate at once
    assert h(0) == pytest.approx(1.0) and h(100) == 0.0


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_scheduler_gives_the_day_group_its_own_schedule(kind):
    cfg = tcfg(lr_scheduler_type=kind, lr_max=0.01, lr_min=0.001, lr_warmup_steps=4, lr_decay_steps=20,
               lr_max_day=0.02, lr_min_day=0.0005, lr_warmup_steps_day=2, lr_decay_steps_day=10)
    net = build_model(cfg.model, n_days=2, neural_dim=16)
    opt, sched = build_optimizer(net, cfg)
    main_f = lr_lambda(0.01, 0.001, 4, 20, kind)
    day_f = lr_lambda(0.02, 0.0005, 2, 10, kind)
    seen = []
    for step in range(26):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == pytest.approx(0.01 * main_f(step), abs=1e-12)
        assert lrs[2] == pytest.approx(0.01 * main_f(step), abs=1e-12)
        assert lrs[1] == pytest.approx(0.02 * day_f(step), abs=1e-12)
        seen.append(lrs)
        opt.step()
        sched.step()
    assert seen[0] == [0.0, 0.0, 0.0]
    assert seen[2][1] == pytest.approx(0.02) and seen[2][0] == pytest.approx(0.005)  # day warm-up done first
    assert seen[10][1] == pytest.approx(0.0005) and seen[25][1] == pytest.approx(0.0005)
    assert seen[20][0] == pytest.approx(0.001) and seen[25][0] == pytest.approx(0.001)


# every sampler and each published-behaviour switch: the sampler's generator is its whole state
VARIANTS = {
    "one-padded-batch": {"length_chunks": 1, "packed": False},
    "padded-in-parts": {"packed": False},
    "bucketing": {"length_bucketing": True, "length_chunks": 1},
    "published-draw": {"trial_draw": "published"},
    "mix": {"length_bucketing": True, "bucket_mix": 0.5},
    "length-parts": {"length_chunks": 3, "batch_size": 7},
    "wide-published": {"length_bucketing": True, "bucket_width": 4.0, "trial_draw": "published", "batch_size": 5},
    "published": {"length_chunks": 1, "trial_draw": "published", "ctc_zero_infinity": False,
                  "fused_adamw": True, "augment": {"noise_over_padding": True, "random_walk_std": 0.1}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_sampler_and_variant_resumes_exactly(sim, tmp_path, variant):
    cfg = tcfg(**VARIANTS[variant])
    full, _ = run_trainer(cfg, sim, tmp_path / "full")
    with pytest.raises(TrainingInterrupted):
        run_trainer(cfg, sim, tmp_path / "resumed", stop_after=4)
    resumed, messages = run_trainer(cfg, sim, tmp_path / "resumed")
    assert any("resuming from step 4" in m for m in messages), messages
    assert_states_equal(full.model.state_dict(), resumed.model.state_dict())
    pd.testing.assert_frame_equal(metrics_without_seconds(tmp_path / "full"), metrics_without_seconds(tmp_path / "resumed"))


# ----------------------------------------------------------------------------- length parts

def test_split_by_length_partitions_a_batch_shortest_first():
    lengths = np.array([50, 300, 120, 80, 500, 90, 410])
    trials = np.array([6, 1, 3, 0, 5, 2, 4])
    assert split_by_length(trials, lengths, 1)[0].tolist() == trials.tolist()  # one part: the batch's order
    for k in (2, 3, 7, 20):
        parts = split_by_length(trials, lengths, k)
        assert len(parts) == min(k, len(trials)) and sorted(np.concatenate(parts).tolist()) == sorted(trials.tolist())
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        assert all(lengths[a].max() <= lengths[b].min() for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("model", [TINY_GRU, TINY_TRIPLE], ids=["gru", "triple"])
def test_length_parts_and_packing_take_the_same_step_as_one_padded_batch(sim, tmp_path, model):
    """length_chunks pads each part to its own longest trial and sums the parts' gradients;
    packed runs the GRUs on the real steps only (also within parts). All take the steps of
    the whole batch padded at once (dropout off; noise, cut and smoothing on, as they are drawn
    per trial), with less padding or none."""
    over = {"model": {**model, "rnn_dropout": 0.0, "input_dropout": 0.0}, "batch_size": 9, "length_bucketing": False,
            "augment": {"white_noise_std": 1.0, "constant_offset_std": 0.2, "random_walk_std": 0.1,
                        "static_gain_std": 0.05, "random_cut": 3}}
    runs = {name: Trainer(tcfg(**over, **kw), sim[0], sim[1], tmp_path / name, log=lambda m: None)
            for name, kw in {"whole": {"length_chunks": 1, "packed": False}, "parts": {"length_chunks": 3, "packed": False},
                             "packed": {"packed": True}, "packed-parts": {"length_chunks": 2, "packed": True}}.items()}
    assert runs["packed"].parts == 1  # auto: packing leaves no padding for parts to save
    assert runs["packed"].gru_mode() == "GRUs on the real steps (packed)"  # as the training log says
    assert runs["parts"].gru_mode() == "padded batches in 3 length parts"
    whole = runs.pop("whole")
    for _ in range(4):
        loss = whole.train_step()
        for trainer in runs.values():
            assert trainer.train_step() == pytest.approx(loss, rel=1e-5)
    for name, trainer in runs.items():
        for (key, a), b in zip(whole.model.state_dict().items(), trainer.model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    assert runs["parts"].stats["padding"] < 0.7 * whole.stats["padding"], (runs["parts"].stats, whole.stats)
    assert runs["packed"].stats["padding"] == runs["packed-parts"].stats["padding"] == 0


# ----------------------------------------------------------------------------- length bucketing

def fake_store(lengths_per_day: list[np.ndarray]) -> tuple[TrialStore, np.ndarray]:
    lengths = np.concatenate(lengths_per_day)
    day_idx = np.concatenate([np.full(len(x), d) for d, x in enumerate(lengths_per_day)]).astype(np.int64)
    features = [np.zeros((int(n), 1), dtype=np.float32) for n in lengths]
    store = TrialStore(features, [np.array([1])] * len(lengths), day_idx,
                       [f"s{d}" for d in range(len(lengths_per_day))], pd.DataFrame(index=range(len(lengths))))
    return store, lengths


def padding_waste(batches: list[np.ndarray], lengths: np.ndarray) -> float:
    return float(np.mean([1 - lengths[b].sum() / (len(b) * lengths[b].max()) for b in batches]))


def test_length_bucketing_reduces_padding_and_still_draws_every_trial():
    rng = np.random.default_rng(0)
    store, lengths = fake_store([rng.integers(50, 800, size=n) for n in (100, 80, 120)])
    plain = DayBatchSampler(store, 16, 2, seed=3)
    bucketed = DayBatchSampler(store, 16, 2, seed=3, lengths=lengths)
    waste_plain = padding_waste([plain.next_batch() for _ in range(200)], lengths)
    waste_bucketed = padding_waste([bucketed.next_batch() for _ in range(200)], lengths)
    assert waste_plain > 0.35
    assert waste_bucketed < 0.5 * waste_plain, (waste_bucketed, waste_plain)
    drawn = np.concatenate([bucketed.next_batch() for _ in range(10000)])
    assert set(drawn.tolist()) == set(range(len(lengths)))  # the shortest and longest trials too
    for batch in (bucketed.next_batch() for _ in range(50)):
        assert len(batch) == 16
        days = store.day_idx[batch]
        assert len(set(days.tolist())) == 2 and all((days == d).sum() == 8 for d in set(days.tolist()))


def test_length_bucketing_draws_trials_about_equally_often():
    rng = np.random.default_rng(0)
    store, lengths = fake_store([rng.integers(50, 800, size=n) for n in (100, 80, 120)])
    bucketed = DayBatchSampler(store, 16, 2, seed=3, lengths=lengths)
    counts = np.bincount(np.concatenate([bucketed.next_batch() for _ in range(10000)]), minlength=len(lengths))
    assert counts.min() > 0.25 * np.median(counts), (counts.min(), np.median(counts))


@pytest.mark.parametrize("bucketing", [False, True])
def test_sampler_must_include_days_and_is_deterministic(bucketing):
    rng = np.random.default_rng(1)
    store, lengths = fake_store([rng.integers(50, 800, size=n) for n in (20, 20, 20, 20)])
    lens = lengths if bucketing else None
    a = DayBatchSampler(store, 9, 2, seed=7, must_include_days=[2], lengths=lens)
    b = DayBatchSampler(store, 9, 2, seed=7, must_include_days=[2], lengths=lens)
    c = DayBatchSampler(store, 9, 2, seed=8, must_include_days=[2], lengths=lens)
    batches_a = [a.next_batch() for _ in range(200)]
    batches_b = [b.next_batch() for _ in range(200)]
    batches_c = [c.next_batch() for _ in range(200)]
    assert all(np.array_equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not all(np.array_equal(x, y) for x, y in zip(batches_a, batches_c))
    for batch in batches_a:
        assert len(batch) == 9 and 2 in store.day_idx[batch]
        assert (store.day_idx[batch] == 2).sum() == 5  # the remainder goes to the first (must-include) day
    other_days = {int(d) for batch in batches_a for d in store.day_idx[batch]} - {2}
    assert other_days == {0, 1, 3}


def test_published_draw_takes_ceil_per_day_with_replacement_and_drops_the_extra():
    rng = np.random.default_rng(1)
    store, lengths = fake_store([rng.integers(50, 800, size=n) for n in (6, 6, 6, 6)])
    a = DayBatchSampler(store, 9, 2, seed=7, draw="published")
    b = DayBatchSampler(store, 9, 2, seed=7, draw="published")
    batches = [a.next_batch() for _ in range(300)]
    assert all(np.array_equal(x, b.next_batch()) for x in batches)
    dupes = 0
    for batch in batches:
        assert len(batch) == 9
        counts = sorted(np.bincount(store.day_idx[batch]).tolist())
        assert [c for c in counts if c] == [4, 5]  # ceil(9 / 2) = 5 each, one dropped from a random day
        dupes += len(set(batch.tolist())) < 9
    assert dupes > 30  # with replacement: 5 draws from 6 trials repeat one more often than not
    with pytest.raises(B2txtError, match="trial draw"):
        DayBatchSampler(store, 9, 2, seed=7, draw="sorted")


def test_bucket_mix_and_width_trade_padding_between_bucketed_and_random():
    rng = np.random.default_rng(0)
    store, lengths = fake_store([rng.integers(50, 800, size=n) for n in (100, 80, 120)])

    def waste(**kw):
        s = DayBatchSampler(store, 16, 2, seed=3, **kw)
        return padding_waste([s.next_batch() for _ in range(400)], lengths)

    bucketed, plain = waste(lengths=lengths), waste()
    mixed, wide = waste(lengths=lengths, mix=0.5), waste(lengths=lengths, width=4.0)
    assert bucketed < mixed < plain and bucketed < wide < plain, (bucketed, mixed, wide, plain)
    # mix 0 and width 1.5 are today's sampler, draw for draw
    a = DayBatchSampler(store, 16, 2, seed=3, lengths=lengths)
    b = DayBatchSampler(store, 16, 2, seed=3, lengths=lengths, mix=0.0, width=1.5)
    assert all(np.array_equal(a.next_batch(), b.next_batch()) for _ in range(100))
    # mix 1: no batch is bucketed, yet every trial is still drawn
    c = DayBatchSampler(store, 16, 2, seed=3, lengths=lengths, mix=1.0)
    assert waste(lengths=lengths, mix=1.0) == pytest.approx(plain, abs=0.05)
    assert set(np.concatenate([c.next_batch() for _ in range(3000)]).tolist()) == set(range(len(lengths)))


def test_noise_over_padding_keeps_the_noise_inside_trials_and_fills_the_padding():
    from b2txt.ground.config import AugmentConfig
    from b2txt.models.transforms import augment, trial_generator

    x = torch.randn(3, 20, 4)
    lengths = torch.tensor([20, 12, 7])
    x[1, 12:] = 0
    x[2, 7:] = 0
    data_only = AugmentConfig(white_noise_std=1.0, constant_offset_std=0.2, random_walk_std=0.1, static_gain_std=0.05)
    padded = data_only.model_copy(update={"noise_over_padding": True})

    def gens(trials):
        return [trial_generator(7, 3, i) for i in trials]

    a, b = augment(x, lengths, data_only, gens([0, 1, 2])), augment(x, lengths, padded, gens([0, 1, 2]))
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(a[i, :n], b[i, :n])  # the same noise inside the trial
        assert torch.all(a[i, n:] == 0)
        if n < 20:
            assert torch.all(b[i, n:] != 0)
    # a data-parallel share padded to its own longest trial gets the global batch's padding noise
    share = augment(x[2:, :12], lengths[2:], padded, gens([2]), padded_to=20)
    assert torch.equal(share[0], b[2, :12])


# ----------------------------------------------------------------------------- feature subsets, held-out sessions

def test_feature_subset_trains_and_infers(sim, tmp_path, capsys):
    out = tmp_path / "model"
    subset = list(range(256))
    run_trainer(tcfg(feature_subset=subset, num_training_batches=4, lr_decay_steps=4, lr_decay_steps_day=4), sim, out)
    args = yaml.safe_load((out / "checkpoint" / "args.yaml").read_text())
    assert args["dataset"]["feature_subset"] == subset
    assert args["model"]["n_input_features"] == 256 and args["dataset"]["neural_dim"] == 256
    loaded = load_model(out)
    assert loaded.feature_subset == subset
    assert tuple(loaded.model.day_weights[0].shape) == (256, 256)
    assert loaded.select_features(np.zeros((30, 512), dtype=np.float32)).shape == (30, 256)
    logits = tmp_path / "val.hdf5"
    assert main(["infer", "--model", str(out), "--data", str(sim[0]), "--manifest", str(sim[1]), "--split", "val",
                 "--out", str(logits), "--device", "cpu"]) == 0
    with h5py.File(logits) as f:
        assert len(f) == 12
        assert all(g["logits"].ndim == 2 and g["logits"].shape[1] == 41 for g in f.values())


def test_empty_feature_subset_is_refused_or_means_all_features(sim, tmp_path):
    out = tmp_path / "model"
    try:
        run_trainer(tcfg(feature_subset=[], num_training_batches=2, lr_decay_steps=2, lr_decay_steps_day=2), sim, out)
    except (B2txtError, ValueError):
        return  # refused upfront: fine
    assert load_model(out).model.day_weights[0].shape[0] == 512


def test_bad_feature_subset_is_a_clear_error(sim, tmp_path):
    with pytest.raises(ValueError, match="feature_subset"):  # the config refuses it, before any data are read
        tcfg(feature_subset=[0, 512])
    with pytest.raises(B2txtError, match="feature_subset"):  # and the trainer, given a config built unchecked
        Trainer(TrainConfig.model_construct(**{**tcfg().__dict__, "feature_subset": [0, 512]}), sim[0], sim[1],
                tmp_path / "m", log=lambda m: None)


def test_holdout_session_is_left_out_and_infer_names_it(sim, tmp_path, capsys):
    out = tmp_path / "model"
    all_sessions = sessions_of(sim[1])
    trainer, _ = run_trainer(tcfg(holdout_sessions=[-1], num_training_batches=4, lr_decay_steps=4,
                                  lr_decay_steps_day=4), sim, out)
    held_out = all_sessions[-1]
    assert trainer.sessions == all_sessions[:-1]
    assert held_out not in set(trainer.train_store.rows["session"]) | set(trainer.val_store.rows["session"])
    args = yaml.safe_load((out / "checkpoint" / "args.yaml").read_text())
    assert args["dataset"]["sessions"] == all_sessions[:-1]
    assert len(load_model(out).model.day_weights) == 2

    base = ["infer", "--model", str(out), "--data", str(sim[0]), "--manifest", str(sim[1]), "--split", "val",
            "--device", "cpu"]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "all.hdf5")]) == 2
    err = capsys.readouterr().err
    assert held_out in err and "calibrate" in err and "--known-sessions-only" in err
    assert not (tmp_path / "all.hdf5").exists()
    assert main(base + ["--out", str(tmp_path / "known.hdf5"), "--known-sessions-only"]) == 0
    assert held_out in capsys.readouterr().err  # the skipped trials are reported
    with h5py.File(tmp_path / "known.hdf5") as f:
        assert {g.attrs["session"] for g in f.values()} == set(all_sessions[:-1])
        assert len(f) == 8


def test_holdout_by_name_and_bad_holdouts(sim, tmp_path):
    all_sessions = sessions_of(sim[1])
    trainer = Trainer(tcfg(holdout_sessions=[all_sessions[0]]), sim[0], sim[1], tmp_path / "m", log=lambda m: None)
    assert trainer.sessions == all_sessions[1:]
    with pytest.raises(B2txtError, match="out of range"):
        Trainer(tcfg(holdout_sessions=[3]), sim[0], sim[1], tmp_path / "m", log=lambda m: None)
    with pytest.raises(B2txtError, match="unknown session"):
        Trainer(tcfg(holdout_sessions=["t15.1999.01.01"]), sim[0], sim[1], tmp_path / "m", log=lambda m: None)
    with pytest.raises(B2txtError, match="no session"):
        Trainer(tcfg(holdout_sessions=[0, 1, 2]), sim[0], sim[1], tmp_path / "m", log=lambda m: None)


# ----------------------------------------------------------------------------- triple through the CLI

def test_triple_architecture_trains_through_the_cli(sim, tmp_path, capsys):
    config = tmp_path / "triple.yaml"
    config.write_text(yaml.safe_dump({"train": merge(BASE, {"model": TINY_TRIPLE, "num_training_batches": 4,
                                                            "lr_decay_steps": 4, "lr_decay_steps_day": 4})}))
    out = tmp_path / "model"
    assert main(["train", "--config", str(config), "--data", str(sim[0]), "--manifest", str(sim[1]),
                 "--out", str(out), "--threads", "1"]) == 0
    assert_published(out)
    args = yaml.safe_load((out / "checkpoint" / "args.yaml").read_text())
    assert args["model"]["architecture"] == "triple"
    assert args["model"]["triple"]["noise_units"] == 8 and args["model"]["triple"]["adversarial_weight"] == 0.5
    log = (out / "training_log").read_text()
    assert "triple model" in log and "clean_loss" in log and "noisy_loss" in log
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"clean_loss", "noisy_loss"} <= set(metrics.columns)

    loaded = load_model(out)
    assert isinstance(loaded.model, TripleGRUDecoder)
    assert loaded.model.cfg.noise_units == 8 and loaded.model.cfg.noisy_layers == 1
    # the trained weights, in a model built from the config (not from args.yaml)
    trained = build_model(ModelConfig(**TINY_TRIPLE), 3)
    trained.load_state_dict(best_state(out))
    trained.eval()
    store = TrialStore.load(sim[0], read_manifest(sim[1]), "val", sessions_of(sim[1]))
    x = torch.from_numpy(store.features[0])[None]
    day = torch.tensor([int(store.day_idx[0])])
    with torch.no_grad():
        clean, _, _ = trained(x, day, mode="full")
        assert torch.equal(loaded.model(x, day), clean)


# ----------------------------------------------------------------------------- early stopping

def test_early_stopping_when_nothing_improves(sim, tmp_path):
    cfg = tcfg(num_training_batches=20, lr_decay_steps=20, lr_decay_steps_day=20, lr_max=1e-12, lr_min=0.0,
               lr_max_day=1e-12, lr_min_day=0.0, early_stopping_val_steps=1, batches_per_checkpoint=100)
    trainer, messages = run_trainer(cfg, sim, tmp_path / "model")
    assert trainer.step == 4 < cfg.num_training_batches  # val at 2 sets the best, val at 4 does not improve
    assert any("early stopping at step 4" in m for m in messages), messages
    assert_published(tmp_path / "model")
    metrics = pd.read_csv(tmp_path / "model" / "metrics.csv")
    assert metrics["step"].max() == 4
    per = metrics["val_PER"].dropna()
    assert len(per) == 2 and per.iloc[0] == per.iloc[1]
    assert safe_load(tmp_path / "model" / "checkpoint" / "best_checkpoint")["step"] == 2
    assert "early stopping" in (tmp_path / "model" / "training_log").read_text()
    args = yaml.safe_load((tmp_path / "model" / "checkpoint" / "args.yaml").read_text())
    assert args["early_stopping"] is True and args["early_stopping_val_steps"] == 1


# ----------------------------------------------------------------------------- devices

def test_select_device_and_bf16():
    assert select_device("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) is False
    assert use_bf16("bf16", cpu) is True
    assert use_bf16("off", cpu) is False
    with pytest.raises(B2txtError, match="unknown device"):
        select_device("tpu-please")


def test_xla_without_torch_xla_is_a_clear_error():
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch_xla is installed")
    with pytest.raises(B2txtError, match="torch_xla"):
        select_device("xla")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(B2txtError, match="CUDA"):
        select_device("cuda:0")
    with pytest.raises(B2txtError, match="CUDA"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


# ----------------------------------------------------------------------------- safe loading

def test_numpy_metric_in_checkpoint_loads_and_pickled_objects_are_refused(sim, tmp_path):
    out = tmp_path / "model"
    run_trainer(tcfg(num_training_batches=2, lr_decay_steps=2, lr_decay_steps_day=2), sim, out)
    state = best_state(out)
    ckpt = out / "checkpoint" / "best_checkpoint"
    torch.save({"model_state_dict": state, "val_PER": np.float64(0.1), "val_loss": np.float32(2.5),
                "step": np.int64(7)}, ckpt)
    raw = safe_load(ckpt)
    assert raw["val_PER"] == pytest.approx(0.1) and raw["step"] == 7
    loaded = load_model(out)
    assert loaded.checkpoint["val_PER"] == pytest.approx(0.1)
    assert_states_equal(loaded.model.state_dict(), state)

    torch.save({"model_state_dict": state, "val_PER": 0.1, "extra": Path("/somewhere")}, ckpt)
    with pytest.raises(B2txtError, match="cannot load checkpoint safely"):
        safe_load(ckpt)
    with pytest.raises(B2txtError, match="cannot load checkpoint safely"):
        load_model(out)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(B2txtError, match="cannot load checkpoint safely"):
        load_model(out)


@pytest.mark.parametrize("over_padding", [False, True], ids=["data-only", "over-padding"])
def test_batch_transforms_deferred_to_the_device_equal_the_ones_done_in_line(sim, tmp_path, over_padding):
    """On a GPU the trainer pads on the CPU and augments, cuts and smooths on the device
    (Trainer.device_transforms); run on the CPU, that deferred path gives the in-line batch exactly."""
    from b2txt.training.trainer import DeviceBatch

    cfg = tcfg(augment={"white_noise_std": 1.0, "constant_offset_std": 0.2, "random_walk_std": 0.1,
                        "static_gain_std": 0.05, "random_cut": 3, "noise_over_padding": over_padding},
               length_chunks=4)
    inline = Trainer(cfg, sim[0], sim[1], tmp_path / "a", log=lambda m: None)
    deferred = Trainer(cfg, sim[0], sim[1], tmp_path / "b", log=lambda m: None)
    deferred.transforms_on_device = True
    for step in range(4):
        parts_a, parts_b = inline.batch(step), deferred.batch(step)
        assert len(parts_a) == len(parts_b) == min(inline.parts, cfg.batch_size) == 4
        for a, b in zip(parts_a, parts_b):
            assert isinstance(b[0], DeviceBatch)
            assert torch.equal(a[0], deferred.device_transforms(b[0]))
            assert all(torch.equal(u, v) for u, v in zip(a[1:], b[1:]))
