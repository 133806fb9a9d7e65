"""Feature transforms shared by training and inference: Gaussian smoothing and augmentation.

Smoothing uses the published kernel: a Gaussian of sd ``std`` bins sampled on ±4 sd,
normalised, taps below 0.01 dropped, normalised again (9 taps for sd 2). We pad it 'same'
(zeros at both ends) in training *and* inference, so the model sees at test time exactly what
it saw in training; the published evaluation script pads 'valid' instead (8 fewer bins for sd 2).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..ground.config import AugmentConfig


def gaussian_kernel(std: float, size: int = 100) -> torch.Tensor:
    radius = min(int(4.0 * std + 0.5), max(size // 2, 0))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / std) ** 2)
    w = w / w.sum()
    w = w[w > 0.01]
    return (w / w.sum()).to(torch.float32)


def smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Smooth ``x [B, T, C]`` along time with ``kernel``, 'same' zero padding.

    On the CPU as a sum of shifted, weighted copies (what the depthwise ``conv1d`` computes, to
    the bit, at half its time and without its threads); elsewhere the ``conv1d`` itself."""
    width, pad = kernel.numel(), kernel.numel() // 2
    if x.device.type == "cpu":
        out_len = x.shape[1] + 2 * pad - width + 1
        xp = F.pad(x, (0, 0, pad, pad))
        weights = kernel.tolist()
        y = xp[:, :out_len] * weights[0]
        for i in range(1, width):
            y.add_(xp[:, i:i + out_len], alpha=weights[i])
        return y
    c = x.shape[-1]
    k = kernel.to(device=x.device, dtype=x.dtype).view(1, 1, -1).expand(c, 1, -1)
    y = F.conv1d(x.transpose(1, 2), k, padding=pad, groups=c)
    return y.transpose(1, 2)


def trial_generator(seed: int, step: int, trial: int = -1, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one trial in one training step (``trial=-1``: the batch's own), on
    ``device`` (a GPU draws its own noise: a different stream from the CPU's, equally seeded).

    Training noise depends on (seed, step, trial) only, not on which process or which place in
    a batch the trial lands in: N data-parallel processes augment exactly as one process does.
    """
    state = np.random.SeedSequence([seed, step, trial + 1]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def augment(x: torch.Tensor, lengths: torch.Tensor, cfg: AugmentConfig,
            generators: Sequence[torch.Generator], padded_to: int | None = None) -> torch.Tensor:
    """Training-only noise, drawn per trial: static gain, white noise, constant offset, random
    walk. ``generators``: one per trial.

    Over each trial's own length (padding stays zero), or with ``cfg.noise_over_padding`` over
    the padding too, as the published trainer does (its white noise, offset and walk cover the
    whole padded batch). The noise inside a trial is the same either way: the padding's white
    noise comes from the trial's stream after its own, drawn for ``padded_to`` bins (the longest
    trial of the global batch; default the width of ``x``) whatever share of the batch ``x`` is,
    so data-parallel ranks and one process augment alike."""
    _, t, c = x.shape
    dev, dt = x.device, x.dtype
    over_padding = cfg.noise_over_padding
    total = max(int(padded_to or t), t)
    out = torch.zeros_like(x)
    for i, gen in enumerate(generators):
        n = int(lengths[i])
        m = t if over_padding else n  # the bins that get noise

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32, device=gen.device).to(device=dev, dtype=dt)

        xi = x[i, :m]
        if cfg.static_gain_std > 0:
            xi = xi @ (torch.eye(c, device=dev, dtype=dt) + randn(c, c) * cfg.static_gain_std)
        white = randn(n, c) if cfg.white_noise_std > 0 else None
        offset = randn(1, c) if cfg.constant_offset_std > 0 else None
        walk = randn(n, c) if cfg.random_walk_std > 0 else None
        if over_padding:  # the padding's draws come last: the trial's own noise stays as without them
            white = None if white is None else torch.cat([white, randn(total - n, c)[: m - n]])
            walk = None if walk is None else torch.cat([walk, randn(total - n, c)[: m - n]])
        if white is not None:
            xi = xi + white * cfg.white_noise_std
        if offset is not None:
            xi = xi + offset * cfg.constant_offset_std
        if walk is not None:
            xi = xi + torch.cumsum(walk * cfg.random_walk_std, dim=0)
        out[i, :m] = xi
    return out


def draw_cut(max_cut: int, generator: torch.Generator, shortest: int) -> int:
    """How many leading bins to drop from every trial of a batch: 0..max_cut-1, or 0 when the
    batch's shortest trial would vanish (published behaviour)."""
    if max_cut <= 0:
        return 0
    cut = int(torch.randint(0, max_cut, (1,), generator=generator))
    return 0 if cut >= shortest else cut


def cut_start(x: torch.Tensor, lengths: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    if cut == 0:
        return x, lengths
    return x[:, cut:], lengths - cut


def pad_batch(features: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Trials ``[T_i, C]`` zero-padded into one float32 ``[B, max T_i, C]`` batch and their lengths.
    Built in numpy: one thread, no torch dispatch per trial (a busy machine does not slow it down)."""
    lengths = np.array([f.shape[0] for f in features], dtype=np.int64)
    out = np.zeros((len(features), int(lengths.max()), features[0].shape[1]), dtype=np.float32)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = f
    return torch.from_numpy(out), torch.from_numpy(lengths)

