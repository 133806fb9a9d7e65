"""Where a command computes: the torch device, bf16 or not, and the CPU cores it may use.

torch is imported inside the functions that need it, so the decoding and server commands,
which only count cores, never load it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import B2txtError

if TYPE_CHECKING:
    import torch


def select_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``xla``."""
    import torch

    if name == "xla":
        try:
            import torch_xla.core.xla_model as xm
        except ImportError:
            raise B2txtError("device 'xla' needs torch_xla, which is not installed in this environment "
                             "(`make test-xla` builds .venv-xla with torch 2.9.0 + torch_xla 2.9.0)") from None
        return xm.xla_device()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise B2txtError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or xla") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise B2txtError(f"device {name!r} requested but CUDA is not available")
    return device


def use_bf16(amp: str, device: torch.device) -> bool:
    """bf16 autocast: ``auto`` on GPUs that support it and on XLA; on the CPU only when asked."""
    import torch

    if amp == "off":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "xla":
        return True
    return amp == "bf16"  # CPU: only when asked (works, but slowly)


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a Slurm job's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
