"""The packed GRU (models/packed_gru.py) computes what the padded nn.GRU does, on real steps only."""

import pytest
import torch
from torch import nn

from b2txt.ground.config import ModelConfig
from b2txt.models.decoders import GRUDecoder, TripleGRUDecoder, output_lengths
from b2txt.models.packed_gru import pack, packed_gru, plan_packing, unpack

CFG = ModelConfig(n_units=12, n_layers=3, patch_size=4, patch_stride=2, rnn_dropout=0.0, input_dropout=0.0)
TRIPLE = CFG.model_copy(update={"architecture": "triple", "noise_units": 10, "noise_layers": 2,
                                "noisy_units": 8, "noisy_layers": 2})


def test_plan_orders_rows_as_a_packed_sequence_and_links_each_step_to_the_previous():
    lengths = torch.tensor([2, 4, 1, 4])
    plan = plan_packing(lengths)
    ref = nn.utils.rnn.pack_padded_sequence(torch.zeros(4, 4, 1), lengths, batch_first=True, enforce_sorted=False)
    assert plan.sizes == ref.batch_sizes.tolist() == [4, 3, 2, 2] and plan.starts == [0, 4, 7, 9]
    assert plan.order.tolist() == [1, 3, 0, 2]  # longest first, ties in batch order
    assert plan.trials.tolist() == [1, 3, 0, 2, 1, 3, 0, 1, 3, 1, 3]
    assert plan.steps.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    for k in range(plan.sizes[0], plan.n_rows):  # the previous step of the same trial
        j = int(plan.prev[k - plan.sizes[0]])
        assert (plan.trials[j], plan.steps[j] + 1) == (plan.trials[k], plan.steps[k])


def test_unpack_inverts_pack_and_zeros_the_padding():
    lengths = torch.tensor([3, 1, 5])
    x = torch.randn(3, 5, 2)
    plan = plan_packing(lengths)
    back = unpack(pack(x, plan), plan, 5)
    mask = torch.arange(5)[None, :] < lengths[:, None]
    assert torch.equal(back[mask], x[mask]) and not back[~mask].any()


@pytest.mark.parametrize("lengths", [[7, 3, 7, 1, 5], [4], [6, 6, 6]])
def test_outputs_and_every_gradient_equal_the_padded_gru(lengths):
    torch.manual_seed(0)
    gru = nn.GRU(6, 5, 3, batch_first=True).double()
    lengths = torch.tensor(lengths)
    x = torch.randn(len(lengths), int(lengths.max()), 6, dtype=torch.float64)
    h0 = torch.randn(3, len(lengths), 5, dtype=torch.float64)  # a different start per trial
    weight = torch.randn(len(lengths), int(lengths.max()), 5, dtype=torch.float64)
    mask = (torch.arange(x.size(1))[None, :] < lengths[:, None])[..., None]

    def grads(run):
        xs, hs = x.clone().requires_grad_(), h0.clone().requires_grad_()
        gru.zero_grad()
        y = run(xs, hs)
        (y * weight * mask).sum().backward()
        return y * mask, [xs.grad, hs.grad] + [p.grad.clone() for p in gru.parameters()]

    plan = plan_packing(lengths)
    y_pad, g_pad = grads(lambda xs, hs: gru(xs, hs)[0])
    y_pack, g_pack = grads(lambda xs, hs: unpack(packed_gru(gru, pack(xs, plan), hs, plan), plan, xs.size(1)))
    torch.testing.assert_close(y_pack, y_pad)
    for a, b in zip(g_pack, g_pad):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("model_cls,cfg", [(GRUDecoder, CFG), (TripleGRUDecoder, TRIPLE)])
def test_a_decoder_given_lengths_equals_its_padded_forward_inside_each_trial(model_cls, cfg):
    torch.manual_seed(1)
    model = model_cls(cfg, n_days=2).double().train()
    bins = torch.tensor([30, 11, 23, 4])  # the last trial has one output (4 bins, patch 4)
    x = torch.randn(4, 30, 512, dtype=torch.float64)
    day_idx = torch.tensor([1, 0, 0, 1])
    out_len = output_lengths(bins, cfg.patch_size, cfg.patch_stride)
    mask = (torch.arange(int(out_len.max()))[None, :] < out_len[:, None])[..., None]
    kwargs = {"mode": "full"} if model_cls is TripleGRUDecoder else {}

    def run(**extra):
        model.zero_grad()
        outs = model(x, day_idx, **kwargs, **extra)
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum((o * mask).pow(2).sum() for o in outs).backward()
        return [o * mask for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    outs_pad, grads_pad = run()
    outs_pack, grads_pack = run(lengths=out_len)
    for a, b in zip(outs_pack, outs_pad):
        torch.testing.assert_close(a, b)
    if model_cls is TripleGRUDecoder:  # the trainer's mode: the two heads of the full forward
        with torch.no_grad():
            heads = model(x, day_idx, mode="heads", lengths=out_len)
        assert len(heads) == 2
        for a, b in zip(heads, outs_pack):
            torch.testing.assert_close(a * mask, b)
    assert grads_pack.keys() == grads_pad.keys()
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], msg=name)


def test_packed_training_rejects_lengths_that_do_not_fit_the_batch():
    model = GRUDecoder(CFG, n_days=1)
    x = torch.randn(2, 10, 512)
    with pytest.raises(ValueError, match="do not fit"):
        model(x, torch.tensor([0, 0]), lengths=torch.tensor([4, 9]))  # 10 bins give 4 outputs
    with pytest.raises(ValueError, match="at least one step"):
        plan_packing(torch.tensor([3, 0]))


def test_under_bf16_autocast_the_packed_decoder_trains_in_bf16_close_to_float32():
    torch.manual_seed(2)
    model = GRUDecoder(CFG, n_days=1).train()
    x, day_idx, lengths = torch.randn(3, 20, 512), torch.zeros(3, dtype=torch.long), torch.tensor([9, 5, 2])
    mask = (torch.arange(9)[None, :] < lengths[:, None])[..., None]

    def run(bf16: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x, day_idx, lengths=lengths)
        (logits.float() * mask).pow(2).sum().backward()
        return logits, model.gru.weight_hh_l0.grad.clone()

    (full, g_full), (half, g_half) = run(False), run(True)
    assert half.dtype == torch.bfloat16 and model.gru.weight_hh_l0.grad.dtype == torch.float32
    torch.testing.assert_close(half.float() * mask, full * mask, rtol=0.05, atol=0.05)
    assert torch.nn.functional.cosine_similarity(g_half.flatten(), g_full.flatten(), dim=0) > 0.99
