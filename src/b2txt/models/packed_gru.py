"""A GRU over a batch's real time steps only, for training on the CPU.

Trials in a batch differ in length, and ``nn.GRU`` on a padded batch computes every padded step:
with random batches about 40 % of a paper-model batch's multiply-adds are padding. On the CPU,
torch's own packed path (``pack_padded_sequence``) is slower than padding (it builds autograd
nodes per step and projects the inputs step by step). This module packs instead:

* rows are kept in ``PackedSequence`` order: step 0 of every trial, then step 1 of the trials
  still running, ... (trials sorted longest first), so step ``t``'s rows are one contiguous block
  and the trials still running at ``t`` are a prefix of those at ``t - 1``;
* each layer is one autograd function with a hand-written backward: the input projection, its
  gradients and the recurrent weights' gradient are each one matrix product over all real rows;
  only ``h @ W_hh`` (and its transpose going back) runs step by step, on the running trials.

The arithmetic is ``nn.GRU``'s (same parameters, gate order r, z, n, ``b_hn`` inside ``r *``):

    r = σ(W_ir x + b_ir + W_hr h + b_hr)      z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))      h' = n + z * (h - n)

so a trial's outputs and every gradient equal the padded ``nn.GRU``'s up to float rounding
(tests/test_packed_gru.py). The layer saves what autograd would (gates, candidate, outputs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class PackPlan(NamedTuple):
    """Where a padded batch's real steps go. ``sizes[t]``: trials running at step ``t``, whose
    rows start at packed row ``starts[t]``; packed row ``k`` is step ``steps[k]`` of trial ``trials[k]`` (an index into the batch);
    ``prev[k - sizes[0]]`` is the packed row of the same trial's previous step."""

    sizes: list[int]
    starts: list[int]
    trials: torch.Tensor
    steps: torch.Tensor
    prev: torch.Tensor
    order: torch.Tensor  # batch indices, longest trial first

    @property
    def n_rows(self) -> int:
        return len(self.trials)


def plan_packing(lengths: torch.Tensor, device: torch.device | str = "cpu") -> PackPlan:
    """The packing of a batch whose trials have ``lengths`` steps (each ≥ 1)."""
    lengths = torch.as_tensor(lengths).cpu().long()
    if lengths.numel() == 0 or int(lengths.min()) < 1:
        raise ValueError("plan_packing: every trial needs at least one step")
    order = torch.argsort(lengths, descending=True, stable=True)
    by_length = lengths[order]
    steps_range = torch.arange(int(by_length[0]))
    sizes_t = (by_length[None, :] > steps_range[:, None]).sum(1)  # running trials per step
    sizes = sizes_t.tolist()
    steps = torch.repeat_interleave(steps_range, sizes_t)
    rank = torch.cat([torch.arange(n) for n in sizes])  # position among the running trials
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    later = steps >= 1
    prev = starts[steps[later] - 1] + rank[later]
    return PackPlan(sizes, starts.tolist(), order[rank].to(device), steps.to(device), prev.to(device), order.to(device))


