"""Test-time augmentation: a model run on each trial under fixed input transforms, the
log-probabilities averaged per frame like an ensemble (:func:`b2txt.data.ensemble.average_log_probs`).

A transform (:class:`b2txt.ground.config.TTATransform`) keeps a trial's length, so every
transform gives as many frames as plain inference and the frames line up:

- ``shift``: the trial delayed (or advanced) by a few bins, zero-filled, its length kept; with the
  patch stride above the shift, the model sees the patches at another phase;
- ``noise_seed``: the model's training noise (its ``args.yaml`` augmentation: white noise,
  constant offset, random walk, static gain, times ``noise_scale``), drawn per trial from
  (seed, trial index), so a trial's noise does not depend on batching;
- ``smooth_std``: another Gaussian smoothing width instead of the model's own.

The identity transform ``{}`` runs the trial exactly as plain inference does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.ensemble import average_log_probs
from ..ground.config import AugmentConfig, TTATransform
from .transforms import augment, gaussian_kernel, trial_generator

#: Runs the model: (features per trial, smoothing kernel or None) -> logits per trial.
RunFn = Callable[[Sequence[np.ndarray], torch.Tensor | None], list[np.ndarray]]


def shift_trial(x: np.ndarray, k: int) -> np.ndarray:
    """``x [T, C]`` delayed by ``k`` bins (advanced when negative), zero-filled, same length."""
    if k == 0:
        return x
    out = np.zeros_like(x)
    n = x.shape[0]
    if abs(k) >= n:
        return out
    if k > 0:
        out[k:] = x[: n - k]
    else:
        out[: n + k] = x[-k:]
    return out


def noise_config(transforms: dict, scale: float) -> AugmentConfig:
    """The training noise of a model's ``args.yaml`` data transforms, its sds times ``scale``."""
    def sd(key: str) -> float:
        return float(transforms.get(key, 0.0) or 0.0) * scale

    return AugmentConfig(white_noise_std=sd("white_noise_std"), constant_offset_std=sd("constant_offset_std"),
                         random_walk_std=sd("random_walk_std"), static_gain_std=sd("static_gain_std"))


def add_noise(features: Sequence[np.ndarray], cfg: AugmentConfig, seed: int) -> list[np.ndarray]:
    """Each trial with the training noise drawn from (seed, its index): one trial at a time, one
    generator each, as training draws it."""
    out = []
    for i, f in enumerate(features):
        x = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))[None]
        y = augment(x, torch.tensor([f.shape[0]]), cfg, [trial_generator(seed, 0, i)])
        out.append(y[0].numpy())
    return out


def transformed(features: Sequence[np.ndarray], t: TTATransform, kernel: torch.Tensor | None,
                data_transforms: dict) -> tuple[list[np.ndarray], torch.Tensor | None]:
    """The trials and the smoothing kernel under one transform."""
    feats = [shift_trial(f, t.shift) for f in features]
    if t.noise_seed is not None:
        feats = add_noise(feats, noise_config(data_transforms, t.noise_scale), t.noise_seed)
    if t.smooth_std is not None:
        kernel = gaussian_kernel(t.smooth_std, int(data_transforms.get("smooth_kernel_size", 100)))
    return feats, kernel


def tta_logits(run: RunFn, features: Sequence[np.ndarray], kernel: torch.Tensor | None,
               transforms: Sequence[TTATransform], data_transforms: dict,
               log: Callable[[str], None] = lambda msg: None) -> list[np.ndarray]:
    """Per trial: the average of the log-probabilities under every transform (equal weights)."""
    runs = []
    for t in transforms:
        log(f"test-time augmentation: {t.model_dump(exclude_defaults=True) or 'identity'}")
        runs.append(run(*transformed(features, t, kernel, data_transforms)))
    return [average_log_probs([r[i] for r in runs]) for i in range(len(features))]
