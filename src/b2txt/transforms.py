"""Feature transforms shared by training and inference: Gaussian smoothing and augmentation.

Smoothing uses the published kernel: a Gaussian of sd ``std`` bins sampled on ±4 sd,
normalised, taps below 0.01 dropped, normalised again (9 taps for sd 2). We pad it 'same'
(zeros at both ends) in training *and* inference, so the model sees at test time exactly what
it saw in training; the published evaluation script pads 'valid' instead (8 fewer bins for sd 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import AugmentConfig


def gaussian_kernel(std: float, size: int = 100) -> torch.Tensor:
    radius = min(int(4.0 * std + 0.5), max(size // 2, 0))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / std) ** 2)
    w = w / w.sum()
    w = w[w > 0.01]
    return (w / w.sum()).to(torch.float32)


def smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Smooth ``x [B, T, C]`` along time with ``kernel``, 'same' zero padding."""
    c = x.shape[-1]
    k = kernel.to(device=x.device, dtype=x.dtype).view(1, 1, -1).expand(c, 1, -1)
    y = F.conv1d(x.transpose(1, 2), k, padding=kernel.numel() // 2, groups=c)
    return y.transpose(1, 2)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Training-only noise: static gain, white noise, constant offset, random walk."""
    b, t, c = x.shape
    dev, dt = x.device, x.dtype

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=dev, dtype=dt)

    if cfg.static_gain_std > 0:
        gain = torch.eye(c, device=dev, dtype=dt) + randn(b, c, c) * cfg.static_gain_std
        x = torch.bmm(x, gain)
    if cfg.white_noise_std > 0:
        x = x + randn(b, t, c) * cfg.white_noise_std
    if cfg.constant_offset_std > 0:
        x = x + randn(b, 1, c) * cfg.constant_offset_std
    if cfg.random_walk_std > 0:
        x = x + torch.cumsum(randn(b, t, c) * cfg.random_walk_std, dim=1)
    return x


def random_cut(x: torch.Tensor, lengths: torch.Tensor, max_cut: int, generator: torch.Generator):
    """Drop 0..max_cut-1 leading bins of the whole batch (published behaviour)."""
    if max_cut <= 0:
        return x, lengths
    cut = int(torch.randint(0, max_cut, (1,), generator=generator))
    if cut == 0 or cut >= int(lengths.min()):
        return x, lengths
    return x[:, cut:], lengths - cut


def pad_batch(features: list, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    out = torch.zeros(len(features), int(lengths.max()), features[0].shape[1], dtype=dtype)
    for i, f in enumerate(features):
        out[i, : f.shape[0]] = torch.as_tensor(f, dtype=dtype)
    return out, lengths

