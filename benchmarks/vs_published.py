"""The published trainer and ours side by side: ms per training batch on the same data (issue 17).

Issue 17 asks that the default trainer stay at least 1.5x faster per batch than the published
trainer on the paper model (5 layers x 768 units, batch 64). This benchmark simulates the default
data set once (as benchmarks/accuracy.py does: the simulate section of config/config.yaml with
``--sim-seed``; the last session held out, so both train on the first 7 sessions) and times, one
process at a time (never two at once: they would share the cores):

    published     the published trainer, ``BrainToTextDecoder_Trainer`` of
                  ``model_training/rnn_trainer.py`` in the checkout ``--published DIR``, configured
                  by its own ``rnn_args.yaml`` (OmegaConf) with these overrides: model size, batch
                  size, the simulated sessions and data directory, outputs in a temp dir, no
                  checkpoints, no AMP (float32 on the CPU, as ours), ``num_training_batches`` =
                  warm-up + measured batches + 1, and ``--published-workers`` data loader workers
                  (default: its own 4). It runs under ``--published-python`` (default: this
                  interpreter), which needs torch, numpy, scipy, h5py and omegaconf.
    today         b2txt.training.trainer.Trainer as configured (config/config.yaml + the baseline
                  preset at ``--model-size`` and ``--batch-size``)
    packed        ours with ``packed: true`` and random batches in one part (the CPU default:
                  the GRUs run on each trial's real steps only)
    no-bucketing  ours with ``packed: false, length_bucketing: false, length_chunks: 1``: each
                  random batch padded at once (the published trainer's padding)
    bucketing     ours with ``packed: false, length_bucketing: true, length_chunks: 1`` (the
                  default before length_chunks: each batch's trials from one length quantile)
    chunks-2/4    ours with ``packed: false, length_bucketing: false, length_chunks: K`` (each
                  batch trained as K length-sorted parts, each padded to its own length; 4 was
                  the CPU default before packing)

and prints per trainer the ms per batch (median and mean over the ``--batches`` measured batches,
after ``--warmup`` batches), the padding share of the batches' bins and the ratio published/ours.
A variant whose config is today's is not run twice (a note says so). Other processes on the cores slow both sides unevenly: the load
average after each run is printed beside its per-batch times.

What a batch's time holds. Published: one pass of its training loop, from asking the data loader
for the batch to asking for the next one (waiting for the batch, augmentation, smoothing,
forward, backward, clipping, optimizer and scheduler step). Ours: ``trainer.stats`` (``data_s +
compute_s``) per ``train_step()``: sampling, padding, augmentation, smoothing and the same
forward/backward/step. Both set torch to ``--threads`` threads (``torch.set_num_threads`` and
``OMP_NUM_THREADS``) and see no GPU.

How the published trainer is run. The benchmark writes a driver script to a temp dir that
imports the published module and changes only what is around a training step:

- ``torch.compile`` is the identity unless ``--published-compile on``: the published code
  compiles its model, which on a CPU made its steps slower (measured on this project's 2-core
  machine: 13.3 vs 9.3 s per paper-model batch) and costs minutes of compiling; off is the
  stricter comparison.
- its ``validation`` is replaced by a stub (it would run at batch 0, outside the timed batches;
  skipping it saves minutes), and the loop is stopped after the last measured batch.
- its data loader is wrapped to take the time of each request and the padding of each batch.
- ``torchaudio.functional`` (the published module imports it for edit distance only, in its
  validation): when the published Python has no torchaudio (none on PyPI matches torch 2.13),
  the temp dir gets a shim package ``torchaudio`` whose ``functional.edit_distance`` is a plain
  Levenshtein distance, on the driver's path only. It is no part of b2txt.

    PYTHONPATH=src python3 benchmarks/vs_published.py --published DIR [--published-python PY]
        [--model-size 5x768] [--batch-size 64] [--batches 6] [--warmup 2] [--threads 2]
        [--variants today packed no-bucketing bucketing chunks-2 chunks-4] [--sim-seed 11] [--sentences FILE]
        [--published-workers N] [--published-compile off|on]

``--published DIR`` is a checkout of https://github.com/Neuroprosthetics-Lab/nejm-brain-to-text
(the directory holding ``model_training/``), which the user supplies. A paper-model batch takes
several seconds on 2 CPU cores, so the default run takes several minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import sentences_file, simulated  # noqa: E402  (benchmarks/ is no package)

VARIANTS: dict[str, dict] = {
    "today": {},
    "packed": {"length_bucketing": False, "length_chunks": 1, "packed": True},
    "no-bucketing": {"length_bucketing": False, "length_chunks": 1, "packed": False},
    "bucketing": {"length_bucketing": True, "length_chunks": 1, "packed": False},
    "chunks-2": {"length_bucketing": False, "length_chunks": 2, "packed": False},
    "chunks-4": {"length_bucketing": False, "length_chunks": 4, "packed": False},
}
PUBLISHED_NEEDS = ["torch", "numpy", "scipy", "h5py", "omegaconf"]

# torchaudio.functional for the published module's one import (edit distance in its validation)
SHIM = '''"""Shim of torchaudio.functional.edit_distance for the published trainer (vs_published.py)."""


def edit_distance(seq1, seq2):
    a, b = list(seq1), list(seq2)
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]
'''

# Runs the published trainer for warm-up + measured batches and writes its per-batch times.
DRIVER = '''"""Driver of the published trainer for benchmarks/vs_published.py (generated; see there)."""
import json
import sys
import time

spec = json.load(open(sys.argv[1]))
sys.path.insert(0, spec["model_training"])
import torch

torch.set_num_threads(spec["threads"])
if not spec["compile"]:
    torch.compile = lambda model, *args, **kwargs: model
from omegaconf import OmegaConf

import rnn_trainer

args = OmegaConf.load(spec["model_training"] + "/rnn_args.yaml")
for key, value in spec["overrides"].items():
    OmegaConf.update(args, key, value, merge=False)
trainer = rnn_trainer.BrainToTextDecoder_Trainer(args)


class Done(Exception):
    pass


def no_validation(loader, return_logits=False, return_data=False):
    return {"avg_PER": 1.0, "avg_loss": 0.0, "day_PERs": {}}


class TimedLoader:
    """The published loader, noting when each batch is asked for and arrives, and its padding."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n
        self.asked, self.got, self.padding = [], [], []

    def __len__(self):
        return self.n

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.n):
            self.asked.append(time.perf_counter())
            batch = next(it)
            self.got.append(time.perf_counter())
            x, n = batch["input_features"], batch["n_time_steps"]
            self.padding.append(1 - float(n.sum()) / (x.shape[0] * x.shape[1]))
            yield batch
        self.asked.append(time.perf_counter())
        raise Done


