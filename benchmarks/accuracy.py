"""Accuracy per training step of trainer variants (issue 17): val PER mean ± sd over seeds.

Trains a preset (default config/model/baseline.yaml; ``--model-size 2x256 --batch-size 32`` for
the issue's small comparison) for ``--batches`` batches on the default simulated data set
(simulate section of config/config.yaml with ``--sim-seed``, default 11; the preset's held-out
last session, so 7 training sessions and their 140 val trials) for ``--seeds`` seeds per variant,
and prints per variant: val PER at every validation (mean ± sd over seeds), the final and best
PER, ms per training batch (sampling, padding, augmentation and forward/backward/step; no
validation), the padding share of the batches' bins, and the wall time of a run.

The data set is simulated and preprocessed once; every run is its own process reading it
(``--jobs`` at a time: several small models share a GPU well). Variants (``--variants``):

    today           the trainer as configured (on the CPU: random batches, the GRUs packed on the
                    real steps; noise over the data only, CTC zero_infinity, plain AdamW, even draws)
    parts-4         packed off, random batches in 4 length parts (the CPU default before packing;
                    the same gradient as today)
    one-batch       packed off, length_chunks 1: each batch padded at once (the same gradient)
    bucketing       length bucketing, one padded part (the default before length_chunks)
    pad-noise       augment.noise_over_padding: noise over the padding too (published)
    ctc-inf         ctc_zero_infinity off (published)
    fused           fused_adamw (published)
    published-draw  trial_draw published (the published order of days and trials)
    published       all published behaviours together (one padded batch)
    mix-0.3         bucketing, but 30 % of batches drawn without it (bucket_mix 0.3)
    mix-0.5         bucket_mix 0.5
    wide-4          bucketing from windows of 4 n length neighbours instead of 1.5 n (bucket_width 4)
    wide-4-pad      wide-4 with noise over the padding

    PYTHONPATH=src python3 benchmarks/accuracy.py [--device cuda] [--variants today bucketing ...]
        [--seeds 3] [--batches 400] [--model-size 2x256] [--batch-size 32] [--jobs 4]
        [--sentences FILE | --data DRYAD_DIR]

Sentences for the simulator: ``--sentences``, else the corpus file of the config
(data/corpus/sentences.txt) or the corpus sources (Debian fortunes) when present, else
.gpu/sentences.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

BUCKETING = {"length_bucketing": True, "length_chunks": 1, "packed": False}  # the default until length_chunks
PUBLISHED = {"length_chunks": 1, "packed": False, "trial_draw": "published", "ctc_zero_infinity": False, "fused_adamw": True,
             "augment": {"noise_over_padding": True}}
VARIANTS: dict[str, dict] = {
    "today": {},
    "parts-4": {"length_chunks": 4, "packed": False},
    "one-batch": {"length_chunks": 1, "packed": False},
    "bucketing": BUCKETING,
    "pad-noise": {"augment": {"noise_over_padding": True}},
    "ctc-inf": {"ctc_zero_infinity": False},
    "fused": {"fused_adamw": True},
    "published-draw": {"trial_draw": "published"},
    "published": PUBLISHED,
    "mix-0.3": {**BUCKETING, "bucket_mix": 0.3},
    "mix-0.5": {**BUCKETING, "bucket_mix": 0.5},
    "wide-4": {**BUCKETING, "bucket_width": 4.0},
    "wide-4-pad": {**BUCKETING, "bucket_width": 4.0, "augment": {"noise_over_padding": True}},
}
DEFAULT_VARIANTS = ["today", "one-batch", "bucketing", "pad-noise", "ctc-inf", "fused", "published-draw", "published",
                    "mix-0.3", "wide-4"]


def say(msg: str) -> None:
    print(msg, flush=True)


def sentences_file(arg: Path | None, tmp: Path) -> Path:
    from b2txt.ground.config import load_config

    if arg:
        return arg
    cfg = load_config(ROOT / "config" / "config.yaml")
    if (ROOT / cfg.corpus.out).is_file():
        return ROOT / cfg.corpus.out
    if Path(cfg.corpus.source_dir).is_dir():
        from b2txt.data.corpus import extract_sentences, read_sources, write_sentences
        from b2txt.ground.phonemes import Lexicon

        c = cfg.corpus
        out = tmp / "sentences.txt"
        write_sentences(out, extract_sentences(read_sources(c.source_dir, c.files), Lexicon.from_cmudict(),
                                               c.min_words, c.max_words))
        return out
    if (ROOT / ".gpu" / "sentences.txt").is_file():
        return ROOT / ".gpu" / "sentences.txt"
    raise SystemExit("no sentences for the simulator: pass --sentences FILE (or --data DIR)")


def simulated(tmp: Path, sentences: Path, seed: int) -> Path:
    from b2txt.data.corpus import read_sentences
    from b2txt.data.simulate import simulate
    from b2txt.ground.config import load_config

    cfg = load_config(ROOT / "config" / "config.yaml").simulate.model_copy(update={"seed": seed})
    return simulate(cfg, read_sentences(sentences), tmp / "sim")


def train_config(args: argparse.Namespace, variant: str, seed_index: int):
    from b2txt.ground.config import TrainConfig, load_config, merge

    cfg = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "model" / f"{args.preset}.yaml"]).train
    base = cfg.model_dump(mode="json")
    over: dict = {"seed": cfg.seed + seed_index, "num_training_batches": args.batches,
                  "lr_decay_steps": args.batches, "lr_decay_steps_day": args.batches,
                  "batches_per_val_step": args.val_every, "batches_per_train_log": args.val_every,
                  "batches_per_checkpoint": 10 * args.batches, "device": args.device,
                  "threads": args.threads, "early_stopping_val_steps": None}
    if args.model_size:
        layers, units = (int(v) for v in args.model_size.lower().split("x"))
        over["model"] = {"n_layers": layers, "n_units": units}
    if args.batch_size:
        over["batch_size"] = args.batch_size
    if args.amp:
        over["amp"] = args.amp
    return TrainConfig.model_validate(merge(merge(base, over), VARIANTS[variant]))


def one(args: argparse.Namespace) -> dict:
    """One training run (in its own process); its val PERs, speed and padding as JSON."""
    from b2txt.training.trainer import Trainer

    cfg = train_config(args, args.one, args.seed_index)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, args.data, args.manifest, Path(tmp) / "model", log=lambda m: None)
        trainer.run()
        wall = time.perf_counter() - t0
    st = trainer.stats
    val = [(int(m["step"]), float(m["val_PER"])) for m in trainer.metrics
           if m.get("val_PER") is not None and np.isfinite(m.get("val_PER", np.nan))]
    return {"variant": args.one, "seed": cfg.seed, "val": val, "best": float(trainer.best.per),
            "ms_per_batch": 1000 * (st["data_s"] + st["compute_s"]) / max(st["steps"], 1),
            "padding": st["padding"] / max(st["built"], 1), "wall_s": wall, "device": str(trainer.device),
            "bf16": bool(trainer.bf16), "model": f"{cfg.model.n_layers}x{cfg.model.n_units} b{cfg.batch_size}"}


def launch(args: argparse.Namespace, data: Path, manifest: Path, variant: str, seed_index: int) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, "--seed-index", str(seed_index), "--data", str(data),
           "--manifest", str(manifest), "--preset", args.preset, "--batches", str(args.batches),
           "--val-every", str(args.val_every), "--device", args.device]
    for flag, value in (("--model-size", args.model_size), ("--batch-size", args.batch_size), ("--amp", args.amp),
                        ("--threads", args.threads)):
        if value:
            cmd += [flag, str(value)]
    env = {**os.environ, "B2TXT_PROGRESS": "0", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        return {"variant": variant, "seed_index": seed_index, "error": r.stderr.strip().splitlines()[-1:] or ["?"]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    steps = " ".join(f"{p:.3f}" for _, p in out["val"])
    say(f"  {variant:15s} seed {out['seed']}: val PER {steps} | best {out['best']:.3f} | "
        f"{out['ms_per_batch']:.0f} ms/batch | padding {100 * out['padding']:.1f} % | {out['wall_s']:.0f} s")
    return out


def ms(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def table(results: list[dict], variants: list[str]) -> None:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    steps = [s for s, _ in ok[0]["val"]]
    head = " ".join(f"{'PER@' + str(s):>15s}" for s in steps)
    say(f"\n{'variant':15s} {'n':>2s} {head} {'best':>15s} {'ms/batch':>9s} {'padding':>8s} {'wall s':>7s}")
    for v in variants:
        rs = [r for r in ok if r["variant"] == v]
        if not rs:
            continue
        cols = " ".join(f"{ms([dict(r['val']).get(s, np.nan) for r in rs]):>15s}" for s in steps)
        say(f"{v:15s} {len(rs):2d} {cols} {ms([r['best'] for r in rs]):>15s} "
            f"{np.mean([r['ms_per_batch'] for r in rs]):9.1f} {100 * np.mean([r['padding'] for r in rs]):7.1f}% "
            f"{np.mean([r['wall_s'] for r in rs]):7.1f}")
    for r in results:
        if "error" in r:
            say(f"FAILED {r['variant']} seed index {r['seed_index']}: {r['error']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds per variant (preset seed, +1, ...)")
    ap.add_argument("--batches", type=int, default=400, help="training batches (the schedule is fit to them)")
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--preset", default="baseline", help="config/model/<preset>.yaml")
    ap.add_argument("--model-size", help="LAYERSxUNITS, e.g. 2x256 (default: the preset's)")
    ap.add_argument("--batch-size", type=int, help="default: the preset's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["auto", "bf16", "off"], help="train.amp (default: the preset's; off: float32 "
                    "on a GPU, as the published CPU figures)")
    ap.add_argument("--threads", type=int, help="torch CPU threads per run (default: cores / jobs)")
    ap.add_argument("--jobs", type=int, help="runs at a time (default: 1 on the CPU, 4 on a GPU)")
    ap.add_argument("--sim-seed", type=int, default=11)
    ap.add_argument("--sentences", type=Path, help="sentence file for the simulator")
    ap.add_argument("--data", type=Path, help="Dryad-layout data (default: simulate it)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--seed-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("B2TXT_PROGRESS", "0")  # no progress bars in the printed table
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return
    from b2txt.data.store import build_manifest, write_manifest

    jobs = args.jobs or (1 if args.device == "cpu" else 4)
    if not args.threads:
        args.threads = max(1, len(os.sched_getaffinity(0)) // jobs)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.data:
            data = args.data
        else:
            sentences = sentences_file(args.sentences, tmp)
            say(f"simulating the default data set (seed {args.sim_seed}) from {sentences}")
            data = simulated(tmp, sentences, args.sim_seed)
        manifest = tmp / "manifest.csv"
        write_manifest(build_manifest(data), manifest)
        say(f"data ready in {time.perf_counter() - t0:.0f} s; {len(args.variants)} variants x {args.seeds} seeds, "
            f"{args.batches} batches, preset {args.preset}"
            + (f" at {args.model_size}" if args.model_size else "") + (f" b{args.batch_size}" if args.batch_size else "")
            + f", device {args.device}, {jobs} at a time, {args.threads} threads each")
        runs = [(v, s) for s in range(args.seeds) for v in args.variants]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda vs: launch(args, data, manifest, *vs), runs))
    ok = [r for r in results if "error" not in r]
    if ok:
        say(f"\nmodel {ok[0]['model']}, device {ok[0]['device']}, bf16 {ok[0]['bf16']}; val PER mean ± sd over seeds")
    table(results, args.variants)
    say(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
