"""Rapid calibration: adapt a trained model to a session it has never seen.

The paper's decoder is recalibrated on each new day from a few sentences. Here a held-out
session gets its own day layer, initialised from the model's latest session before it (the
nearest recording conditions), and only that layer (``fit: day``) or the whole model
(``fit: all``) is fitted with CTC on the session's first N labelled training sentences. For
each N the phoneme error rate on the session's validation trials is measured; N = 0 is the
uncalibrated start. Outputs::

    OUT/calibration.csv            session, n_sentences, PER, edits, ref_len, n_val_trials, steps, fit
    OUT/model/                     the model calibrated with the largest N (published layout,
                                   the new session appended to its sessions)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ..data.logits import greedy_decode
from ..data.store import TrialStore, read_manifest, resolve_sessions
from ..evaluation.error_rates import edit_distance
from ..ground.config import AugmentConfig, CalibrateConfig
from ..ground.console import progress
from ..ground.device import select_device
from ..ground.errors import B2txtError
from ..ground.fileio import atomic_dir, atomic_file
from ..ground.outputs import recorded_file, writing
from ..models.checkpoint import LoadedModel, load_model
from ..models.inference import run_model
from ..models.transforms import augment, cut_start, draw_cut, pad_batch, smooth, trial_generator


def with_new_session(loaded: LoadedModel, session: str) -> tuple[torch.nn.Module, int]:
    """A copy of the model with one more day layer for ``session``, initialised from the nearest
    session in time (the latest earlier one, else the earliest); returns (model, its index)."""
    model = copy.deepcopy(loaded.model)
    earlier = [i for i, s in enumerate(loaded.sessions) if s < session]
    source = earlier[-1] if earlier else 0
    model.day_weights.append(torch.nn.Parameter(model.day_weights[source].detach().clone()))
    model.day_biases.append(torch.nn.Parameter(model.day_biases[source].detach().clone()))
    model.n_days += 1
    return model, len(loaded.sessions)


def session_per(model: torch.nn.Module, store: TrialStore, day: int, kernel, device) -> tuple[int, int]:
    logits = run_model(model, store.features, [day] * len(store), kernel, device)
    edits = sum(edit_distance(greedy_decode(lg), lab.tolist()) for lg, lab in zip(logits, store.labels))
    return edits, sum(len(lab) for lab in store.labels)


def fit(model: torch.nn.Module, day: int, features: list[np.ndarray], labels: list[np.ndarray],
        cfg: CalibrateConfig, augment_cfg: AugmentConfig, kernel, device) -> None:
    """CTC fine-tuning of the new day layer (or everything) on a few labelled sentences."""
    if cfg.fit == "day":
        params = [model.day_weights[day], model.day_biases[day]]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, eps=0.1, weight_decay=0.0)
    ctc = torch.nn.CTCLoss(blank=0, reduction="mean", zero_infinity=True)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout draws from torch's global generator: the same fit every run
    model.train()
    for step in range(cfg.steps):
        idx = rng.choice(len(features), size=min(cfg.batch_size, len(features)), replace=False)
        x, lengths = pad_batch([features[i] for i in idx])
        x = augment(x, lengths, augment_cfg, [trial_generator(cfg.seed, step, int(i)) for i in idx])
        cut = draw_cut(augment_cfg.random_cut, trial_generator(cfg.seed, step), int(lengths.min()))
        x, lengths = cut_start(x, lengths, cut)
        if kernel is not None:
            x = smooth(x, kernel)
        logits = model(x.to(device), torch.full((len(idx),), day, dtype=torch.long, device=device))
        out_len = model.output_lengths(lengths).clamp(min=1)
        targets = torch.from_numpy(np.concatenate([labels[i] for i in idx])).to(device)
        loss = ctc(logits.float().log_softmax(-1).transpose(0, 1), targets, out_len.to(device),
                   torch.tensor([len(labels[i]) for i in idx], device=device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def _augment_from_args(args: dict) -> AugmentConfig:
    t = (args.get("dataset") or {}).get("data_transforms") or {}
    known = AugmentConfig.model_fields
    return AugmentConfig(**{k: v for k, v in t.items() if k in known})


def calibrate(model_dir: str | Path, data_dir: str | Path, manifest_path: str | Path, cfg: CalibrateConfig,
              out_dir: str | Path, device: str = "cpu", log=print) -> pd.DataFrame:
    """PER of the held-out session against the number of calibration sentences."""

    dev = select_device(device)
    loaded = load_model(model_dir, dev)
    manifest = read_manifest(manifest_path)
    session = resolve_sessions(sorted(manifest["session"].unique()), [cfg.session], "calibrate.session")[0]
    if session in loaded.sessions:
        raise B2txtError(f"calibrate.session {session} was used to train {model_dir}; hold it out with "
                         "train.holdout_sessions so that calibration starts from a session the model never saw")
    rows = manifest[manifest["session"] == session]
    sessions = loaded.sessions + [session]
    train = TrialStore.load(data_dir, rows, "train", sessions)
    val = TrialStore.load(data_dir, rows, "val", sessions)
    if len(val) == 0:
        raise B2txtError(f"session {session} has no labelled val trials to measure calibration on")
    wanted = sorted(set(cfg.n_sentences))
    if not wanted or wanted[0] < 0:
        raise B2txtError(f"calibrate.n_sentences must be a non-empty list of counts >= 0, got {cfg.n_sentences}")
    if wanted and wanted[-1] > len(train):
        raise B2txtError(f"calibrate.n_sentences asks for {wanted[-1]} sentences but session {session} "
                         f"has {len(train)} labelled training trials")
    order = np.lexsort((train.rows["trial_num"].to_numpy(), train.rows["block_num"].to_numpy()))  # recording order
    feats = [loaded.select_features(train.features[i]) for i in order]
    labels = [train.labels[i] for i in order]
    val.features = [loaded.select_features(f) for f in val.features]
    aug = _augment_from_args(loaded.args)

    results, best_model = [], None
    for n in progress(wanted, desc="calibrate", unit="N"):
        t0 = time.time()
        model, day = with_new_session(loaded, session)
        if n > 0 and cfg.steps > 0:
            fit(model, day, feats[:n], labels[:n], cfg, aug, loaded.kernel, dev)
        edits, ref_len = session_per(model, val, day, loaded.kernel, dev)
        per = edits / ref_len
        results.append({"session": session, "n_sentences": n, "PER": per, "edits": edits, "ref_len": ref_len,
                        "n_val_trials": len(val), "steps": cfg.steps if n else 0, "fit": cfg.fit})
        log(f"calibrate {session}: N={n} sentences -> val PER {per:.4f} ({time.time() - t0:.1f} s)")
        best_model = model
    table = pd.DataFrame(results)
    _write_outputs(table, best_model, loaded, sessions, model_dir, Path(out_dir))
    return table


def _write_outputs(table: pd.DataFrame, model: torch.nn.Module | None, loaded: LoadedModel, sessions: list[str],
                   model_dir: str | Path, out_dir: Path) -> None:
    with atomic_dir(out_dir) as tmp, writing(out_dir):  # a full disk: one error naming out_dir
        table.to_csv(tmp / "calibration.csv", index=False, float_format="%.6g")
        if model is not None:
            (tmp / "model" / "checkpoint").mkdir(parents=True)
            args = copy.deepcopy(loaded.args)
            args["dataset"]["sessions"] = sessions
            args.setdefault("b2txt", {})["calibrated_from"] = str(model_dir)
            (tmp / "model" / "checkpoint" / "args.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
            with atomic_file(tmp / "model" / "checkpoint" / "best_checkpoint") as f, recorded_file(f) as fh:
                torch.save({"model_state_dict": model.state_dict(), "val_PER": float(table["PER"].iloc[-1]),
                            "val_loss": float("nan")}, fh)
