"""Phoneme decoders. Read top to bottom: front end, the GRU decoder, then the adversarial
``TripleGRUDecoder``. Both are built from the one model config, :class:`b2txt.ground.config.ModelConfig`
(also the trainer's and, in the published key names, ``args.yaml``'s), plus the data's number of
days (sessions) and features.

``GRUDecoder`` computes exactly the published baseline (REFERENCE §3) and uses its parameter
names, so published state dicts load unchanged:

    x [B, T, 512] ──per-day affine (day_weights[d], day_biases[d])──► softsign ─► dropout
      ──patching (patch_size bins, stride patch_stride, time-major) ──► [B, T', P·512]
      ──GRU (n_layers × n_units, learnable h0) ──► linear ──► logits [B, T', 41]

The per-day layers are gathered with ``index_select`` from stacked weights and applied with
``bmm`` (the XLA-friendly form of the seed note): no Python loop over the batch, and every
day's parameters take part in the graph, so DDP needs no ``find_unused_parameters``.

``TripleGRUDecoder`` is the seed note's XLA-friendly adversarial model. It shares the front end
above (same ``day_weights.<i>`` / ``day_biases.<i>`` keys) and splits the patched features
``x`` [B, T', P·C] into speech and a "noise" component with three GRUs:

    x ──NoiseModel (GRU + linear back to P·C) ──► noise [B, T', P·C]
    x − noise ──CleanSpeechModel (GRU + linear) ──► clean_logits [B, T', 41]
    GRL(noise) ──NoisySpeechModel (GRU + linear) ──► noisy_logits [B, T', 41]

GRL is ``gradient_reversal``: the identity going forward, ``−grl_scale ×`` the gradient going
back. ``forward(x, day_idx, mode="inference")`` returns ``clean_logits`` only (the noisy head is
not run); ``mode="full"`` returns the tuple ``(clean_logits, noisy_logits, noise)``, and
``mode="heads"`` the two logits only, what the trainer needs (packed, the noise's padded form
would cost a batch-sized copy of P·C features per step for nothing).

Training objective (implemented by the trainer, not here), with CTC as for the baseline (blank 0,
log-softmax over classes, per-trial, mean; input lengths from ``output_lengths``):

    L = CTC(clean_logits) + adversarial_weight · CTC(noisy_logits)

One backward pass of ``L`` gives:

* the clean head: ∂CTC(clean)/∂θ — it learns phonemes from ``x − noise``;
* the noisy head: adversarial_weight · ∂CTC(noisy)/∂θ — it learns to read phonemes from the noise;
* the noise model: ∂CTC(clean)/∂θ through ``x − noise``, plus
  −grl_scale · adversarial_weight · ∂CTC(noisy)/∂θ through the GRL, i.e. it *ascends* the noisy
  term and is pushed to leave no phoneme information in the noise (domain-adversarial training);
* the shared front end: both paths, the reversed one included (the noise model reads ``x``).

XLA rules of the seed note, kept throughout: no Python loop over the batch, static shapes
(hidden states from ``h0.expand(n_layers, batch_size, units)`` with ``batch_size = x.size(0)``
read once), tuple returns, and dtype consistency under bf16 autocast (``x − noise.to(x.dtype)``,
patching preserves dtype). Both decoders compile with ``torch.compile(fullgraph=True)`` (set
``torch._dynamo.config.allow_rnn = True`` for ``nn.GRU``).

Given ``lengths=`` (each trial's number of outputs), both decoders run their GRUs on the real
steps only (:mod:`b2txt.models.packed_gru`) and return logits that are zero after each trial's
end: the trainer's CPU path, where padding would cost its multiply-adds. The values inside each
trial, and every gradient, are those of the padded forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ground.config import ModelConfig
from ..ground.phonemes import N_CLASSES
from .packed_gru import PackPlan, pack, packed_gru, plan_packing, unpack

#: Features per 20 ms bin in the published data (REFERENCE §1).
N_FEATURES = 512


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


def _plan(lengths: torch.Tensor, x: torch.Tensor) -> PackPlan:
    """The packing of the patched batch ``x`` [B, T', ...] for ``lengths`` outputs per trial."""
    if lengths.shape != (x.size(0),) or int(lengths.max()) > x.size(1):
        raise ValueError(f"lengths {tuple(lengths.shape)} (max {int(lengths.max())}) do not fit a batch of "
                         f"{x.size(0)} trials of {x.size(1)} steps")
    return plan_packing(lengths, x.device)


def _init_gru_(gru: nn.GRU) -> None:
    """The baseline's GRU initialisation: orthogonal recurrent, Xavier-uniform input weights."""
    for name, param in gru.named_parameters():
        if "weight_hh" in name:
            nn.init.orthogonal_(param)
        elif "weight_ih" in name:
            nn.init.xavier_uniform_(param)


class GRUDecoder(DayLayers):
    """The published baseline phoneme decoder (state-dict compatible)."""

    def __init__(self, cfg: ModelConfig, n_days: int, neural_dim: int = N_FEATURES):
        super().__init__()
        self.cfg, self.n_days, self.neural_dim, self.n_classes = cfg, n_days, neural_dim, N_CLASSES
        input_size = self._init_day_layers(n_days, neural_dim, cfg.input_dropout, cfg.patch_size, cfg.patch_stride)
        self.gru = nn.GRU(input_size, cfg.n_units, cfg.n_layers,
                          dropout=cfg.rnn_dropout if cfg.n_layers > 1 else 0.0, batch_first=True)
        _init_gru_(self.gru)
        self.out = nn.Linear(cfg.n_units, N_CLASSES)
        nn.init.xavier_uniform_(self.out.weight)
        self.h0 = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, cfg.n_units)))

    def output_lengths(self, n_steps):
        return output_lengths(n_steps, self.patch_size, self.patch_stride)

    def forward(self, x: torch.Tensor, day_idx: torch.Tensor, states: torch.Tensor | None = None,
                return_state: bool = False, lengths: torch.Tensor | None = None):
        x = self._apply_preprocessing(x, day_idx)
        batch_size = x.size(0)
        if lengths is not None:
            if states is not None or return_state:
                raise ValueError("GRUDecoder: lengths= (packed training) takes no states and returns none")
            plan = _plan(lengths, x)
            h0 = self.h0.expand(self.gru.num_layers, batch_size, self.gru.hidden_size)
            return unpack(self.out(packed_gru(self.gru, pack(x, plan), h0, plan)), plan, x.size(1))
        if states is None:
            states = self.h0.expand(self.gru.num_layers, batch_size, self.gru.hidden_size).contiguous()
        output, hidden = self.gru(x, states.to(x.dtype))
        logits = self.out(output)
        return (logits, hidden) if return_state else logits