def pack(x: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """Batch-first padded ``x`` [B, T, ...] → packed rows [N, ...]."""
    return x[plan.trials, plan.steps]


def unpack(rows: torch.Tensor, plan: PackPlan, n_steps: int) -> torch.Tensor:
    """Packed rows [N, ...] → batch-first [B, n_steps, ...], zeros after each trial's end."""
    out = rows.new_zeros((len(plan.order), n_steps) + rows.shape[1:])
    return out.index_put((plan.trials, plan.steps), rows)


class _PackedGRULayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, sizes: list[int], starts: list[int], prev: torch.Tensor):
        # x [N, I] packed; h0 [B, H] in the plan's order (longest first). Everything in x's
        # dtype: packed_gru casts the weights, and autocast must not re-cast into the buffers.
        with torch.autocast(x.device.type, enabled=False):
            return _PackedGRULayer._forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, sizes, starts, prev)

    @staticmethod
    def _forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, sizes, starts, prev):
        hidden = w_hh.shape[1]
        gi = torch.addmm(b_ih, x, w_ih.t())
        out = x.new_empty(x.shape[0], hidden)
        rz = x.new_empty(x.shape[0], 2 * hidden)
        cand = x.new_empty(x.shape[0], hidden)
        ghn = x.new_empty(x.shape[0], hidden)
        w_hh_t = w_hh.t()
        h = h0
        for n, start in zip(sizes, starts):
            rows = slice(start, start + n)
            h_prev = h[:n]
            gh = torch.addmm(b_hh, h_prev, w_hh_t)
            g = gi[rows]
            gates = torch.add(g[:, :2 * hidden], gh[:, :2 * hidden], out=rz[rows]).sigmoid_()
            ghn[rows] = gh[:, 2 * hidden:]
            c = torch.addcmul(g[:, 2 * hidden:], gates[:, :hidden], ghn[rows], out=cand[rows]).tanh_()
            h = torch.addcmul(c, gates[:, hidden:], h_prev - c, out=out[rows])
        ctx.save_for_backward(x, h0, w_ih, w_hh, out, rz, cand, ghn, prev)
        ctx.sizes, ctx.starts = sizes, starts
        return out

    @staticmethod
    def backward(ctx, d_out):
        with torch.autocast(d_out.device.type, enabled=False):
            return _PackedGRULayer._backward(ctx, d_out.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx, d_out):
        x, h0, w_ih, w_hh, out, rz, cand, ghn, prev = ctx.saved_tensors
        sizes, starts = ctx.sizes, ctx.starts
        hidden = w_hh.shape[1]
        h1, h2, h3 = hidden, 2 * hidden, 3 * hidden
        # d[:, 0:3H] = input-side gate gradients in the order (n, r, z); d[:, H:4H] = the
        # recurrent side's in W_hh's order (r, z, n): one buffer, no per-step concatenation.
        d = x.new_empty(x.shape[0], 4 * hidden)
        dh = x.new_zeros(h0.shape)
        for t in range(len(sizes) - 1, -1, -1):
            n, start = sizes[t], starts[t]
            rows = slice(start, start + n)
            dht = dh[:n].add_(d_out[rows])
            h_prev = out[starts[t - 1]:starts[t - 1] + n] if t else h0[:n]
            r, z, c = rz[rows, :h1], rz[rows, h1:], cand[rows]
            dc = torch.mul(dht * (1 - z), 1 - c * c, out=d[rows, :h1])
            torch.mul(dc * ghn[rows], r * (1 - r), out=d[rows, h1:h2])
            torch.mul(dht * (h_prev - c), z * (1 - z), out=d[rows, h2:h3])
            torch.mul(dc, r, out=d[rows, h3:])
            torch.addmm(dht * z, d[rows, h1:], w_hh, out=dh[:n])
        d_rec, d_rz, d_n = d[:, h1:], d[:, h1:h3], d[:, :h1]
        h_prev_all = torch.cat([h0[:sizes[0]], out.index_select(0, prev)])
        # input side in W_ih's row order (r, z | n), without copying W_ih or its gradient
        d_x = (d_n @ w_ih[h2:]).addmm_(d_rz, w_ih[:h2])
        d_w_ih = torch.empty_like(w_ih)
        torch.mm(d_rz.t(), x, out=d_w_ih[:h2])
        torch.mm(d_n.t(), x, out=d_w_ih[h2:])
        d_b_ih = torch.cat([d_rz.sum(0), d_n.sum(0)])
        return d_x, dh, d_w_ih, d_rec.t() @ h_prev_all, d_b_ih, d_rec.sum(0), None, None, None


def packed_gru(gru: nn.GRU, x: torch.Tensor, h0: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """``gru`` over packed rows ``x`` [N, input_size] from initial states ``h0`` [layers, B, H]
    (batch order): the last layer's packed outputs [N, H]. Dropout between layers as ``gru``'s."""
    if gru.bidirectional or gru.proj_size or not gru.bias or x.dim() != 2:
        raise ValueError("packed_gru: packed rows [N, input_size] through a unidirectional GRU with biases")
    h0 = h0.index_select(1, plan.order)
    y = x
    for layer in range(gru.num_layers):
        weights = [getattr(gru, f"{k}_l{layer}").to(y.dtype) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        y = _PackedGRULayer.apply(y, h0[layer].to(y.dtype), *weights, plan.sizes, plan.starts, plan.prev)
        if layer < gru.num_layers - 1 and gru.dropout and gru.training:
            y = F.dropout(y, gru.dropout, True)
    return y
