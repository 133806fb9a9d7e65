"""Training of the phoneme decoders with CTC (REFERENCE §3).

``Trainer`` owns one training run. Every ``batches_per_checkpoint`` batches it writes a resume
checkpoint (model, optimizer, scheduler, every RNG and the batch sampler's state, metrics so
far) atomically into ``MODEL_DIR.partial/``; a killed run started again with the same config
and data continues from there and ends bit-identical to an uninterrupted run on CPU. When
training ends, the directory is completed (``args.yaml``, ``training_log``, ``metrics.csv`` with
step, training loss, learning rate, gradient norm, validation loss and PER overall and per
session as ``val_PER:<session>``) and renamed to ``MODEL_DIR`` (published layout, see :mod:`b2txt.models.checkpoint`), so a half-trained
model never appears where ``infer`` would read it.

Objectives. ``gru``: mean over trials of the CTC loss of the logits. ``triple``
(:class:`b2txt.models.decoders.TripleGRUDecoder`)::

    L = CTC(clean_logits) + adversarial_weight · CTC(noisy_logits)

where the noisy head reads the noise estimate through a gradient-reversal layer: the noisy
head descends the second term (it learns to read phonemes from the noise) while the noise
model receives its gradient times ``-grl_scale`` (it learns to leave no phoneme information
in the noise). Validation and checkpoint selection use the clean logits' greedy PER.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import yaml

from ..data.logits import greedy_decode
from ..data.store import DayBatchSampler, TrialStore, read_manifest, resolve_sessions, split_by_length
from ..evaluation.error_rates import edit_distance
from ..ground.config import TrainConfig
from ..ground.console import progress
from ..ground.device import select_device, use_bf16
from ..ground.errors import B2txtError
from ..ground.fileio import OWNER_MARK, OWNER_TEXT, atomic_file, swap_into_place
from ..ground.outputs import recorded_file, writing
from ..models.checkpoint import build_model, published_args, safe_load
from ..models.inference import run_model
from ..models.transforms import augment, cut_start, draw_cut, gaussian_kernel, pad_batch, smooth, trial_generator
from .averaging import WeightAverage
from .distributed import DistContext, close_group, context_from_env, init_group, launch, rendezvous


class TrainingInterrupted(Exception):
    """Raised by ``Trainer.run(stop_after=...)``: stops as a kill would, after a checkpoint."""


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Per-trial work on one thread: torch's intra-op threads wait on each other for every small
    op, and on a busy machine a batch then takes seconds instead of tens of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DeviceBatch:
    """A padded batch whose augmentation, cut and smoothing the accelerator does (:meth:`Trainer.device_transforms`)."""

    x: torch.Tensor
    lengths: torch.Tensor
    trials: list[int]
    step: int
    cut: int
    padded_to: int


class BatchPart(NamedTuple):
    """One part of a training batch (``length_chunks``; the whole batch by default): padded
    features (or a :class:`DeviceBatch`), day indices, concatenated labels and the lengths."""

    x: torch.Tensor | DeviceBatch
    day_idx: torch.Tensor
    targets: torch.Tensor
    tgt_len: torch.Tensor
    out_len: torch.Tensor


def cpu_copy(tree):
    """Tensors of a (nested) state dict on the CPU: a checkpoint written on XLA or CUDA then
    loads anywhere, also with a plain ``torch.load`` (no ``map_location``, no torch_xla)."""
    return torch.utils._pytree.tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, tree)


def lr_lambda(lr_max: float, lr_min: float, warmup: int, decay_steps: int, kind: str):
    """Multiplier of ``lr_max`` at a step: linear warm-up from 0, then cosine or linear to lr_min."""
    floor = lr_min / lr_max

    def f(step: int) -> float:
        if step < warmup:
            return step / warmup
        if step >= decay_steps:
            return floor
        frac = (step - warmup) / max(decay_steps - warmup, 1)
        if kind == "cosine":
            return max(floor, floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
        return 1 - (1 - floor) * frac

    return f


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW with the published groups, in the published order: biases (no decay), day layers
    (own learning rate, schedule and decay), everything else."""
    bias, day, other = [], [], []
    for name, p in model.named_parameters():
        if name.startswith(("day_weights.", "day_biases.")):
            day.append(p)
        elif name.endswith(".bias") or ".bias_" in name:
            bias.append(p)
        else:
            other.append(p)
    groups = [
        {"params": bias, "lr": cfg.lr_max, "weight_decay": 0.0, "group_type": "bias"},
        {"params": day, "lr": cfg.lr_max_day, "weight_decay": cfg.weight_decay_day, "group_type": "day_layer"},
        {"params": other, "lr": cfg.lr_max, "weight_decay": cfg.weight_decay, "group_type": "other"},
    ]
    if cfg.fused_adamw and next(model.parameters()).device.type not in ("cpu", "cuda"):
        raise B2txtError(f"train.fused_adamw: torch has no fused AdamW on {next(model.parameters()).device.type}")
    # fused: one kernel for all parameters (the published choice); else torch's default
    # (foreach on CUDA, a loop on the CPU); the same update up to rounding
    opt = torch.optim.AdamW(groups, betas=(cfg.beta0, cfg.beta1), eps=cfg.epsilon,
                            fused=True if cfg.fused_adamw else None)
    main = lr_lambda(cfg.lr_max, cfg.lr_min, cfg.lr_warmup_steps, cfg.lr_decay_steps, cfg.lr_scheduler_type)
    day_f = lr_lambda(cfg.lr_max_day, cfg.lr_min_day, cfg.lr_warmup_steps_day, cfg.lr_decay_steps_day,
                      cfg.lr_scheduler_type)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [main, day_f, main])


