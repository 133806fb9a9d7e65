"""Training of the GRU phoneme decoder with CTC (REFERENCE §3).

Output layout (the published one, so published tools read our models and vice versa)::

    MODEL_DIR/checkpoint/best_checkpoint   torch.save dict: model_state_dict, optimizer_state_dict,
                                           scheduler_state_dict, val_PER, val_loss, step,
                                           b2txt (our config + session list, nanoGPT-style)
    MODEL_DIR/checkpoint/args.yaml         the published args layout (model, dataset, …)
    MODEL_DIR/training_log                 human-readable log
    MODEL_DIR/metrics.csv                  step, train loss, lr, val loss, val PER, seconds

The model directory appears only when training finished (written to a temporary sibling and
renamed), so a killed run never leaves a half model for ``infer`` to read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from .config import TrainConfig
from .data.store import DayBatchSampler, TrialStore, read_manifest
from .errors import B2txtError
from .evaluate import edit_distance
from .fileio import atomic_dir, progress
from .infer import greedy_decode, run_model
from .models import GRUDecoder, GRUDecoderConfig
from .phonemes import N_CLASSES
from .transforms import augment, gaussian_kernel, pad_batch, random_cut, smooth


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise B2txtError(f"device {name!r} requested but CUDA is not available")
    return device


def use_bf16(amp: str, device: torch.device) -> bool:
    if amp == "off":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if amp == "bf16" and not supported:
        return device.type == "cpu"  # explicit request: CPU bf16 autocast works, only slowly
    return supported


def lr_lambda(lr_max: float, lr_min: float, warmup: int, decay_steps: int, kind: str):
    """Multiplier of ``lr_max`` at a step: linear warm-up, then cosine or linear decay to lr_min."""
    floor = lr_min / lr_max

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step >= decay_steps:
            return floor
        frac = (step - warmup) / max(decay_steps - warmup, 1)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        return 1 - (1 - floor) * frac

    return f


def build_optimizer(model: GRUDecoder, cfg: TrainConfig):
    """AdamW with three groups: day layers (own lr/decay), biases (no decay), the rest."""
    day, no_decay, decay = [], [], []
    for name, p in model.named_parameters():
        if name.startswith(("day_weights.", "day_biases.")):
            day.append(p)
        elif "bias" in name or name == "h0":
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": cfg.lr_max, "weight_decay": cfg.weight_decay, "group_type": "main"},
        {"params": no_decay, "lr": cfg.lr_max, "weight_decay": 0.0, "group_type": "bias"},
        {"params": day, "lr": cfg.lr_max_day, "weight_decay": cfg.weight_decay_day, "group_type": "day"},
    ]
    opt = torch.optim.AdamW(groups, betas=(cfg.beta0, cfg.beta1), eps=cfg.epsilon)
    main = lr_lambda(cfg.lr_max, cfg.lr_min, cfg.lr_warmup_steps, cfg.lr_decay_steps, cfg.lr_scheduler_type)
    day_f = lr_lambda(cfg.lr_max_day, cfg.lr_min_day, cfg.lr_warmup_steps_day, cfg.lr_decay_steps_day,
                      cfg.lr_scheduler_type)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [main, main, day_f])
    return opt, sched


def published_args(cfg: TrainConfig, sessions: list[str], data_dir: str, out_dir: str) -> dict:
    """``args.yaml`` in the published layout (REFERENCE §3), plus our own section."""
    m, a = cfg.model, cfg.augment
    return {
        "model": {
            "n_input_features": 512, "n_units": m.n_units, "rnn_dropout": m.rnn_dropout,
            "rnn_trainable": True, "n_layers": m.n_layers, "patch_size": m.patch_size,
            "patch_stride": m.patch_stride,
            "input_network": {"n_input_layers": 1, "input_layer_sizes": [512], "input_trainable": True,
                              "input_layer_dropout": m.input_dropout},
        },
        "mode": "train", "use_amp": cfg.amp != "off", "output_dir": out_dir,
        "checkpoint_dir": f"{out_dir}/checkpoint", "seed": cfg.seed,
        "num_training_batches": cfg.num_training_batches, "lr_scheduler_type": cfg.lr_scheduler_type,
        "lr_max": cfg.lr_max, "lr_min": cfg.lr_min, "lr_decay_steps": cfg.lr_decay_steps,
        "lr_warmup_steps": cfg.lr_warmup_steps, "lr_max_day": cfg.lr_max_day, "lr_min_day": cfg.lr_min_day,
        "lr_decay_steps_day": cfg.lr_decay_steps_day, "lr_warmup_steps_day": cfg.lr_warmup_steps_day,
        "beta0": cfg.beta0, "beta1": cfg.beta1, "epsilon": cfg.epsilon, "weight_decay": cfg.weight_decay,
        "weight_decay_day": cfg.weight_decay_day, "grad_norm_clip_value": cfg.grad_norm_clip_value,
        "batches_per_train_log": cfg.batches_per_train_log, "batches_per_val_step": cfg.batches_per_val_step,
        "dataset": {
            "data_transforms": {
                "white_noise_std": a.white_noise_std, "constant_offset_std": a.constant_offset_std,
                "random_walk_std": a.random_walk_std, "random_walk_axis": -1,
                "static_gain_std": a.static_gain_std, "random_cut": a.random_cut,
                "smooth_kernel_size": a.smooth_kernel_size, "smooth_data": a.smooth_data,
                "smooth_kernel_std": a.smooth_kernel_std,
            },
            "neural_dim": 512, "batch_size": cfg.batch_size, "n_classes": N_CLASSES, "max_seq_elements": 500,
            "days_per_batch": cfg.days_per_batch, "must_include_days": cfg.must_include_days or None,
            "dataset_dir": data_dir, "sessions": list(sessions),
        },
        "b2txt": {"train": cfg.model_dump(mode="json")},
    }


@dataclass
class ValResult:
    loss: float
    per: float
    per_session: dict[str, float] = field(default_factory=dict)


def validation_pass(model: GRUDecoder, store: TrialStore, kernel: torch.Tensor | None, device: torch.device,
             batch_size: int = 32) -> ValResult:
    """Greedy-CTC phoneme error rate (total edits / total reference length) and CTC loss."""
    logits = run_model(model, store.features, store.day_idx, kernel, device, batch_size)
    ctc = torch.nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)
    edits = np.zeros(len(store.sessions))
    lengths = np.zeros(len(store.sessions))
    loss_sum = 0.0
    for lg, lab, day in zip(logits, store.labels, store.day_idx):
        if lab is None:
            continue
        lp = torch.from_numpy(lg).log_softmax(-1)[:, None, :]
        loss_sum += float(ctc(lp, torch.from_numpy(lab)[None], torch.tensor([lg.shape[0]]), torch.tensor([len(lab)])))
        edits[day] += edit_distance(greedy_decode(lg), lab.tolist())
        lengths[day] += len(lab)
    per_session = {store.sessions[d]: float(edits[d] / lengths[d]) for d in range(len(store.sessions)) if lengths[d]}
    total = lengths.sum()
    return ValResult(loss_sum / max(len(logits), 1), float(edits.sum() / total) if total else float("nan"), per_session)


def _too_short_for_ctc(store: TrialStore, cfg: TrainConfig) -> list[str]:
    """Trials with fewer model outputs than labels: CTC cannot align them (zero loss)."""
    notes = []
    for i, (f, lab) in enumerate(zip(store.features, store.labels)):
        n_out = (f.shape[0] - cfg.augment.random_cut - cfg.model.patch_size) // cfg.model.patch_stride + 1
        if lab is not None and n_out < len(lab):
            row = store.rows.iloc[i]
            notes.append(f"{row['session']} {row['trial']}: {n_out} outputs for {len(lab)} labels")
    return notes


def train(cfg: TrainConfig, data_dir: str | Path, manifest_path: str | Path, out_dir: str | Path,
          log=print) -> ValResult:
    """Train, validate periodically, keep the best checkpoint; returns the best validation result."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    bf16 = use_bf16(cfg.amp, device)
    manifest = read_manifest(manifest_path)
    sessions = sorted(manifest["session"].unique())
    train_store = TrialStore.load(data_dir, manifest, "train", sessions)
    val_store = TrialStore.load(data_dir, manifest, "val", sessions)
    if len(train_store) == 0:
        raise B2txtError(f"{manifest_path}: no training trials")
    short = _too_short_for_ctc(train_store, cfg)
    if short:
        log(f"warning: {len(short)} training trial(s) are too short for CTC and will add no loss, e.g. {short[0]}")

    mcfg = GRUDecoderConfig(n_days=len(sessions), **cfg.model.model_dump())
    model = GRUDecoder(mcfg).to(device)
    opt, sched = build_optimizer(model, cfg)
    ctc = torch.nn.CTCLoss(blank=0, reduction="none", zero_infinity=True)
    kernel = gaussian_kernel(cfg.augment.smooth_kernel_std, cfg.augment.smooth_kernel_size) if cfg.augment.smooth_data else None
    sampler = DayBatchSampler(train_store, cfg.batch_size, cfg.days_per_batch, cfg.seed,
                              cfg.must_include_days)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "checkpoint").mkdir()
        log_lines: list[str] = []

        def note(msg: str) -> None:
            log_lines.append(msg)
            log(msg)

        note(f"device {device}, bf16 {bf16}, {n_params / 1e6:.2f} M parameters, {len(sessions)} sessions, "
             f"{len(train_store)} train / {len(val_store)} val trials")
        metrics = []
        best: ValResult | None = None
        best_step = -1
        stale = 0
        t0 = time.time()
        running = []
        bar = progress(desc="train", total=cfg.num_training_batches, unit="batch")
        for step in range(cfg.num_training_batches):
            model.train()
            idx = sampler.next_batch()
            x, lengths = pad_batch([train_store.features[i] for i in idx])
            labels = [train_store.labels[i] for i in idx]
            day_idx = torch.as_tensor(train_store.day_idx[idx])
            x = augment(x, cfg.augment, gen)
            x, lengths = random_cut(x, lengths, cfg.augment.random_cut, gen)
            if kernel is not None:
                x = smooth(x, kernel)
            x, day_idx = x.to(device), day_idx.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x, day_idx)
            out_len = model.output_lengths(lengths).clamp(min=1)
            targets = torch.cat([torch.from_numpy(lab) for lab in labels]).to(device)
            tgt_len = torch.tensor([len(lab) for lab in labels])
            log_probs = logits.float().log_softmax(-1).transpose(0, 1)
            loss = ctc(log_probs, targets, out_len, tgt_len).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_norm_clip_value)
            opt.step()
            sched.step()
            running.append(loss.item())
            bar.update()

            last = step == cfg.num_training_batches - 1
            if (step + 1) % cfg.batches_per_train_log == 0 or last:
                row = {"step": step + 1, "train_loss": float(np.mean(running)), "lr": sched.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "val_loss": float("nan"), "val_PER": float("nan"),
                       "seconds": time.time() - t0}
                metrics.append(row)
                running = []
                note(f"step {step + 1}: train loss {row['train_loss']:.4f}, grad norm {row['grad_norm']:.2f}, "
                     f"lr {row['lr']:.2e}, {row['seconds']:.0f} s")
            if (step + 1) % cfg.batches_per_val_step == 0 or last:
                val = validation_pass(model, val_store, kernel, device) if len(val_store) else ValResult(float("nan"), float("nan"))
                if not metrics or metrics[-1]["step"] != step + 1:
                    metrics.append({"step": step + 1, "train_loss": float("nan"), "lr": sched.get_last_lr()[0],
                                    "grad_norm": float("nan"), "seconds": time.time() - t0})
                metrics[-1].update(val_loss=val.loss, val_PER=val.per)
                note(f"step {step + 1}: val loss {val.loss:.4f}, val PER {val.per:.4f}")
                improved = best is None or not (val.per >= best.per)  # NaN PER (no val data): keep the latest
                if improved:
                    best, best_step, stale = val, step + 1, 0
                    torch.save({
                        "model_state_dict": model.state_dict(),
                        "optimizer_state_dict": opt.state_dict(),
                        "scheduler_state_dict": sched.state_dict(),
                        "val_PER": val.per, "val_loss": val.loss, "step": step + 1,
                        "b2txt": {"model": mcfg.to_dict(), "sessions": sessions,
                                  "train": cfg.model_dump(mode="json")},
                    }, tmp / "checkpoint" / "best_checkpoint")
                else:
                    stale += 1
                if cfg.early_stopping_val_steps and stale >= cfg.early_stopping_val_steps:
                    note(f"early stopping at step {step + 1}: no improvement for {stale} validations")
                    break
        bar.close()
        assert best is not None
        note(f"best val PER {best.per:.4f} at step {best_step}")
        args = published_args(cfg, sessions, str(data_dir), str(out_dir))
        (tmp / "checkpoint" / "args.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
        pd.DataFrame(metrics).to_csv(tmp / "metrics.csv", index=False)
        (tmp / "training_log").write_text("\n".join(log_lines) + "\n")
    return best
