"""Phoneme decoders. Read top to bottom: front end, then the GRU decoder.

``GRUDecoder`` computes exactly the published baseline (REFERENCE §3) and uses its parameter
names, so published state dicts load unchanged:

    x [B, T, 512] ──per-day affine (day_weights[d], day_biases[d])──► softsign ─► dropout
      ──patching (patch_size bins, stride patch_stride, time-major) ──► [B, T', P·512]
      ──GRU (n_layers × n_units, learnable h0) ──► linear ──► logits [B, T', 41]

The per-day layers are gathered with ``index_select`` from stacked weights and applied with
``bmm`` (the XLA-friendly form of the seed note): no Python loop over the batch, and every
day's parameters take part in the graph, so DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .phonemes import N_CLASSES


@dataclass
class GRUDecoderConfig:
    n_days: int
    neural_dim: int = 512
    n_units: int = 768
    n_layers: int = 5
    n_classes: int = N_CLASSES
    rnn_dropout: float = 0.4
    input_dropout: float = 0.2
    patch_size: int = 14
    patch_stride: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def output_lengths(n_steps: torch.Tensor | int, patch_size: int, patch_stride: int):
    """Number of model outputs for ``n_steps`` input bins: ``(T - patch) // stride + 1``."""
    if patch_size <= 1 and patch_stride == 1:
        return n_steps
    return (n_steps - patch_size) // patch_stride + 1


class DayLayers(nn.Module):
    """Per-day affine input layers (identity / zero init), softsign, dropout, then patching.

    A base class rather than a submodule so the parameter names stay those of the published
    checkpoint (``day_weights.<i>``, ``day_biases.<i>`` at the top level).
    """

    def _init_day_layers(self, n_days: int, neural_dim: int, input_dropout: float,
                         patch_size: int, patch_stride: int) -> int:
        self.day_weights = nn.ParameterList([nn.Parameter(torch.eye(neural_dim)) for _ in range(n_days)])
        self.day_biases = nn.ParameterList([nn.Parameter(torch.zeros(1, neural_dim)) for _ in range(n_days)])
        self.day_layer_activation = nn.Softsign()
        self.day_layer_dropout = nn.Dropout(input_dropout)
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        return neural_dim * max(patch_size, 1)  # GRU input size

    def _apply_preprocessing(self, x: torch.Tensor, day_idx: torch.Tensor) -> torch.Tensor:
        weights = torch.stack(list(self.day_weights), dim=0).index_select(0, day_idx)
        biases = torch.stack([b.squeeze(0) for b in self.day_biases], dim=0).index_select(0, day_idx)
        x = torch.bmm(x, weights.to(x.dtype)) + biases.unsqueeze(1).to(x.dtype)
        x = self.day_layer_dropout(self.day_layer_activation(x))
        if self.patch_size > 1 or self.patch_stride > 1:
            dtype = x.dtype
            # [B, T, C] -> [B, T', C, P] -> [B, T', P, C]: each patch is time-major, as published.
            x = x.unfold(1, self.patch_size, self.patch_stride).transpose(2, 3)
            x = x.reshape(x.shape[0], x.shape[1], -1).to(dtype)
        return x
class GRUDecoder(DayLayers):
    """The published baseline phoneme decoder (state-dict compatible)."""

    def __init__(self, cfg: GRUDecoderConfig):
        super().__init__()
        self.cfg = cfg
        input_size = self._init_day_layers(cfg.n_days, cfg.neural_dim, cfg.input_dropout,
                                           cfg.patch_size, cfg.patch_stride)
        self.gru = nn.GRU(input_size, cfg.n_units, cfg.n_layers,
                          dropout=cfg.rnn_dropout if cfg.n_layers > 1 else 0.0, batch_first=True)
        for name, param in self.gru.named_parameters():
            if "weight_hh" in name:
                nn.init.orthogonal_(param)
            elif "weight_ih" in name:
                nn.init.xavier_uniform_(param)
        self.out = nn.Linear(cfg.n_units, cfg.n_classes)
        nn.init.xavier_uniform_(self.out.weight)
        self.h0 = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, cfg.n_units)))

    def output_lengths(self, n_steps):
        return output_lengths(n_steps, self.cfg.patch_size, self.cfg.patch_stride)

    def forward(self, x: torch.Tensor, day_idx: torch.Tensor, states: torch.Tensor | None = None,
                return_state: bool = False):
        x = self._apply_preprocessing(x, day_idx)
        batch_size = x.size(0)
        if states is None:
            states = self.h0.expand(self.cfg.n_layers, batch_size, self.cfg.n_units).contiguous()
        output, hidden = self.gru(x, states.to(x.dtype))
        logits = self.out(output)
        return (logits, hidden) if return_state else logits
