"""Inference: phoneme logits for every trial of a split, and greedy CTC decoding.

Logits file (HDF5): one group per trial, ``trial_00000`` … in manifest order, holding dataset
``logits`` (float32 ``[T', 41]``, model column order — see :func:`b2txt.phonemes.to_lm_order`
for the language-model order) and, for labelled trials, ``seq_class_ids`` (unpadded); attributes
``session``, ``split``, ``block_num``, ``trial_num``, ``corpus``, ``post_implant_day``,
``sentence_label`` (empty when unknown).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from .data.store import TrialStore, read_manifest
from .errors import B2txtError
from .fileio import atomic_file, progress
from .models import GRUDecoder
from .phonemes import BLANK_ID, N_CLASSES
from .transforms import pad_batch, smooth


def greedy_decode(logits: np.ndarray) -> list[int]:
    """Best path: arg-max per frame, merge repeats, drop blanks."""
    best = np.asarray(logits).argmax(-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(c) for c in best[keep] if c != BLANK_ID]


@torch.no_grad()
def run_model(model: GRUDecoder, features: Sequence[np.ndarray], day_idx: Sequence[int],
              kernel: torch.Tensor | None, device: torch.device, batch_size: int = 32,
              show_progress: bool = False) -> list[np.ndarray]:
    """Logits per trial. Trials are batched by length; the GRU is causal, so zero padding at
    the end changes no output within a trial's own length (and 'same' smoothing pads with
    zeros too). A trial shorter than one patch has no outputs: ``[0, 41]``."""
    model.eval()
    n_out = [int(model.output_lengths(f.shape[0])) for f in features]
    out: list[np.ndarray] = [np.zeros((0, N_CLASSES), dtype=np.float32)] * len(features)
    runnable = [i for i in np.argsort([f.shape[0] for f in features], kind="stable") if n_out[i] > 0]
    batches = [runnable[i: i + batch_size] for i in range(0, len(runnable), batch_size)]
    it = progress(batches, desc="infer", unit="batch") if show_progress else batches
    for b in it:
        x, _ = pad_batch([features[i] for i in b])
        if kernel is not None:
            x = smooth(x, kernel)
        logits = model(x.to(device), torch.as_tensor(np.asarray(day_idx)[b]).to(device)).float().cpu().numpy()
        for j, i in enumerate(b):
            out[i] = logits[j, : n_out[i]]
    return out


def write_logits(path: str | Path, rows: pd.DataFrame, logits: list[np.ndarray],
                 labels: list[np.ndarray | None]) -> None:
    with atomic_file(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["n_classes"] = N_CLASSES
        f.attrs["column_order"] = "model"  # blank, AA..ZH, SIL
        for i, (row, lg, lab) in enumerate(zip(rows.itertuples(index=False), logits, labels)):
            g = f.create_group(f"trial_{i:05d}")
            g.create_dataset("logits", data=lg.astype(np.float32))
            if lab is not None:
                g.create_dataset("seq_class_ids", data=np.asarray(lab, dtype=np.int32))
            g.attrs["session"] = row.session
            g.attrs["split"] = row.split
            g.attrs["source_trial"] = row.trial
            g.attrs["block_num"] = int(row.block_num)
            g.attrs["trial_num"] = int(row.trial_num)
            g.attrs["corpus"] = str(row.corpus)
            g.attrs["post_implant_day"] = int(row.post_implant_day)
            g.attrs["sentence_label"] = str(row.sentence)


@dataclass
class LogitsTrial:
    logits: np.ndarray
    labels: np.ndarray | None
    attrs: dict


def read_logits(path: str | Path) -> list[LogitsTrial]:
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise B2txtError(f"{path}: cannot read logits file: {exc}") from None
    out = []
    with f:
        for name in sorted(f.keys()):
            g = f[name]
            if "logits" not in g:
                raise B2txtError(f"{path}: {name}: dataset logits missing")
            lg = g["logits"][()]
            if lg.ndim != 2 or lg.shape[1] != N_CLASSES:
                raise B2txtError(f"{path}: {name}: logits shape {lg.shape}, expected [T, {N_CLASSES}]")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
            out.append(LogitsTrial(lg, g["seq_class_ids"][()] if "seq_class_ids" in g else None, attrs))
    return out


def infer_split(model_dir: str | Path, data_dir: str | Path, manifest_path: str | Path, split: str,
                out: str | Path, device: str = "auto", batch_size: int = 32, known_sessions_only: bool = False,
                chunk_bins: int | None = None, log=lambda msg: None) -> int:
    """Write the logits of every trial of ``split``; returns the number of trials.

    Trials of sessions the model does not know are an error, or skipped (and reported) with
    ``known_sessions_only``. With ``chunk_bins`` the trials are decoded online, that many bins
    at a time (:mod:`b2txt.streaming`); the logits equal the one-pass ones.
    """
    from .checkpoint import load_model
    from .train import select_device

    dev = select_device(device)
    loaded = load_model(model_dir, dev)
    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise B2txtError(f"{manifest_path}: no trials in split {split!r}")
    unknown = sorted(set(rows["session"]) - set(loaded.sessions))
    if unknown and known_sessions_only:
        log(f"skipping {int(rows['session'].isin(unknown).sum())} {split} trial(s) of session(s) unknown to the model: {unknown}")
        manifest = manifest[~manifest["session"].isin(unknown)]
        rows = manifest[manifest["split"] == split]
        unknown = []
    if unknown:
        raise B2txtError(f"session(s) {unknown} of the data are unknown to the model in {model_dir} "
                         f"(it knows {len(loaded.sessions)} sessions: {loaded.sessions[0]} … {loaded.sessions[-1]}); "
                         "fit a day layer for a new session with `b2txt calibrate`, or skip them with --known-sessions-only")
    store = TrialStore.load(data_dir, manifest, split, loaded.sessions)
    features = [loaded.select_features(f) for f in store.features]
    if chunk_bins:
        from .streaming import stream_logits

        logits = stream_logits(loaded.model, features, store.day_idx, loaded.kernel, chunk_bins, dev)
    else:
        logits = run_model(loaded.model, features, store.day_idx, loaded.kernel, dev, batch_size, show_progress=True)
    write_logits(out, store.rows, logits, store.labels)
    return len(logits)
