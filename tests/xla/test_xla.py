"""The TPU code path (``device: xla``) run for real on XLA:CPU (``PJRT_DEVICE=CPU``).

Run by ``make test-xla`` in ``.venv-xla`` (torch 2.9.0 + torch_xla 2.9.0); skipped elsewhere.
Each scenario runs in its own process (``xla_steps.py`` says why); the eager references run in
processes that never import torch_xla. Models are tiny: XLA:CPU steps are 10-25x slower than eager
and every new shape costs a compilation of seconds.

Tolerances (fp32 unless said otherwise):

* forward, XLA vs eager: ``atol 1e-5, rtol 1e-5`` on logits of magnitude ~1 (measured ≤ ~1e-6:
  only summation order differs; XLA:CPU computes f32 dots in f32).
* training steps (GRU), XLA fp32 vs eager fp32: per-step loss within ``rtol 1e-4``; final weights:
  ‖θ_xla − θ_eager‖ / ‖θ_eager − θ_0‖ ≤ 1e-3 (the difference relative to how far training moved).
* training steps (GRU and triple), XLA bf16 autocast vs eager fp32: per-step loss within
  ``rtol 1e-2`` and weights within 5e-2 by the same measure. bf16 keeps 8 significant bits
  (relative rounding 2^-9 ≈ 0.2 % per operation); a few steps accumulate well under 1 %, while
  a wrong gradient or update moves the loss by far more (it falls by >40 % over these steps). The bf16 run must also
  differ from the XLA fp32 run, or autocast did nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torch_xla", reason="needs torch_xla: run `make test-xla` "
                    "(builds .venv-xla with torch 2.9.0 + torch_xla 2.9.0)")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MAIN_PY = Path(os.environ.get("B2TXT_MAIN_PYTHON", ROOT / ".venv" / "bin" / "python"))
B2TXT = Path(sys.executable).parent / "b2txt"  # the CLI of .venv-xla

STEPS, WARMUP = 8, 2  # training steps per scenario; steps after which the compile count must stay
TRAIN = {
    "seed": 1, "model": {"n_units": 32, "n_layers": 2, "rnn_dropout": 0.0, "input_dropout": 0.0},
    # no dropout: XLA draws its dropout masks from its own generator, so runs could not be compared
    "num_training_batches": 100, "batch_size": 4, "days_per_batch": 2,
    "lr_warmup_steps": 2, "lr_decay_steps": 100, "lr_warmup_steps_day": 2, "lr_decay_steps_day": 100,
    "threads": 1,  # eager on one thread (XLA:CPU uses its own thread pool; only CPU fallbacks see this)
    "holdout_sessions": [],  # every session trains (the built-in default holds the last one out)
}
ARCH = {"gru": {}, "triple": {"architecture": "triple", "noise_units": 16, "noise_layers": 1,
                              "noisy_units": 16, "noisy_layers": 1}}
FWD_TOL = dict(atol=1e-5, rtol=1e-5)
LOSS_RTOL_FP32, WEIGHTS_FP32 = 1e-4, 1e-3
LOSS_RTOL_BF16, WEIGHTS_BF16 = 1e-2, 5e-2


def env() -> dict[str, str]:
    return {**os.environ, "PJRT_DEVICE": "CPU", "B2TXT_PROGRESS": "0"}


def run(cmd: list, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env(), **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, bucket_data):
    """Runs a named scenario once (xla_steps.py in a fresh process); returns (info, tensors)."""
    tmp = tmp_path_factory.mktemp("scenarios")
    data, manifest = bucket_data

    @cache
    def get(name: str, **spec) -> tuple[dict, dict]:
        spec = {**spec, "data": str(data), "manifest": str(manifest)}
        if "train" in spec:  # passed as JSON text: cached calls need hashable arguments
            spec["train"] = json.loads(spec["train"])
        if "init_from" in spec:
            spec["init_from"] = str(tmp / f"{spec['init_from']}.pt")
        (tmp / f"{name}.spec.json").write_text(json.dumps(spec))
        run([sys.executable, HERE / "xla_steps.py", tmp / f"{name}.spec.json", tmp / name], cwd=ROOT)
        info = json.loads((tmp / f"{name}.json").read_text()) if (tmp / f"{name}.json").exists() else {}
        return info, torch.load(tmp / f"{name}.pt", weights_only=True)

    return get


def train_scenario(scenario, name: str, arch: str = "gru", **train) -> tuple[dict, dict]:
    cfg = {**TRAIN, "model": {**TRAIN["model"], **ARCH[arch]}, **train}
    return scenario(f"{arch}-{name}", mode="train", steps=STEPS, train=json.dumps(cfg))


def trainings(scenario, arch: str = "gru") -> dict[str, tuple[dict, dict]]:
    """Eager fp32, XLA bf16 (the default on XLA) and, for the GRU, XLA fp32 training runs."""
    runs = {"eager": train_scenario(scenario, "eager-fp32", arch, device="cpu", amp="off"),
            "xla16": train_scenario(scenario, "xla-bf16", arch, device="xla", amp="auto")}
    if arch == "gru":
        runs["xla32"] = train_scenario(scenario, "xla-fp32", arch, device="xla", amp="off")
    return runs


def rel_weight_diff(run: dict, ref: dict) -> float:
    """‖θ_run − θ_ref‖ / ‖θ_ref − θ_0‖ over all parameters."""
    num = sum(float(((run["final"][k] - ref["final"][k]).double() ** 2).sum()) for k in ref["final"])
    den = sum(float(((ref["final"][k] - ref["init"][k]).double() ** 2).sum()) for k in ref["final"])
    return (num / den) ** 0.5


# ----------------------------------------------------------------------------- forward passes

@pytest.mark.parametrize("arch", ["gru", "triple"])
def test_forward_equals_eager(scenario, report, arch):
    _, eager = scenario("forward-eager", mode="forward", device="cpu")
    _, xla = scenario("forward-xla", mode="forward", device="xla", init_from="forward-eager")
    # torch_xla swaps nn.GRU for its scan-based GRU on import; the eager side has torch's own
    assert eager[f"{arch}.gru_class"] == "torch.nn.modules.rnn.GRU"
    assert xla[f"{arch}.gru_class"] == "torch_xla.experimental.gru.GRU"
    keys = ["logits", "hidden"] if arch == "gru" else ["logits", "noisy", "noise"]
    diffs = {}
    for key in keys:
        a, b = eager[f"{arch}.{key}"], xla[f"{arch}.{key}"]
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        assert a.abs().max() > 0.1  # not a degenerate output
        torch.testing.assert_close(b, a, **FWD_TOL, msg=lambda m, k=key: f"{arch} {k}: {m}")
        diffs[key] = float((a - b).abs().max())
    report[f"forward {arch}: max |xla - eager| (tolerance atol {FWD_TOL['atol']:g} + rtol {FWD_TOL['rtol']:g})"] = diffs


# ----------------------------------------------------------------------------- training steps

@pytest.mark.parametrize("arch", ["gru", "triple"])
def test_training_steps_follow_eager(scenario, report, arch):
    runs = trainings(scenario, arch)
    (e, e_w), (x16, x16_w) = runs["eager"], runs["xla16"]
    assert e["device"] == "cpu" and not e["bf16"] and e["gru_class"] == "torch.nn.modules.rnn.GRU"
    assert x16["device"] == "xla:0" and x16["bf16"] and x16["logits_dtype"] == "torch.bfloat16"
    assert x16["gru_class"] == "torch_xla.experimental.gru.GRU"
    eager_loss = np.array(e["losses"])
    assert eager_loss[-1] < 0.6 * eager_loss[0], "the reference run does not train"

    loss16 = np.abs(np.array(x16["losses"]) - eager_loss) / eager_loss
    w16 = rel_weight_diff(x16_w, e_w)
    report[f"training {arch}, XLA bf16 vs eager fp32"] = {
        "max loss rel diff": float(loss16.max()), "weights rel diff": w16, "tolerances": [LOSS_RTOL_BF16, WEIGHTS_BF16]}
    report[f"training {arch}, losses (eager fp32, XLA bf16)"] = [[round(v, 4) for v in r[0]["losses"]]
                                                                for r in (runs["eager"], runs["xla16"])]
    assert loss16.max() <= LOSS_RTOL_BF16, loss16
    assert w16 <= WEIGHTS_BF16
    if arch != "gru":
        return
    x32, x32_w = runs["xla32"]
    assert x32["device"] == "xla:0" and not x32["bf16"] and x32["logits_dtype"] == "torch.float32"
    loss32 = np.abs(np.array(x32["losses"]) - eager_loss) / eager_loss
    w32 = rel_weight_diff(x32_w, e_w)
    report[f"training {arch}, XLA fp32 vs eager fp32"] = {
        "max loss rel diff": float(loss32.max()), "weights rel diff": w32, "tolerances": [LOSS_RTOL_FP32, WEIGHTS_FP32]}
    assert loss32.max() <= LOSS_RTOL_FP32, loss32
    assert w32 <= WEIGHTS_FP32
    # bf16 autocast changed the numbers (else it did not take effect)
    assert np.abs(np.array(x16["losses"]) - np.array(x32["losses"])).max() > 1e-6 * eager_loss.max()
    assert rel_weight_diff(x16_w, x32_w) > 1e-6


# ----------------------------------------------------------------------------- compilations

def test_no_recompilation_inside_a_padding_bucket(scenario, report):
    info, _ = trainings(scenario)["xla16"]
    eager, _ = trainings(scenario)["eager"]
    counts, lengths, m = info["compiles_after_step"], info["batch_max_bins"], info["xla_pad_multiple"]
    # the data set's trials are 133-190 bins, the random cut takes at most 2: one bucket (192)
    assert m == 64 and all(128 + 3 <= n <= 192 for n in lengths), lengths
    assert counts[0] > 0, "the first step compiled nothing: the counter does not count"
    after = lengths[WARMUP:]
    assert len(set(after)) >= 2 and set(after) - set(lengths[:WARMUP]), f"no new lengths after warm-up: {lengths}"
    assert counts[WARMUP:] == [counts[WARMUP - 1]] * (STEPS - WARMUP), \
        f"new compilations after warm-up: counts {counts} for batch lengths {lengths}"

    # control: the same steps without padding (multiple 1) compile again for new lengths
    plain, _ = train_scenario(scenario, "xla-bf16-unpadded", device="xla", amp="auto", xla_pad_multiple=1)
    assert plain["batch_max_bins"] == lengths
    assert plain["compiles_after_step"][-1] > plain["compiles_after_step"][WARMUP - 1], plain["compiles_after_step"]

    steady = float(np.median(info["step_seconds"][WARMUP + 1:]))
    eager_steady = float(np.median(eager["step_seconds"][WARMUP + 1:]))
    report["compilations after each step, padded to 64 (bucket 192)"] = counts
    report["compilations after each step, unpadded"] = plain["compiles_after_step"]
    report["batch lengths (bins, before the random cut)"] = lengths
    report["first step (s, XLA bf16; compiles)"] = round(info["step_seconds"][0], 2)
    report["steady step (s): XLA:CPU bf16, XLA:CPU fp32, eager fp32"] = [
        round(steady, 3), round(float(np.median(trainings(scenario)["xla32"][0]["step_seconds"][WARMUP + 1:])), 3),
        round(eager_steady, 3)]
    report["XLA:CPU bf16 / eager step time"] = round(steady / eager_steady, 1)
    report["CPU fallbacks on XLA"] = info["cpu_fallbacks"]
    report["cores, load average (1, 5 min) at the end"] = [os.cpu_count(), *os.getloadavg()[:2]]


# ----------------------------------------------------------------------------- b2txt train --device xla

SENTENCES = ["the cat sat on the mat", "i like green apples", "we went home early", "she reads a good book",
             "the sun is very warm", "open the door please", "they play music at night", "my dog runs fast",
             "he drinks cold water", "the bird can sing"]
CONFIGS = ["--config", ROOT / "config/config.yaml", "--config", ROOT / "config/model/baseline.yaml",
           "--config", ROOT / "tests/configs/tiny.yaml"]


@pytest.fixture(scope="module")
def xla_model(tmp_path_factory) -> tuple[Path, Path, Path]:
    """`b2txt train --device xla` on the tiny config and tiny simulated data: (model, data, manifest)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "sentences.txt").write_text("\n".join(SENTENCES) + "\n")
    run([B2TXT, "simulate", *CONFIGS, "--out", tmp / "data", "--sentences", tmp / "sentences.txt"])
    run([B2TXT, "preprocess", "--data", tmp / "data", "--out", tmp / "manifest.csv"])
    run([B2TXT, "train", *CONFIGS, "--data", tmp / "data", "--manifest", tmp / "manifest.csv",
         "--out", tmp / "model", "--device", "xla"])
    return tmp / "model", tmp / "data", tmp / "manifest.csv"


