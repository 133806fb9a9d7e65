"""GRUDecoder against an independent computation of REFERENCE §3, and model-directory I/O."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from b2txt.ground.config import ModelConfig, load_config
from b2txt.ground.errors import B2txtError
from b2txt.models.checkpoint import load_model
from b2txt.models.decoders import GRUDecoder, output_lengths
from b2txt.models.inference import run_model

CFG = ModelConfig(n_units=12, n_layers=2, patch_size=5, patch_stride=3)
N_DAYS = 3


def reference_forward(sd: dict, x: np.ndarray, day: int, cfg: ModelConfig) -> np.ndarray:
    """REFERENCE §3 written out with numpy loops, from the state dict alone."""
    sd = {k: v.detach().double().numpy() for k, v in sd.items()}
    h = x.astype(np.float64) @ sd[f"day_weights.{day}"] + sd[f"day_biases.{day}"]
    h = h / (1 + np.abs(h))  # softsign
    n_out = (len(h) - cfg.patch_size) // cfg.patch_stride + 1
    seq = np.stack([h[t * cfg.patch_stride: t * cfg.patch_stride + cfg.patch_size].reshape(-1)
                    for t in range(n_out)])  # time-major patches
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for layer in range(cfg.n_layers):
        w_ih, w_hh = sd[f"gru.weight_ih_l{layer}"], sd[f"gru.weight_hh_l{layer}"]
        b_ih, b_hh = sd[f"gru.bias_ih_l{layer}"], sd[f"gru.bias_hh_l{layer}"]
        state = sd["h0"][0, 0].copy()
        outs = []
        for xt in seq:
            gi, gh = w_ih @ xt + b_ih, w_hh @ state + b_hh
            H = len(state)
            r = sigmoid(gi[:H] + gh[:H])
            z = sigmoid(gi[H:2 * H] + gh[H:2 * H])
            n = np.tanh(gi[2 * H:] + r * gh[2 * H:])
            state = (1 - z) * n + z * state
            outs.append(state)
        seq = np.stack(outs)
    return seq @ sd["out.weight"].T + sd["out.bias"]


def randomised_model(seed=0) -> GRUDecoder:
    torch.manual_seed(seed)
    model = GRUDecoder(CFG, N_DAYS).eval()
    with torch.no_grad():  # move day layers away from identity so the day index matters
        for w, b in zip(model.day_weights, model.day_biases):
            w.add_(0.05 * torch.randn_like(w))
            b.add_(0.1 * torch.randn_like(b))
    return model


def test_parameter_names_and_shapes_match_the_published_checkpoint():
    paper = load_config(Path(__file__).parents[1] / "config" / "model" / "paper.yaml").train.model
    model = GRUDecoder(paper, n_days=2)
    sd = model.state_dict()
    expected = {"h0", "out.weight", "out.bias", "day_weights.0", "day_weights.1", "day_biases.0", "day_biases.1"}
    expected |= {f"gru.{k}_l{i}" for i in range(5) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    assert set(sd) == expected
    assert sd["day_weights.1"].shape == (512, 512) and torch.equal(sd["day_weights.1"], torch.eye(512))
    assert sd["day_biases.0"].shape == (1, 512) and not sd["day_biases.0"].any()
    assert sd["gru.weight_ih_l0"].shape == (3 * 768, 14 * 512)
    assert sd["h0"].shape == (1, 1, 768)
    assert sd["out.weight"].shape == (41, 768)


def test_forward_equals_independent_computation():
    model = randomised_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 23, 512)).astype(np.float32)
    days = [2, 0]
    with torch.no_grad():
        got = model(torch.from_numpy(x), torch.tensor(days)).numpy()
    for b, day in enumerate(days):
        want = reference_forward(model.state_dict(), x[b], day, CFG)
        assert got[b].shape == want.shape == (output_lengths(23, 5, 3), 41)
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4)


def test_batched_inference_equals_one_trial_at_a_time():
    model = randomised_model(1)
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(n, 512)).astype(np.float32) for n in (9, 30, 17, 5, 44)]
    days = [0, 1, 2, 1, 0]
    from b2txt.models.transforms import gaussian_kernel

    k = gaussian_kernel(2.0)
    one = run_model(model, feats, days, k, torch.device("cpu"), batch_size=1)
    many = run_model(model, feats, days, k, torch.device("cpu"), batch_size=4)
    for a, b, f in zip(one, many, feats):
        assert a.shape == (output_lengths(f.shape[0], 5, 3), 41)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def write_published_dir(tmp_path, model: GRUDecoder, prefix: str = "") -> None:
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir(parents=True)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": sd, "optimizer_state_dict": {}, "scheduler_state_dict": {},
                "val_PER": 0.5, "val_loss": 1.0}, ckpt / "best_checkpoint")
    args = {"model": {"n_input_features": 512, "n_units": CFG.n_units, "n_layers": CFG.n_layers,
                      "rnn_dropout": 0.4, "patch_size": CFG.patch_size, "patch_stride": CFG.patch_stride,
                      "input_network": {"input_layer_dropout": 0.2}},
            "dataset": {"sessions": ["t15.2023.08.11", "t15.2023.08.13", "t15.2023.08.18"], "n_classes": 41,
                        "data_transforms": {"smooth_data": True, "smooth_kernel_std": 2, "smooth_kernel_size": 100}}}
    (ckpt / "args.yaml").write_text(yaml.safe_dump(args))


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module."])
def test_published_layout_loads_with_any_key_prefix(tmp_path, prefix):
    model = randomised_model(2)
    write_published_dir(tmp_path, model, prefix)
    loaded = load_model(tmp_path)
    assert loaded.sessions[1] == "t15.2023.08.13"
    x = torch.randn(1, 40, 512)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, torch.tensor([1])), model(x, torch.tensor([1])))


class NotAllowed:
    pass


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    model = randomised_model(3)
    write_published_dir(tmp_path, model)
    torch.save({"model_state_dict": model.state_dict(), "evil": NotAllowed()},
               tmp_path / "checkpoint" / "best_checkpoint")
    with pytest.raises(B2txtError, match="cannot load checkpoint safely"):
        load_model(tmp_path)


def test_missing_or_mismatched_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(B2txtError, match="best_checkpoint"):
        load_model(tmp_path)
    model = randomised_model(4)
    write_published_dir(tmp_path, model)
    args = yaml.safe_load((tmp_path / "checkpoint" / "args.yaml").read_text())
    args["model"]["n_units"] = 99
    (tmp_path / "checkpoint" / "args.yaml").write_text(yaml.safe_dump(args))
    with pytest.raises(B2txtError, match="do not match"):
        load_model(tmp_path)


@pytest.mark.parametrize("std", [1, 2, 3.5])
def test_smoothing_equals_the_depthwise_convolution_it_replaces(std):
    """The CPU's shifted-sum smoothing is the published depthwise conv1d ('same' zero padding), to the bit."""
    import torch.nn.functional as F

    from b2txt.models.transforms import gaussian_kernel, smooth

    k = gaussian_kernel(std)
    x = torch.randn(3, 57, 512, generator=torch.Generator().manual_seed(0))
    ref = F.conv1d(x.transpose(1, 2), k.view(1, 1, -1).expand(512, 1, -1), padding=k.numel() // 2, groups=512)
    assert torch.equal(smooth(x, k), ref.transpose(1, 2))


def test_pad_batch_keeps_each_trial_and_zeros_the_rest():
    from b2txt.models.transforms import pad_batch

    rng = np.random.default_rng(0)
    trials = [rng.normal(size=(n, 7)).astype(np.float32) for n in (5, 9, 1)]
    x, lengths = pad_batch(trials)
    assert x.dtype == torch.float32 and x.shape == (3, 9, 7) and lengths.tolist() == [5, 9, 1]
    for i, t in enumerate(trials):
        assert np.array_equal(x[i, : len(t)].numpy(), t) and not x[i, len(t):].any()
