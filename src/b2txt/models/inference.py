"""Inference: phoneme logits for every trial of a split (file format: :mod:`b2txt.data.logits`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.logits import write_logits
from ..data.store import TrialStore, read_manifest
from ..ground.config import TTATransform
from ..ground.console import progress
from ..ground.device import select_device
from ..ground.errors import B2txtError, DataError
from ..ground.phonemes import N_CLASSES
from .checkpoint import load_model
from .decoders import GRUDecoder
from .streaming import stream_logits
from .transforms import pad_batch, smooth
from .tta import tta_logits


@torch.no_grad()
def run_model(model: GRUDecoder, features: Sequence[np.ndarray], day_idx: Sequence[int],
              kernel: torch.Tensor | None, device: torch.device, batch_size: int = 32,
              show_progress: bool = False, pad_multiple: int = 64) -> list[np.ndarray]:
    """Logits per trial. Trials are batched by length; the GRU is causal, so zero padding at
    the end changes no output within a trial's own length (and 'same' smoothing pads with
    zeros too). A trial shorter than one patch has no outputs: ``[0, 41]``. On XLA batches are
    padded to a multiple of ``pad_multiple`` bins, so a few shapes compile, not one per length."""
    model.eval()
    n_out = [int(model.output_lengths(f.shape[0])) for f in features]
    out: list[np.ndarray] = [np.zeros((0, N_CLASSES), dtype=np.float32)] * len(features)
    runnable = [i for i in np.argsort([f.shape[0] for f in features], kind="stable") if n_out[i] > 0]
    batches = [runnable[i: i + batch_size] for i in range(0, len(runnable), batch_size)]
    it = progress(batches, desc="infer", unit="batch") if show_progress else batches
    for b in it:
        x, _ = pad_batch([features[i] for i in b])
        if device.type == "cuda":  # smoothing costs nothing on a GPU
            x = x.to(device)
        if kernel is not None:
            x = smooth(x, kernel)
        if device.type == "xla":
            x = F.pad(x, (0, 0, 0, -x.shape[1] % pad_multiple))
        logits = model(x.to(device), torch.as_tensor(np.asarray(day_idx)[b]).to(device)).float().cpu().numpy()
        for j, i in enumerate(b):
            out[i] = logits[j, : n_out[i]]
    return out


def infer_split(model_dir: str | Path, data_dir: str | Path, manifest_path: str | Path, split: str,
                out: str | Path, device: str = "auto", batch_size: int = 32, known_sessions_only: bool = False,
                chunk_bins: int | None = None, log=lambda msg: None,
                tta: Sequence[TTATransform] = ()) -> int:
    """Write the logits of every trial of ``split``; returns the number of trials.

    Trials of sessions the model does not know are an error, or skipped (and reported) with
    ``known_sessions_only``. With ``chunk_bins`` the trials are decoded online, that many bins
    at a time (:mod:`b2txt.models.streaming`); the logits equal the one-pass ones. With ``tta``
    transforms every trial runs under each and the file holds their averaged log-probabilities
    (:mod:`b2txt.models.tta`).
    """
    dev = select_device(device)
    loaded = load_model(model_dir, dev)
    manifest = read_manifest(manifest_path)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise B2txtError(f"{manifest_path}: no trials in split {split!r}")
    unknown = sorted(set(rows["session"]) - set(loaded.sessions))
    if unknown and known_sessions_only:
        if set(unknown) == set(rows["session"]):  # an empty logits file is no result
            raise B2txtError(f"none of the {split} trials' session(s) {unknown} is known to the model in {model_dir} "
                             f"(it knows {len(loaded.sessions)} sessions: {_span(loaded.sessions)}): nothing to infer; "
                             "is it the model of these data?")
        log(f"warning: skipping {int(rows['session'].isin(unknown).sum())} {split} trial(s) of session(s) unknown "
            f"to the model: {unknown}")
        manifest = manifest[~manifest["session"].isin(unknown)]
        rows = manifest[manifest["split"] == split]
        unknown = []
    if unknown:
        raise B2txtError(f"session(s) {unknown} of the data are unknown to the model in {model_dir} "
                         f"(it knows {len(loaded.sessions)} sessions: {_span(loaded.sessions)}); "
                         "fit a day layer for a new session with `b2txt calibrate`, or skip them with --known-sessions-only")
    store = TrialStore.load(data_dir, manifest, split, loaded.sessions)
    short = [f"{Path(data_dir) / r.file}: {r.trial}: {n} time step(s)"
             for r, n in zip(store.rows.itertuples(), map(len, store.features)) if loaded.model.output_lengths(n) < 1]
    if short:  # their logits would be empty: no stage passes on a trial without frames
        raise DataError(f"{len(short)} {split} trial(s) shorter than the model's patch of "
                        f"{loaded.model.patch_size} bins give no output frames, so no logits (`b2txt validate` "
                        "reports them all)", short)
    features = [loaded.select_features(f) for f in store.features]

    def run(feats: Sequence[np.ndarray], kernel: torch.Tensor | None) -> list[np.ndarray]:
        if chunk_bins:
            return stream_logits(loaded.model, feats, store.day_idx, kernel, chunk_bins, dev)
        return run_model(loaded.model, feats, store.day_idx, kernel, dev, batch_size, show_progress=True)

    if tta:
        transforms = (loaded.args.get("dataset") or {}).get("data_transforms") or {}
        logits = tta_logits(run, features, loaded.kernel, tta, transforms, log)
    else:
        logits = run(features, loaded.kernel)
    for r, lg in zip(store.rows.itertuples(), logits):
        if not np.isfinite(lg).all():  # a checkpoint with NaN/Inf weights, or features that overflow
            raise B2txtError(f"{model_dir}: the model gives NaN/Inf logits for {data_dir}/{r.file}: {r.trial}; "
                             "its checkpoint (or these features) are broken")
    write_logits(out, store.rows, logits, store.labels)
    return len(logits)


def _span(sessions: Sequence[str]) -> str:
    return f"{sessions[0]} … {sessions[-1]}" if sessions else "none"