def test_b2txt_train_on_xla_loads_in_main_environment(xla_model, tmp_path, report):
    from b2txt.data.logits import read_logits

    model, data, manifest = xla_model
    assert (model / "checkpoint" / "best_checkpoint").is_file() and (model / "checkpoint" / "args.yaml").is_file()
    log = (model / "training_log").read_text()
    assert "device xla:0, bf16 True" in log, log
    assert MAIN_PY.is_file(), f"{MAIN_PY}: the main environment is missing (make bootstrap)"
    main_b2txt = MAIN_PY.parent / "b2txt"
    infer = ["infer", "--model", model, "--data", data, "--manifest", manifest, "--split", "val",
             "--known-sessions-only"]
    # the main environment (torch 2.13, no torch_xla) loads the checkpoint and runs it eagerly
    version = run([MAIN_PY, "-c", "import torch, importlib.util as u; print(torch.__version__, "
                   "u.find_spec('torch_xla') is not None)"]).stdout.split()
    assert version[1] == "False" and not version[0].startswith("2.9"), version
    run([main_b2txt, *infer, "--out", tmp_path / "main.hdf5", "--device", "cpu"])
    # references from this environment: eager (torch 2.9, torch_xla never imported) and on XLA
    run([B2TXT, *infer, "--out", tmp_path / "eager.hdf5", "--device", "cpu"])
    run([B2TXT, *infer, "--out", tmp_path / "xla.hdf5", "--device", "xla"])
    main, eager, xla = (read_logits(tmp_path / f"{n}.hdf5") for n in ("main", "eager", "xla"))
    assert len(main) == len(eager) == len(xla) > 0
    d_eager = d_xla = 0.0
    for a, b, c in zip(main, eager, xla):
        assert a.logits.shape == b.logits.shape == c.logits.shape and a.logits.shape[0] > 0
        np.testing.assert_allclose(a.logits, b.logits, **FWD_TOL)
        np.testing.assert_allclose(a.logits, c.logits, **FWD_TOL)
        d_eager = max(d_eager, float(np.abs(a.logits - b.logits).max()))
        d_xla = max(d_xla, float(np.abs(a.logits - c.logits).max()))
    report["b2txt train --device xla (tiny): val logits, main env vs eager 2.9 / vs XLA"] = [d_eager, d_xla]
    report["b2txt train --device xla (tiny): log"] = [line for line in log.splitlines() if "batches/s" in line]


def test_xla_checkpoint_loads_without_map_location(xla_model):
    """Checkpoints hold CPU tensors: published tools load them with a plain torch.load, no torch_xla."""
    model, _, _ = xla_model
    code = ("import sys, torch; c = torch.load(sys.argv[1], weights_only=True); "
            "print(sorted({str(v.device) for v in c['model_state_dict'].values()}))")
    out = run([MAIN_PY, "-c", code, model / "checkpoint" / "best_checkpoint"]).stdout.strip()
    assert out == "['cpu']", out
