"""Data-parallel training: N processes with B/N trials each train the model one process trains
with B (both architectures, through ``--nproc`` and through torchrun), a run of 2 processes
killed with SIGKILL resumes, every parameter gets a gradient every step, the noise of a trial
does not depend on its batch, and the launcher environments are read as documented.

Dropout is off in the equivalence tests: its masks come from each process's own stream.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.processes import free_port, wait_for

from b2txt.ground.config import AugmentConfig, TrainConfig, merge
from b2txt.ground.errors import B2txtError
from b2txt.models.checkpoint import build_model, safe_load
from b2txt.models.transforms import augment, pad_batch, trial_generator
from b2txt.training.distributed import DistContext, context_from_env
from b2txt.training.trainer import Trainer, partial_dir, train

pytestmark = pytest.mark.ddp

NO_DROPOUT = {"rnn_dropout": 0.0, "input_dropout": 0.0}
GRU = {"n_units": 16, "n_layers": 2, **NO_DROPOUT}
TRIPLE = {"architecture": "triple", "n_units": 16, "n_layers": 1, "noise_units": 8, "noise_layers": 1,
          "noisy_units": 8, "noisy_layers": 1, **NO_DROPOUT}

BASE = {
    "seed": 3, "model": GRU, "num_training_batches": 6, "batch_size": 6, "days_per_batch": 2,
    "lr_warmup_steps": 2, "lr_decay_steps": 6, "lr_warmup_steps_day": 2, "lr_decay_steps_day": 6,
    "batches_per_train_log": 2, "batches_per_val_step": 6, "batches_per_checkpoint": 3, "threads": 1,
    "holdout_sessions": [],
}


def cfg_of(**overrides) -> dict:
    return merge(BASE, overrides)


def cli(config: dict, sim, out: Path, *extra: str, launcher: list[str] | None = None, **kw):
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({"train": config}))
    cmd = (launcher or [sys.executable, "-m"]) + ["b2txt", "train", "--config", str(path), "--data", str(sim[0]),
                                                  "--manifest", str(sim[1]), "--out", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["B2TXT_PROGRESS"] = "0"
    return cmd, env


def run_cli(config: dict, sim, out: Path, *extra: str, launcher: list[str] | None = None) -> str:
    cmd, env = cli(config, sim, out, *extra, launcher=launcher)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stderr


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return safe_load(out / "checkpoint" / "best_checkpoint")["model_state_dict"]


def assert_close_states(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
    assert worst > 0 or all(torch.equal(a[k], b[k]) for k in a)


def assert_trained(config: dict, state: dict) -> None:
    """Most parameters moved away from their initial values (the comparison is not vacuous)."""
    torch.manual_seed(config["seed"])  # as the trainer seeds before building the model
    init = build_model(TrainConfig.model_validate(config).model, 3, 512)
    moved = [k for k, v in init.state_dict().items() if not torch.allclose(v, state[k])]
    assert len(moved) > len(state) // 2, moved


@pytest.fixture(scope="module")
def sim(small_sim):
    return small_sim


@pytest.mark.parametrize("model,parts", [(GRU, 1), (TRIPLE, 1), (GRU, 2)], ids=["gru", "triple", "gru-padded-in-parts"])
def test_two_processes_with_half_batches_equal_one_process(sim, tmp_path, model, parts):
    """Packed (the CPU default), and each rank's share padded in length parts (length_chunks):
    the ranks synchronise their gradients once, after the last part."""
    config = cfg_of(model=model, length_chunks=parts, packed=parts == 1)
    one = tmp_path / "one"
    train(TrainConfig.model_validate(config), sim[0], sim[1], one, log=lambda m: None)
    two = tmp_path / "two"
    log = run_cli(config, sim, two, "--nproc", "2")
    assert "2 processes of 3 trials" in log, log[-2000:]
    assert_close_states(final_state(one), final_state(two))
    assert_trained(config, final_state(two))
    # the logged (all-rank mean) training loss is the single process's
    import pandas as pd
    a, b = (pd.read_csv(p / "metrics.csv") for p in (one, two))
    assert list(a["step"]) == list(b["step"])
    assert a["train_loss"].dropna().to_numpy() == pytest.approx(b["train_loss"].dropna().to_numpy(), rel=1e-4)
    # rank 0 alone wrote the model directory: one log, one metrics file, nothing left over
    assert (two / "checkpoint" / "args.yaml").is_file() and not partial_dir(two).exists()
    assert (two / "training_log").read_text().count("best val PER") == 1


def test_torchrun_launch_equals_one_process(sim, tmp_path):
    config = cfg_of(days_per_batch=1)  # each step trains one session's day layer; the others still get gradients
    one = tmp_path / "one"
    train(TrainConfig.model_validate(config), sim[0], sim[1], one, log=lambda m: None)
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m"]
    run_cli(config, sim, two, launcher=launcher)
    assert_close_states(final_state(one), final_state(two))


def test_killed_two_process_run_resumes_and_ends_like_one_process(sim, tmp_path):
    config = cfg_of(num_training_batches=60, lr_decay_steps=60, lr_decay_steps_day=60, batches_per_val_step=30,
                    batches_per_train_log=10, batches_per_checkpoint=5)
    out = tmp_path / "model"
    cmd, env = cli(config, sim, out, "--nproc", "2")
    last = partial_dir(out) / "checkpoint" / "last_checkpoint"
    with open(tmp_path / "first.log", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        try:
            wait_for(last.exists, "a resume checkpoint", 180, proc, tmp_path / "first.log")
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
            assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert not out.exists()
    log = run_cli(config, sim, out, "--nproc", "2")
    resumed = re.search(r"resuming from step (\d+)", log)
    assert resumed and 5 <= int(resumed[1]) < 60 and int(resumed[1]) % 5 == 0, log[-3000:]
    one = tmp_path / "one"
    train(TrainConfig.model_validate(config), sim[0], sim[1], one, log=lambda m: None)
    assert_close_states(final_state(one), final_state(out))


def test_the_shares_of_a_batch_add_up_to_the_whole_batch(sim, tmp_path):
    """What each rank trains on: its contiguous share of the global batch, cut and augmented
    exactly as the single process cuts and augments those trials."""
    trainer = Trainer(TrainConfig.model_validate(cfg_of(batch_size=6, length_chunks=1)), sim[0], sim[1], tmp_path / "m",
                      log=lambda m: None)
    state = trainer.sampler.rng.bit_generator.state
    for step in range(4):
        trainer.sampler.rng.bit_generator.state = state
        [(x, day, targets, tgt_len, out_len)] = trainer.batch(step)
        shares = []
        for rank in range(2):
            trainer.dist = DistContext(rank, 2)  # batch() only shards; no process group is needed
            trainer.sampler.rng.bit_generator.state = state
            [share] = trainer.batch(step)
            shares.append(share)
        trainer.dist = DistContext()
        state = trainer.sampler.rng.bit_generator.state
        assert [len(s[1]) for s in shares] == [3, 3]
        torch.testing.assert_close(torch.cat([s[1] for s in shares]), day)
        torch.testing.assert_close(torch.cat([s[2] for s in shares]), targets)
        torch.testing.assert_close(torch.cat([s[4] for s in shares]), out_len)
        for j, share in enumerate(shares):
            t = share[0].shape[1]
            torch.testing.assert_close(share[0], x[3 * j: 3 * j + 3, :t])


def test_every_parameter_gets_a_gradient_from_a_one_session_batch():
    for model_cfg in (GRU, TRIPLE):
        cfg = TrainConfig.model_validate(cfg_of(model=model_cfg)).model
        model = build_model(cfg, 3, 512)
        x = torch.randn(2, 40, 512)
        day = torch.tensor([1, 1])
        out = model(x, day, mode="full") if model_cfg is TRIPLE else model(x, day)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,)) if o is not None).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing
        # the other sessions' day layers get exact zeros
        assert float(model.day_weights[0].grad.abs().sum()) == 0.0
        assert float(model.day_weights[1].grad.abs().sum()) > 0.0


def test_a_trials_noise_does_not_depend_on_its_batch():
    cfg = AugmentConfig(white_noise_std=1.0, constant_offset_std=0.5, random_walk_std=0.1, static_gain_std=0.05)
    feats = [torch.randn(n, 512).numpy() for n in (30, 50, 40)]
    x, lengths = pad_batch(feats)
    gens = lambda ids: [trial_generator(7, 11, i) for i in ids]  # noqa: E731
    whole = augment(x, lengths, cfg, gens([0, 1, 2]))
    part, part_len = pad_batch(feats[1:2])
    alone = augment(part, part_len, cfg, gens([1]))
    torch.testing.assert_close(whole[1, :50], alone[0, :50])
    assert float(whole[0, 30:].abs().sum()) == 0.0  # padding stays zero
    other_step = augment(part, part_len, cfg, [trial_generator(7, 12, 1)])
    assert not torch.allclose(other_step, alone)


def test_uneven_split_and_bad_nproc_are_clear_errors(sim, tmp_path):
    out = tmp_path / "model"
    cmd, env = cli(cfg_of(batch_size=5), sim, out, "--nproc", "2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "batch_size 5 does not split evenly over --nproc 2" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists() and not partial_dir(out).exists()
    cmd, env = cli(cfg_of(), sim, out, "--nproc", "0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "argument --nproc: 0: must be at least 1" in r.stderr
    cmd, env = cli(cfg_of(), sim, out, "--nproc", "2")
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "inside a launcher" in r.stderr and "Traceback" not in r.stderr


def test_a_failing_rank_fails_the_run_with_one_error(sim, tmp_path):
    cmd, env = cli(cfg_of(holdout_sessions=[0, 1, 2]), sim, tmp_path / "model", "--nproc", "2")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode != 0, r.stderr[-2000:]
    assert re.search(r"training process \d of 2 failed: train.holdout_sessions leaves no session", r.stderr), \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "model").exists() and not partial_dir(tmp_path / "model").exists()


def test_launcher_environments():
    assert context_from_env({}) == DistContext()
    assert context_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}) == \
        DistContext(2, 4, 0, 2)
    srun = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "1"}
    assert context_from_env(srun) == DistContext(1, 2, 1, 2)
    # a batch script's own environment (no multi-task srun step) is one process
    assert context_from_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == DistContext()
    with pytest.raises(B2txtError, match="RANK"):
        context_from_env({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(B2txtError, match="inconsistent"):
        context_from_env({"WORLD_SIZE": "2", "RANK": "5"})
    assert DistContext(1, 3).shard(list(range(9))) == [3, 4, 5]