trainer.validation = no_validation
timed = trainer.train_loader = TimedLoader(trainer.train_loader, spec["steps"])
try:
    trainer.train()
except Done:
    pass
step_s = [b - a for a, b in zip(timed.asked, timed.asked[1:])]
wait_s = [b - a for a, b in zip(timed.asked, timed.got)]
params = sum(p.numel() for p in trainer.model.parameters())
json.dump({"step_s": step_s, "wait_s": wait_s, "padding": timed.padding, "params": params,
           "device": str(trainer.device), "threads": torch.get_num_threads()}, open(spec["out"], "w"))
'''


def say(msg: str) -> None:
    print(msg, flush=True)


def fail(msg: str) -> None:
    print(f"vs_published: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def model_size(text: str) -> tuple[int, int]:
    try:
        layers, units = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--model-size {text!r}: expected LAYERSxUNITS, e.g. 5x768")
    return layers, units


def env_for(threads: int, pythonpath: list[str]) -> dict:
    """The same thread settings and no GPU for both sides."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
                "B2TXT_PROGRESS": "0"})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    return env


def published_dir(args: argparse.Namespace) -> Path:
    """The published trainer's folder, model_training/ of --published."""
    if args.published is None:
        fail("--published DIR is required: a checkout of https://github.com/Neuroprosthetics-Lab/nejm-brain-to-text")
    model_training = args.published / "model_training"
    for name in ("rnn_trainer.py", "rnn_args.yaml", "dataset.py", "rnn_model.py", "data_augmentations.py"):
        if not (model_training / name).is_file():
            fail(f"--published {args.published}: no model_training/{name} there; pass a checkout of "
                 "https://github.com/Neuroprosthetics-Lab/nejm-brain-to-text (the folder holding model_training/)")
    return model_training


def check_published_python(args: argparse.Namespace, shim_dir: Path) -> None:
    """Checks that the published trainer's Python can import what it needs; a torchaudio shim if not that."""
    probe = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    try:
        r = subprocess.run([args.published_python, "-c", probe, *PUBLISHED_NEEDS, "torchaudio"], capture_output=True,
                           text=True, env=env_for(args.threads, []))
    except OSError as e:
        fail(f"--published-python {args.published_python}: cannot run it ({e})")
    if r.returncode:
        fail(f"--published-python {args.published_python} failed: {r.stderr.strip()[-300:]}")
    missing = r.stdout.split()
    needed = [m for m in missing if m != "torchaudio"]
    if needed:
        fail(f"the published trainer's Python ({args.published_python}) cannot import {', '.join(needed)}: install "
             f"them there (e.g. `{args.published_python} -m pip install {' '.join(needed)}`); scipy and omegaconf are "
             "the published code's dependencies, not b2txt's")
    if "torchaudio" in missing:
        (shim_dir / "torchaudio").mkdir(parents=True)
        (shim_dir / "torchaudio" / "__init__.py").write_text('"""Shim for the published trainer (vs_published.py)."""\n')
        (shim_dir / "torchaudio" / "functional.py").write_text(SHIM)
        say(f"note: no torchaudio for {args.published_python}; the published module imports a shim from {shim_dir}")


def run_published(args: argparse.Namespace, model_training: Path, shim_dir: Path, data: Path, sessions: list[str],
                  tmp: Path) -> dict:
    layers, units = model_size(args.model_size)
    steps = args.warmup + args.batches
    overrides: dict = {
        "model.n_layers": layers, "model.n_units": units, "dataset.batch_size": args.batch_size,
        "dataset.dataset_dir": str(data / "hdf5_data_final"), "dataset.sessions": sessions,
        "dataset.dataset_probability_val": [1] * len(sessions),
        "output_dir": str(tmp / "published-out"), "checkpoint_dir": str(tmp / "published-out" / "checkpoint"),
        "save_best_checkpoint": False, "save_all_val_steps": False, "save_final_model": False,
        "save_val_metrics": False, "early_stopping": False, "log_individual_day_val_PER": False, "use_amp": False,
        "num_training_batches": steps + 1, "batches_per_val_step": 10**9, "batches_per_train_log": 10**9,
    }
    if args.published_workers is not None:
        overrides["dataset.num_dataloader_workers"] = args.published_workers
    spec = {"model_training": str(model_training), "threads": args.threads, "compile": args.published_compile == "on",
            "overrides": overrides, "steps": steps, "out": str(tmp / "published.json")}
    (tmp / "published-spec.json").write_text(json.dumps(spec))
    (tmp / "published_driver.py").write_text(DRIVER)
    cmd = [args.published_python, str(tmp / "published_driver.py"), str(tmp / "published-spec.json")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env_for(args.threads, [str(shim_dir)]))
    if r.returncode or not (tmp / "published.json").is_file():
        say(f"FAILED published (exit {r.returncode}):\n" + "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:]))
        return {"name": "published", "error": True}
    out = json.loads((tmp / "published.json").read_text())
    measured = slice(args.warmup, steps)
    return {"name": "published", "ms": [1000 * s for s in out["step_s"][measured]],
            "wait_ms": [1000 * s for s in out["wait_s"][measured]], "padding": float(np.mean(out["padding"][measured])),
            "params": out["params"], "device": out["device"], "threads": out["threads"],
            "wall_s": time.perf_counter() - t0}


def train_config(args: argparse.Namespace, variant: str):
    from b2txt.ground.config import TrainConfig, load_config, merge

    cfg = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "model" / "baseline.yaml"]).train
    layers, units = model_size(args.model_size)
    steps = args.warmup + args.batches
    over = {"num_training_batches": steps, "batches_per_val_step": 10**9, "batches_per_train_log": 10**9,
            "batches_per_checkpoint": 10**9, "device": "cpu", "threads": args.threads, "amp": "off",
            "early_stopping_val_steps": None, "batch_size": args.batch_size,
            "model": {"n_layers": layers, "n_units": units}}
    return TrainConfig.model_validate(merge(merge(cfg.model_dump(mode="json"), over), VARIANTS[variant]))


def one(args: argparse.Namespace) -> dict:
    """Our trainer for warm-up + measured batches (in its own process); per-batch times as JSON."""
    from b2txt.training.trainer import Trainer, new_stats

    cfg = train_config(args, args.one)
    with tempfile.TemporaryDirectory(prefix="vspub-ours-") as tmp:
        trainer = Trainer(cfg, args.data, args.manifest, Path(tmp) / "model", log=lambda m: None)
        try:
            for _ in range(args.warmup):
                trainer.train_step()
            trainer.stats = new_stats()
            ms, wait_ms = [], []
            for _ in range(args.batches):
                data_s, compute_s = trainer.stats["data_s"], trainer.stats["compute_s"]
                trainer.train_step()
                wait_ms.append(1000 * (trainer.stats["data_s"] - data_s))
                ms.append(wait_ms[-1] + 1000 * (trainer.stats["compute_s"] - compute_s))
        finally:
            trainer.close()
    st = trainer.stats
    import torch

    return {"name": args.one, "ms": ms, "wait_ms": wait_ms,
            "padding": st["padding"] / max(st["built"], 1), "params": sum(p.numel() for p in trainer.model.parameters()),
            "device": str(trainer.device), "threads": torch.get_num_threads()}


def run_ours(args: argparse.Namespace, variant: str, data: Path, manifest: Path, tmp: Path) -> dict:
    out = tmp / f"ours-{variant}.json"
    cmd = [sys.executable, __file__, "--one", variant, "--data", str(data), "--manifest", str(manifest),
           "--out", str(out), "--model-size", args.model_size, "--batch-size", str(args.batch_size),
           "--batches", str(args.batches), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env=env_for(args.threads, [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if r.returncode or not out.is_file():
        say(f"FAILED {variant} (exit {r.returncode}):\n" + "\n".join(r.stderr.strip().splitlines()[-15:]))
        return {"name": variant, "error": True}
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - t0}


def show(r: dict) -> None:
    if "error" not in r:
        say(f"  {r['name']:13s} ms per measured batch: {' '.join(f'{m:.0f}' for m in r['ms'])} "
            f"({r['threads']} torch threads; run {r['wall_s']:.0f} s; load average after it {os.getloadavg()[0]:.1f})")


def report(results: list[dict], args: argparse.Namespace) -> None:
    pub = next((r for r in results if r["name"] == "published" and "error" not in r), None)
    say(f"\nmodel {args.model_size}, batch {args.batch_size}, {args.threads} threads, CPU; {args.batches} batches "
        f"measured after {args.warmup}; published torch.compile {args.published_compile}")
    say(f"{'trainer':13s} {'params':>9s} {'median ms':>10s} {'mean ms':>9s} {'wait ms':>8s} {'padding':>8s} "
        f"{'pub/ours median':>16s} {'pub/ours mean':>14s}")
    for r in results:
        if "error" in r:
            say(f"{r['name']:13s} failed")
            continue
        med, mean = float(np.median(r["ms"])), float(np.mean(r["ms"]))
        ratio = (f"{np.median(pub['ms']) / med:15.2f}x {np.mean(pub['ms']) / mean:13.2f}x"
                 if pub and r is not pub else f"{'':16s} {'':14s}")
        say(f"{r['name']:13s} {r['params'] / 1e6:8.2f}M {med:10.0f} {mean:9.0f} {np.mean(r['wait_ms']):8.0f} "
            f"{100 * r['padding']:7.1f}% {ratio}")
    ours = [r for r in results if r["name"] != "published" and "error" not in r]
    if pub and ours:
        parts = ", ".join(f"{r['name']} {np.median(pub['ms']) / np.median(r['ms']):.2f}x" for r in ours)
        verdict = ""
        today = next((r for r in ours if r["name"] == "today"), None)
        if today:
            ok = np.median(pub["ms"]) / np.median(today["ms"]) >= 1.5
            verdict = f"; issue 17 (today >= 1.5x): {'met' if ok else 'NOT met'}"
        say(f"\nsummary: published {np.median(pub['ms']):.0f} ms/batch (median); published/ours: {parts}{verdict}")
    else:
        say("\nsummary: no ratio (a side failed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--published", type=Path, help="checkout of the published repository (holds model_training/)")
    ap.add_argument("--published-python", default=sys.executable, help="Python for the published trainer")
    ap.add_argument("--published-workers", type=int, help="its data loader workers (default: its rnn_args.yaml's)")
    ap.add_argument("--published-compile", choices=["off", "on"], default="off",
                    help="on: torch.compile its model as published (slower on a CPU, minutes of compiling)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="our trainers")
    ap.add_argument("--model-size", default="5x768", help="LAYERSxUNITS (default: the paper model)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=6, help="measured batches")
    ap.add_argument("--warmup", type=int, default=2, help="batches before the measured ones")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--sim-seed", type=int, default=11)
    ap.add_argument("--sentences", type=Path, help="sentence file for the simulator")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_size(args.model_size)
    if args.batches < 1 or args.warmup < 0 or args.threads < 1:
        fail("--batches and --threads must be at least 1, --warmup at least 0")
    if args.one:
        args.out.write_text(json.dumps(one(args)))
        return
    model_training = published_dir(args)
    os.environ.setdefault("B2TXT_PROGRESS", "0")
    from b2txt.data.store import build_manifest, resolve_sessions, write_manifest

    variants = list(dict.fromkeys(args.variants))
    if "today" in variants:
        today = train_config(args, "today")
        same = [v for v in variants if v != "today" and train_config(args, v) == today]
        variants = [v for v in variants if v not in same]
        if same:
            say(f"note: {', '.join(same)}: today's config, not run twice")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vspub-") as tmp:
        tmp = Path(tmp)
        check_published_python(args, tmp / "shim")
        sentences = sentences_file(args.sentences, tmp)
        say(f"simulating the default data set (seed {args.sim_seed}) from {sentences}")
        data = simulated(tmp, sentences, args.sim_seed)
        manifest = tmp / "manifest.csv"
        frame = build_manifest(data)
        write_manifest(frame, manifest)
        # the sessions ours trains on (train.holdout_sessions of the config) are the published run's
        all_sessions = sorted(frame["session"].unique())
        held_out = resolve_sessions(all_sessions, list(train_config(args, "today").holdout_sessions), "holdout")
        sessions = [s for s in all_sessions if s not in held_out]
        say(f"data ready in {time.perf_counter() - t0:.0f} s: training on {len(sessions)} sessions "
            f"({', '.join(held_out) or 'none'} held out); {args.warmup} + {args.batches} batches per trainer")
        results = [run_published(args, model_training, tmp / "shim", data, sessions, tmp)]
        show(results[-1])
        for v in variants:
            results.append(run_ours(args, v, data, manifest, tmp))
            show(results[-1])
    report(results, args)
    say(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