# ---------------------------------------------------------------------------------------------
# Adversarial triple-GRU decoder (seed note's XLA-friendly model)
# ---------------------------------------------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * (-ctx.scale), None


def gradient_reversal(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, scale)


class _GRUHead(nn.Module):
    """GRU (learnable h0, baseline init) followed by a Xavier-initialised linear layer."""

    def __init__(self, input_size: int, n_units: int, n_layers: int, n_out: int, dropout: float):
        super().__init__()
        self.n_units = n_units
        self.n_layers = n_layers
        self.gru = nn.GRU(input_size, n_units, n_layers,
                          dropout=dropout if n_layers > 1 else 0.0, batch_first=True)
        _init_gru_(self.gru)
        self.out = nn.Linear(n_units, n_out)
        nn.init.xavier_uniform_(self.out.weight)
        self.h0 = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, n_units)))

    def forward(self, x: torch.Tensor, plan: PackPlan | None = None) -> torch.Tensor:
        if plan is not None:  # x: packed rows
            h0 = self.h0.expand(self.n_layers, len(plan.order), self.n_units)
            return self.out(packed_gru(self.gru, x, h0, plan))
        batch_size = x.size(0)
        states = self.h0.expand(self.n_layers, batch_size, self.n_units).contiguous()
        output, _ = self.gru(x, states.to(x.dtype))
        return self.out(output)


class NoiseModel(_GRUHead):
    """Front-end features [B, T', P·C] → an estimate of their noise component, same shape."""

    def __init__(self, input_size: int, n_units: int, n_layers: int, dropout: float):
        super().__init__(input_size, n_units, n_layers, input_size, dropout)


class CleanSpeechModel(_GRUHead):
    """Denoised features ``x − noise`` [B, T', P·C] → phoneme logits [B, T', n_classes]."""

    def __init__(self, input_size: int, n_units: int, n_layers: int, n_classes: int, dropout: float):
        super().__init__(input_size, n_units, n_layers, n_classes, dropout)


class NoisySpeechModel(_GRUHead):
    """Noise [B, T', P·C] (behind the gradient reversal) → phoneme logits [B, T', n_classes]."""

    def __init__(self, input_size: int, n_units: int, n_layers: int, n_classes: int, dropout: float):
        super().__init__(input_size, n_units, n_layers, n_classes, dropout)


class TripleGRUDecoder(DayLayers):
    """Shared front end + noise / clean-speech / noisy-speech GRUs (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, n_days: int, neural_dim: int = N_FEATURES):
        super().__init__()
        self.cfg, self.n_days, self.neural_dim, self.n_classes = cfg, n_days, neural_dim, N_CLASSES
        input_size = self._init_day_layers(n_days, neural_dim, cfg.input_dropout, cfg.patch_size, cfg.patch_stride)
        self.noise_model = NoiseModel(input_size, cfg.noise_units, cfg.noise_layers, cfg.rnn_dropout)
        self.clean_speech_model = CleanSpeechModel(input_size, cfg.n_units, cfg.n_layers, N_CLASSES, cfg.rnn_dropout)
        self.noisy_speech_model = NoisySpeechModel(input_size, cfg.noisy_units, cfg.noisy_layers,
                                                   N_CLASSES, cfg.rnn_dropout)
        self.grl_scale = float(cfg.grl_scale)  # a plain attribute so a trainer may schedule it

    def output_lengths(self, n_steps):
        return output_lengths(n_steps, self.patch_size, self.patch_stride)

    def forward(self, x: torch.Tensor, day_idx: torch.Tensor, mode: str = "inference",
                lengths: torch.Tensor | None = None):
        if mode not in ("inference", "heads", "full"):
            raise ValueError(f"mode must be 'inference', 'heads' or 'full', not {mode!r}")
        x = self._apply_preprocessing(x, day_idx)
        plan, n_steps = None, x.size(1)
        if lengths is not None:  # every head on the packed rows, unpacked at the end
            plan = _plan(lengths, x)
            x = pack(x, plan)
        noise = self.noise_model(x, plan)
        clean_logits = self.clean_speech_model(x - noise.to(x.dtype), plan)
        if mode == "inference":
            return clean_logits if plan is None else unpack(clean_logits, plan, n_steps)
        noisy_logits = self.noisy_speech_model(gradient_reversal(noise, self.grl_scale), plan)
        outs = (clean_logits, noisy_logits, noise) if mode == "full" else (clean_logits, noisy_logits)
        return outs if plan is None else tuple(unpack(t, plan, n_steps) for t in outs)
