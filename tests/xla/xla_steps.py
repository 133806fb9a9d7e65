"""One XLA-test scenario in a fresh process: ``python tests/xla/xla_steps.py SPEC.json OUT_PREFIX``.

Why a process per scenario: torch_xla replaces ``torch.nn.GRU`` by its scan-based GRU when it is
imported (that GRU runs only on XLA tensors), and torch_xla 2.9's scan keeps one traced step
function per input shape and dtype but not per autocast state, so a bf16-autocast run and an
fp32 run with the same batch size in one process share a trace (measured: a wrong fp32 loss
after bf16, an HLO "mixed precision" error the other way round). One process per scenario is
also how training runs, and it makes the compile counts independent of test order. The eager
scenarios never import torch_xla, so they use torch's own GRU, as the main environment does.

Modes (``spec["mode"]``):

``forward``: build a GRUDecoder and a TripleGRUDecoder (seeded), run them on ``spec["device"]``
on seeded inputs (eval mode, fp32), or with the weights and inputs of ``spec["init_from"]`` (an
earlier run's file). Writes ``OUT.pt`` with the state dicts, inputs and logits.

``train``: build a :class:`b2txt.training.trainer.Trainer` from ``spec["train"]`` on ``spec["data"]`` /
``spec["manifest"]`` and run ``spec["steps"]`` training steps. Writes ``OUT.pt`` (the initial
and final model states, on CPU) and ``OUT.json``: losses, wall time of each step, XLA compilations after
each step (``CompileTime`` count of ``torch_xla.debug.metrics``), the unpadded length of each
batch (replayed from a copy of the batch sampler, whose random state nothing else touches), bf16
in effect, the GRU class, and the CPU fallbacks XLA took.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("B2TXT_PROGRESS", "0")

import torch  # noqa: E402


def compiles() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return 0 if data is None else int(data[0])


def device_of(name: str) -> torch.device:
    if name == "xla":
        import torch_xla

        return torch_xla.device()
    return torch.device(name)


def forward(spec: dict, out: str) -> None:
    from b2txt.ground.config import ModelConfig
    from b2txt.models.decoders import GRUDecoder, TripleGRUDecoder

    dev = device_of(spec["device"])
    torch.manual_seed(spec.get("seed", 0))
    common = dict(n_units=48, n_layers=2, rnn_dropout=0.4, input_dropout=0.2, patch_size=14, patch_stride=4)
    models = {"gru": GRUDecoder(ModelConfig(**common), n_days=3, neural_dim=512),
              "triple": TripleGRUDecoder(ModelConfig(architecture="triple", **common, noise_units=24, noise_layers=1,
                                                     noisy_units=24, noisy_layers=1), n_days=3, neural_dim=512)}
    x = torch.randn(3, spec.get("n_bins", 150), 512)
    day = torch.tensor([0, 2, 1])
    ref = torch.load(spec["init_from"], weights_only=True) if spec.get("init_from") else None
    if ref is not None:  # the same weights and inputs as another run
        x, day = ref["x"], ref["day"]
    result = {"x": x, "day": day}
    for name, model in models.items():
        if ref is not None:
            model.load_state_dict(ref[f"{name}.state"])
        model = model.to(dev).eval()
        with torch.no_grad():
            if name == "gru":
                logits, hidden = model(x.to(dev), day.to(dev), return_state=True)
                result[f"{name}.hidden"] = hidden.cpu()
                result[f"{name}.logits"] = logits.cpu()
            else:
                clean, noisy, noise = model(x.to(dev), day.to(dev), mode="full")
                result[f"{name}.logits"] = clean.cpu()
                result[f"{name}.noisy"] = noisy.cpu()
                result[f"{name}.noise"] = noise.cpu()
        result[f"{name}.state"] = {k: v.cpu() for k, v in model.state_dict().items()}
        gru = model.gru if name == "gru" else model.clean_speech_model.gru
        result[f"{name}.gru_class"] = type(gru).__module__ + "." + type(gru).__name__
    torch.save(result, out + ".pt")


def train(spec: dict, out: str) -> None:
    from b2txt.ground.config import TrainConfig
    from b2txt.training.trainer import Trainer

    cfg = TrainConfig.model_validate(spec["train"])
    trainer = Trainer(cfg, spec["data"], spec["manifest"], Path(out + ".model"), log=lambda msg: None)
    xla = trainer.device.type == "xla"
    sampler = copy.deepcopy(trainer.sampler)  # replays the batches the trainer will draw
    init = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    losses, seconds, counts = [], [], []
    try:
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            losses.append(trainer.train_step())  # returns after loss.item(): the step has run
            seconds.append(time.perf_counter() - t0)
            counts.append(compiles() if xla else 0)
    finally:
        trainer.close()
    feats = trainer.train_store.features
    lengths = [max(feats[i].shape[0] for i in sampler.next_batch()) for _ in range(spec["steps"])]
    model = trainer.model
    gru = model.gru if hasattr(model, "gru") else model.clean_speech_model.gru
    info = {
        "device": str(trainer.device), "bf16": trainer.bf16,
        "gru_class": type(gru).__module__ + "." + type(gru).__name__,
        "losses": losses, "step_seconds": seconds, "compiles_after_step": counts, "batch_max_bins": lengths,
        "xla_pad_multiple": cfg.xla_pad_multiple, "torch": torch.__version__,
    }
    if xla:
        import torch_xla.debug.metrics as met

        info["cpu_fallbacks"] = sorted(met.executed_fallback_ops())
        # the dtype the model computes in under the trainer's autocast (after the counts above)
        x = torch.zeros(2, 200, feats[0].shape[1], device=trainer.device)
        with torch.no_grad(), torch.autocast("xla", dtype=torch.bfloat16, enabled=trainer.bf16):
            out_t = model(x, torch.zeros(2, dtype=torch.long, device=trainer.device))
        info["logits_dtype"] = str((out_t[0] if isinstance(out_t, tuple) else out_t).dtype)
    torch.save({"init": init, "final": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, out + ".pt")
    Path(out + ".json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    {"forward": forward, "train": train}[spec["mode"]](spec, sys.argv[2])