@dataclass
class ValResult:
    loss: float
    per: float
    per_session: dict[str, float] = field(default_factory=dict)


def validation_pass(model: torch.nn.Module, store: TrialStore, kernel: torch.Tensor | None, device: torch.device,
                    batch_size: int = 32, pad_multiple: int = 64) -> ValResult:
    """Greedy-CTC phoneme error rate (total edits / total reference length) and mean CTC loss."""
    logits = run_model(model, store.features, store.day_idx, kernel, device, batch_size, pad_multiple=pad_multiple)
    ctc = torch.nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)
    edits = np.zeros(len(store.sessions))
    lengths = np.zeros(len(store.sessions))
    loss_sum = 0.0
    for lg, lab, day in zip(logits, store.labels, store.day_idx):
        lp = torch.from_numpy(lg).log_softmax(-1)[:, None, :]
        loss_sum += float(ctc(lp, torch.from_numpy(lab)[None], torch.tensor([lg.shape[0]]), torch.tensor([len(lab)])))
        edits[day] += edit_distance(greedy_decode(lg), lab.tolist())
        lengths[day] += len(lab)
    per_session = {store.sessions[d]: float(edits[d] / lengths[d]) for d in range(len(store.sessions)) if lengths[d]}
    total = lengths.sum()
    return ValResult(loss_sum / max(len(logits), 1), float(edits.sum() / total) if total else float("nan"), per_session)


def _too_short_for_ctc(store: TrialStore, cfg: TrainConfig) -> list[str]:
    """Trials with fewer model outputs than labels: CTC cannot align them (no loss)."""
    notes = []
    for i, (f, lab) in enumerate(zip(store.features, store.labels)):
        n_out = (f.shape[0] - cfg.augment.random_cut - cfg.model.patch_size) // cfg.model.patch_stride + 1
        if n_out < len(lab):
            row = store.rows.iloc[i]
            notes.append(f"{row['session']} {row['trial']}: {n_out} outputs for {len(lab)} labels")
    return notes


def new_stats() -> dict:
    """Counters of where training time goes: waiting for batches vs forward/backward/step."""
    return {"data_s": 0.0, "compute_s": 0.0, "steps": 0, "padding": 0.0, "built": 0}


def partial_dir(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".partial")


