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
            generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Training-only noise, drawn per trial over its own length (padding stays zero): static
    gain, white noise, constant offset, random walk. ``generators``: one per trial."""
    _, _, c = x.shape
    dev, dt = x.device, x.dtype
    out = torch.zeros_like(x)
    for i, gen in enumerate(generators):
        n = int(lengths[i])

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float32, device=gen.device).to(device=dev, dtype=dt)

        xi = x[i, :n]
        if cfg.static_gain_std > 0:
            xi = xi @ (torch.eye(c, device=dev, dtype=dt) + randn(c, c) * cfg.static_gain_std)
        if cfg.white_noise_std > 0:
            xi = xi + randn(n, c) * cfg.white_noise_std
        if cfg.constant_offset_std > 0:
            xi = xi + randn(1, c) * cfg.constant_offset_std
        if cfg.random_walk_std > 0:
            xi = xi + torch.cumsum(randn(n, c) * cfg.random_walk_std, dim=0)
        out[i, :n] = xi
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