class Trainer:
    """One training run: data in memory, model, optimizer, schedules, sampler, checkpoints."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
                 log=print, dist: DistContext = DistContext()):
        self.cfg, self.dist = cfg, dist
        self.log = log if dist.is_main else (lambda msg: None)
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.work = partial_dir(self.out_dir)
        if cfg.batch_size % dist.world_size:
            raise B2txtError(f"train.batch_size {cfg.batch_size} does not split evenly over {dist.world_size} processes")
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif dist.local_world_size > 1:  # the ranks of one node share its cores
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // dist.local_world_size))
        self.device = select_device(cfg.device)
        if dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(self.device)
        self.bf16 = use_bf16(cfg.amp, self.device)

        manifest = read_manifest(manifest_path)
        all_sessions = sorted(manifest["session"].unique())
        held_out = resolve_sessions(all_sessions, list(cfg.holdout_sessions), "train.holdout_sessions")
        self.sessions = [s for s in all_sessions if s not in held_out]
        if not self.sessions:
            raise B2txtError("train.holdout_sessions leaves no session to train on")
        manifest = manifest[~manifest["session"].isin(held_out)]
        self.train_store = self._load(manifest, "train")
        self.val_store = self._load(manifest, "val")
        if len(self.train_store) == 0:
            raise B2txtError(f"{manifest_path}: no training trials")
        short = _too_short_for_ctc(self.train_store, cfg)
        if short:
            log(f"warning: {len(short)} training trial(s) are too short for CTC and add no loss, e.g. {short[0]}")

        neural_dim = len(cfg.feature_subset) if cfg.feature_subset else 512
        self.model = build_model(cfg.model, len(self.sessions), neural_dim).to(self.device)
        # the module that trains: under data parallelism it averages the gradients of all ranks
        self.net: torch.nn.Module = self.model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if not dist.is_main:  # dropout masks of their own; rank 0's stream is a single process's
                torch.manual_seed(cfg.seed + 7919 * dist.rank)
        self.opt, self.sched = build_optimizer(self.model, cfg)
        # checkpoint averaging: validated and saved instead of the raw weights (training/averaging.py)
        self.ema = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay else None
        # zero_infinity: a trial too short for its labels adds nothing (published: inf, whose
        # NaN gradient the published clip turns into an error)
        self.ctc = torch.nn.CTCLoss(blank=0, reduction="none", zero_infinity=cfg.ctc_zero_infinity)
        a = cfg.augment
        self.kernel = gaussian_kernel(a.smooth_kernel_std, a.smooth_kernel_size) if a.smooth_data else None
        # A GPU augments and smooths its batches itself (noise from its own generators, seeded per
        # trial as on the CPU): the CPU thread that feeds it only samples and pads.
        self.transforms_on_device = self.device.type == "cuda"
        self.lengths = np.array([f.shape[0] for f in self.train_store.features])  # bins per training trial
        self.packed = self.device.type == "cpu" if cfg.packed == "auto" else cfg.packed
        cpu_unpacked = self.device.type == "cpu" and not self.packed
        self.parts = cfg.length_chunks if cfg.length_chunks != "auto" else 4 if cpu_unpacked else 1
        self.sampler = DayBatchSampler(self.train_store, cfg.batch_size, cfg.days_per_batch, cfg.seed,
                                       cfg.must_include_days, self.lengths if cfg.length_bucketing else None,
                                       mix=cfg.bucket_mix, width=cfg.bucket_width, draw=cfg.trial_draw)
        self.fingerprint = self._fingerprint(manifest_path)
        # progress of the run (saved in resume checkpoints)
        self.step = 0
        self.best: ValResult | None = None
        self.best_step = -1
        self.stale = 0
        self.metrics: list[dict] = []
        self.log_lines: list[str] = []
        self.running: list[float] = []
        # batch assembly vs forward/backward/step time and padding, for the log and benchmarks
        self.stats = new_stats()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, dict] | None = None

    # ------------------------------------------------------------------ setup helpers
    def _load(self, manifest: pd.DataFrame, split: str) -> TrialStore:
        store = TrialStore.load(self.data_dir, manifest, split, self.sessions)
        if self.cfg.feature_subset:
            subset = list(self.cfg.feature_subset)
            if max(subset) >= 512 or min(subset) < 0:
                raise B2txtError("train.feature_subset: indices must be within 0..511")
            store.features = [f[:, subset] for f in store.features]
        return store

    def _fingerprint(self, manifest_path: str | Path) -> str:
        """What a resume checkpoint must match: the config (bar run-time knobs) and the data."""
        cfg = self.cfg.model_dump(mode="json")
        for key in ("threads", "device", "batches_per_checkpoint"):
            cfg.pop(key)
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        h.update(Path(manifest_path).read_bytes())
        return h.hexdigest()[:16]

    def gru_mode(self) -> str:
        """How the GRUs meet a batch, for the log: packed, or padded in how many parts."""
        if self.packed:
            return "GRUs on the real steps (packed)" + (f", {self.parts} length parts" if self.parts > 1 else "")
        return "padded batches" + (f" in {self.parts} length parts" if self.parts > 1 else "")

    def note(self, msg: str) -> None:
        self.log_lines.append(msg)
        self.log(msg)

    # ------------------------------------------------------------------ one batch
    def batch(self, step: int) -> list[BatchPart]:
        """Sample, pad, augment, cut and smooth this rank's share of batch ``step`` (on the CPU),
        in ``length_chunks`` parts by trial length.

        Every rank draws the same global batch; the cut is decided on the global batch and the
        noise per trial (over the global batch's padded length), so neither the shares nor the
        parts change what a trial is trained on."""
        with one_torch_thread():
            return self._batch(step)

    def _batch(self, step: int) -> list[BatchPart]:
        cfg = self.cfg
        everything = self.sampler.next_batch()
        shortest = int(self.lengths[everything].min())
        longest = int(self.lengths[everything].max())  # the global batch's padded length
        cut = draw_cut(cfg.augment.random_cut, trial_generator(cfg.seed, step), shortest)
        idx = self.dist.shard(everything)
        groups = split_by_length(idx, self.lengths, self.parts)
        # the padding the GRUs compute (none when packed)
        padded = sum(len(g) * int(self.lengths[g].max()) for g in groups) if not self.packed else self.lengths[idx].sum()
        self.stats["padding"] += 1 - float(self.lengths[idx].sum()) / padded
        self.stats["built"] += 1
        return [self._part(g, step, cut, longest) for g in groups]

    def _part(self, idx: np.ndarray, step: int, cut: int, longest: int) -> BatchPart:
        store, cfg = self.train_store, self.cfg
        x, lengths = pad_batch([store.features[i] for i in idx])
        if self.transforms_on_device:  # done by loss(), on the device
            x = DeviceBatch(x, lengths, [int(i) for i in idx], step, cut, longest)
            lengths = lengths - cut
        else:
            x = augment(x, lengths, cfg.augment, [trial_generator(cfg.seed, step, int(i)) for i in idx], longest)
            x, lengths = cut_start(x, lengths, cut)
            if self.kernel is not None:
                x = smooth(x, self.kernel)
        if self.device.type == "xla":  # a few static lengths keep XLA from recompiling
            m = cfg.xla_pad_multiple
            x = torch.nn.functional.pad(x, (0, 0, 0, -x.shape[1] % m))
        labels = [store.labels[i] for i in idx]
        targets = torch.from_numpy(np.concatenate(labels))
        tgt_len = torch.tensor([len(lab) for lab in labels])
        day_idx = torch.as_tensor(store.day_idx[idx])
        out_len = self.model.output_lengths(lengths).clamp(min=1)
        return BatchPart(x, day_idx, targets, tgt_len, out_len)

    def device_transforms(self, b: DeviceBatch) -> torch.Tensor:
        """Augment, cut and smooth a padded batch on the device, as :meth:`batch` does on the CPU."""
        x = b.x.to(self.device, non_blocking=True)
        gens = [trial_generator(self.cfg.seed, b.step, i, self.device) for i in b.trials]
        x = augment(x, b.lengths, self.cfg.augment, gens, b.padded_to)
        x, _ = cut_start(x, b.lengths, b.cut)
        return smooth(x, self.kernel) if self.kernel is not None else x

    def loss(self, part: BatchPart, n_trials: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The part's share of the batch loss: its trials' summed loss over the ``n_trials`` of
        the (rank's) batch, so the parts add up to the batch mean."""
        dev = self.device
        x, day_idx, targets, tgt_len, out_len = part
        if isinstance(x, DeviceBatch):
            x = self.device_transforms(x)
        x, day_idx = x.to(dev, non_blocking=True), day_idx.to(dev, non_blocking=True)
        targets, tgt_len, out_len = targets.to(dev), tgt_len.to(dev), out_len.to(dev)

        def ctc(logits):
            lp = logits.float().log_softmax(-1).transpose(0, 1)
            return self.ctc(lp, targets, out_len, tgt_len).sum() / n_trials

        packed = {"lengths": out_len} if self.packed else {}
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.cfg.model.architecture == "triple":
                clean, noisy = self.net(x, day_idx, mode="heads", **packed)
            else:
                clean, noisy = self.net(x, day_idx, **packed), None
        clean_loss = ctc(clean)
        if noisy is None:
            return clean_loss, {}
        noisy_loss = ctc(noisy)
        return clean_loss + self.cfg.adversarial_weight * noisy_loss, {"clean_loss": clean_loss, "noisy_loss": noisy_loss}

    # On an accelerator the next batch is assembled in a worker thread while the current one
    # trains (torch releases the GIL), hiding sampling, augmentation and smoothing behind the
    # forward/backward pass. On the CPU both would share the same cores (measured: 1.6x slower
    # steps), so batches are built in line there. The random-generator states from before a
    # pending batch is kept, so resume checkpoints stay exact either way (the noise depends on
    # the step alone).
    def _data_rng_state(self) -> dict:
        return {"sampler_rng": json.dumps(self.sampler.rng.bit_generator.state)}

    def _prefetch(self, step: int) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="b2txt-batch")
        self._pending = (self._pool.submit(self.batch, step), self._data_rng_state())

    def _next_batch(self):
        if self.device.type == "cpu":
            return self.batch(self.step)
        if self._pending is None:
            self._prefetch(self.step)
        batch = self._pending[0].result()
        self._pending = None
        if self.step + 1 < self.cfg.num_training_batches:
            self._prefetch(self.step + 1)
        return batch

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending = None, None

    def train_step(self) -> float:
        self.net.train()
        t0 = time.perf_counter()
        parts = self._next_batch()
        t1 = time.perf_counter()
        n_trials = sum(len(p.tgt_len) for p in parts)
        self.opt.zero_grad(set_to_none=True)
        loss, terms = self._accumulate(parts, n_trials)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_norm_clip_value)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if self.device.type == "xla":
            import torch_xla.core.xla_model as xm
            xm.mark_step()
        self.step += 1
        value = self.dist.mean(loss.item())  # waits for the device, so the compute time below is real
        self.stats["data_s"] += t1 - t0
        self.stats["compute_s"] += time.perf_counter() - t1
        self.stats["steps"] += 1
        self.running.append(value)
        self._last = {"grad_norm": float(grad_norm), **{k: v.item() for k, v in terms.items()}}
        return value

    def _accumulate(self, parts: list[BatchPart], n_trials: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward each part, summing gradients (data-parallel ranks synchronise
        after the last part only); the batch loss and its terms."""
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.net, "no_sync") else self.net.no_sync()
            with sync:
                loss, extra = self.loss(part, n_trials)
                loss.backward()
            if self.device.type == "xla" and not last:  # one graph per part: its shapes alone key the compile cache
                import torch_xla.core.xla_model as xm
                xm.mark_step()
            total = loss.detach() if total is None else total + loss.detach()
            for k, v in extra.items():
                terms[k] = v.detach() if k not in terms else terms[k] + v.detach()
        assert total is not None
        return total, terms

    # ------------------------------------------------------------------ checkpoints
    def _save_best(self, val: ValResult) -> None:
        """Rank 0 only (it alone validates)."""
        with atomic_file(self.work / "checkpoint" / "best_checkpoint") as tmp, recorded_file(tmp) as fh:
            torch.save({
                "model_state_dict": cpu_copy(self.model.state_dict()),
                "optimizer_state_dict": cpu_copy(self.opt.state_dict()),
                "scheduler_state_dict": self.sched.state_dict(),
                "val_PER": val.per, "val_loss": val.loss, "step": self.step,
                "b2txt": {"sessions": self.sessions, "train": self.cfg.model_dump(mode="json")},
            }, fh)

    def _save_resume(self) -> None:
        """Called on every rank (their random states are gathered); rank 0 writes."""
        torch_rngs = self.dist.gather(torch.get_rng_state())
        cuda_rngs = self.dist.gather(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        if not self.dist.is_main:
            return
        state = {
            "fingerprint": self.fingerprint, "step": self.step,
            "model_state_dict": cpu_copy(self.model.state_dict()),
            "optimizer_state_dict": cpu_copy(self.opt.state_dict()),
            "scheduler_state_dict": self.sched.state_dict(),
            "torch_rng": torch_rngs, "cuda_rng": cuda_rngs,  # one per rank
            # the data generators as they were before the batch now being prefetched
            **(self._pending[1] if self._pending is not None else self._data_rng_state()),
            "best": None if self.best is None else [self.best.loss, self.best.per, self.best.per_session],
            "best_step": self.best_step, "stale": self.stale, "running": list(self.running),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "metrics": json.dumps(self.metrics), "log_lines": list(self.log_lines),
        }
        with atomic_file(self.work / "checkpoint" / "last_checkpoint") as tmp, recorded_file(tmp) as fh:
            torch.save(state, fh)
        self._write_metrics(self.work)

    def _try_resume(self) -> bool:
        path = self.work / "checkpoint" / "last_checkpoint"
        if not path.is_file():
            return False
        afresh = f"delete {self.work} (rm -r '{self.work}') and run the same command again to start afresh"
        try:
            state = safe_load(path)
        except B2txtError as exc:  # truncated by a full disk or a copy, or not ours
            raise B2txtError(f"{path}: the resume checkpoint is unreadable ({str(exc).removeprefix(f'{path}: ')}); "
                             f"{afresh}") from None
        if not isinstance(state, dict):
            raise B2txtError(f"{path}: not a resume checkpoint (a {type(state).__name__}); {afresh}")
        if state.get("fingerprint") != self.fingerprint:
            self.log(f"{self.work}: left by a run with another config or data; starting afresh")
            return False
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise B2txtError(f"{path}: the resume checkpoint is incomplete or damaged ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); {afresh}") from None
        return True

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model_state_dict"])
        self.opt.load_state_dict(state["optimizer_state_dict"])
        self.sched.load_state_dict(state["scheduler_state_dict"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        # the dropout streams: each rank's own when the run had as many ranks, else derived
        rank = self.dist.rank
        if rank < len(state["torch_rng"]):
            torch.set_rng_state(state["torch_rng"][rank])
        else:
            torch.manual_seed(self.cfg.seed + 7919 * rank + self.step)
        if rank < len(state["cuda_rng"]) and state["cuda_rng"][rank]:
            torch.cuda.set_rng_state_all(state["cuda_rng"][rank])
        self.sampler.rng.bit_generator.state = json.loads(state["sampler_rng"])
        self.step, self.best_step, self.stale = state["step"], state["best_step"], state["stale"]
        self.best = None if state["best"] is None else ValResult(*state["best"])
        self.running = list(state["running"])
        self.metrics = json.loads(state["metrics"])
        self.log_lines = list(state["log_lines"])

    def _write_metrics(self, directory: Path) -> None:
        with atomic_file(directory / "metrics.csv") as tmp:
            pd.DataFrame(self.metrics).to_csv(tmp, index=False)

    # ------------------------------------------------------------------ the loop
    def validate(self) -> ValResult:
        if len(self.val_store) == 0:
            return ValResult(float("nan"), float("nan"))
        # On XLA, torch_xla's GRU replays the graph it recorded for a batch size whether or not
        # autocast is on; validating in the training precision keeps the two from mixing.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and self.device.type == "xla"):
            return validation_pass(self.model, self.val_store, self.kernel, self.device,
                                   pad_multiple=self.cfg.xla_pad_multiple)

    def _log_step(self, t0: float) -> None:
        row = {"step": self.step, "train_loss": float(np.mean(self.running)), "lr": self.sched.get_last_lr()[0],
               **self._last, "val_loss": float("nan"), "val_PER": float("nan"), "seconds": time.time() - t0}
        self.metrics.append(row)
        self.running = []
        extra = "".join(f", {k} {v:.4f}" for k, v in self._last.items() if k.endswith("_loss"))
        self.note(f"step {self.step}: train loss {row['train_loss']:.4f}{extra}, grad norm {row['grad_norm']:.2f}, "
                  f"lr {row['lr']:.2e}")

    def _val_step(self, t0: float) -> bool:
        """Validate on rank 0, which keeps the best checkpoint; True (on every rank) when early
        stopping triggers. The other ranks wait for rank 0's decision."""
        stop = self.dist.is_main and self._validate_and_keep_best(t0)
        return self.dist.broadcast_flag(stop)

    def _validate_and_keep_best(self, t0: float) -> bool:
        with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
            return self._validate_and_keep_best_of_model(t0)

    def _validate_and_keep_best_of_model(self, t0: float) -> bool:
        """Validate the model's weights (the average's, with ``train.ema_decay``) and keep the best."""
        val = self.validate()
        if not self.metrics or self.metrics[-1]["step"] != self.step:
            self.metrics.append({"step": self.step, "lr": self.sched.get_last_lr()[0], "seconds": time.time() - t0})
        self.metrics[-1].update(val_loss=val.loss, val_PER=val.per,
                                **{f"val_PER:{name}": per for name, per in val.per_session.items()})
        self.note(f"step {self.step}: val loss {val.loss:.4f}, val PER {val.per:.4f}")
        if self.best is None or not (val.per >= self.best.per):  # NaN PER (no val data): keep the latest
            self.best, self.best_step, self.stale = val, self.step, 0
            self._save_best(val)
        else:
            self.stale += 1
        limit = self.cfg.early_stopping_val_steps
        if limit and self.stale >= limit:
            self.note(f"early stopping at step {self.step}: no improvement for {self.stale} validations")
            return True
        return False

    def run(self, stop_after: int | None = None) -> ValResult | None:
        """Train to the end (or early stop) and publish the model directory. Returns the best
        validation result (on rank 0; None on the other ranks)."""
        cfg, ddp = self.cfg, self.dist
        resumed = self._try_resume()
        ddp.barrier()  # every rank has read the resume checkpoint before rank 0 may clear it
        if resumed:
            self.note(f"resuming from step {self.step} ({self.work})")
        elif ddp.is_main:
            shutil.rmtree(self.work, ignore_errors=True)  # anything left there is stale
            (self.work / "checkpoint").mkdir(parents=True)
            n_params = sum(p.numel() for p in self.model.parameters())
            self.note(f"{cfg.model.architecture} model, {n_params / 1e6:.2f} M parameters, device {self.device}, "
                      f"bf16 {self.bf16}, {self.gru_mode()}, {len(self.sessions)} sessions, {len(self.train_store)} train / "
                      f"{len(self.val_store)} val trials"
                      + (f", {ddp.world_size} processes of {cfg.batch_size // ddp.world_size} trials" if ddp.enabled else ""))
        ddp.barrier()
        t0 = time.time() - (self.metrics[-1]["seconds"] if self.metrics else 0.0)
        bar = progress(desc="train", total=cfg.num_training_batches, unit="batch")
        bar.update(self.step)
        stopped = False
        try:
            while self.step < cfg.num_training_batches and not stopped:
                self.train_step()
                bar.update()
                last = self.step == cfg.num_training_batches
                if (self.step % cfg.batches_per_train_log == 0 or last) and ddp.is_main:
                    self._log_step(t0)
                if self.step % cfg.batches_per_val_step == 0 or last:
                    stopped = self._val_step(t0)
                if self.step % cfg.batches_per_checkpoint == 0 and not (last or stopped):
                    self._save_resume()
                    if stop_after is not None and self.step >= stop_after:
                        raise TrainingInterrupted(f"stopped after step {self.step}")
        finally:
            bar.close()
            self.close()
        if not ddp.is_main:
            ddp.barrier()  # until rank 0 has published
            return None
        if self.best is None:  # resumed exactly at the end of a run without validation
            self._validate_and_keep_best(t0)
        self.note(f"best val PER {self.best.per:.4f} at step {self.best_step}")
        if self.stats["steps"]:
            st = self.stats
            self.note(f"time waiting for batches {100 * st['data_s'] / (st['data_s'] + st['compute_s']):.1f} %, "
                      f"padding {100 * st['padding'] / max(st['built'], 1):.1f} % of batch bins, "
                      f"{st['steps'] / (st['data_s'] + st['compute_s']):.2f} batches/s "
                      + ("(batches built during the previous step)" if self.device.type != "cpu" else ""))
        self._publish()
        ddp.barrier()
        return self.best

    def _publish(self) -> None:
        args = published_args(self.cfg, self.sessions, str(self.data_dir), str(self.out_dir))
        (self.work / "checkpoint" / "args.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
        self._write_metrics(self.work)
        (self.work / "training_log").write_text("\n".join(self.log_lines) + "\n")
        resume = self.work / "checkpoint" / "last_checkpoint"
        if resume.exists():
            resume.unlink()
        (self.work / OWNER_MARK).write_text(OWNER_TEXT)
        swap_into_place(self.work, self.out_dir)  # whole: the old model or the new one, never neither


def train(cfg: TrainConfig, data_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
          log=print, nproc: int = 1) -> ValResult:
    """Train (resuming a killed run when possible); returns the best validation result.

    ``nproc > 1`` spawns that many data-parallel processes here; under a launcher (torchrun,
    srun with several tasks) this process joins the launcher's group instead (see
    :mod:`b2txt.training.distributed`). A full disk is one error naming ``out_dir``.
    """
    with writing(out_dir):
        return _train(cfg, data_dir, manifest_path, out_dir, log, nproc)


def _train(cfg: TrainConfig, data_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
           log=print, nproc: int = 1) -> ValResult:
    ctx = context_from_env()
    if ctx.enabled and nproc > 1:
        raise B2txtError(f"--nproc {nproc} inside a launcher that already started {ctx.world_size} processes; "
                         "use one or the other")
    if nproc > 1:
        if cfg.batch_size % nproc:
            raise B2txtError(f"train.batch_size {cfg.batch_size} does not split evenly over --nproc {nproc}")
        launch(nproc, _train_rank, cfg, str(data_dir), str(manifest_path), str(out_dir), log)
        best = safe_load(Path(out_dir) / "checkpoint" / "best_checkpoint")
        return ValResult(best["val_loss"], best["val_PER"])
    if not ctx.enabled:
        return Trainer(cfg, data_dir, manifest_path, out_dir, log).run()
    _train_rank(ctx, *rendezvous(), cfg, data_dir, manifest_path, out_dir, log)
    best = safe_load(Path(out_dir) / "checkpoint" / "best_checkpoint") if ctx.is_main else None
    return ValResult(best["val_loss"], best["val_PER"]) if best else ValResult(float("nan"), float("nan"))


def _train_rank(ctx: DistContext, addr: str, port: int, cfg: TrainConfig, data_dir: str | Path,
                manifest_path: str | Path, out_dir: str | Path, log=print) -> None:
    """One data-parallel process: join the group, train, leave."""
    if not ctx.is_main:
        os.environ["B2TXT_PROGRESS"] = "0"
    init_group(ctx, select_device(cfg.device), addr, port)
    try:
        Trainer(cfg, data_dir, manifest_path, out_dir, log, dist=ctx).run()
    finally:
        close_group()
