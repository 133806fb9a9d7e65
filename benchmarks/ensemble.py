"""Beyond one model (issue 17, part 2): val PER of a single model vs an ensemble of K seeds,
checkpoint averaging (EMA), test-time augmentation (TTA) and their combination, at a fixed number
of training batches per model, on simulated data.

Trains the preset (default: baseline) once per seed with ``train.ema_decay`` (the real
:class:`b2txt.training.trainer.Trainer`; the average only watches the weights, so the raw weights
follow the path they follow without it), takes the raw and the averaged weights after the last
batch, runs every model on the val split of the
sessions it knows (``b2txt.models.inference.infer_split``, with and without ``infer.tta``), and
prints greedy-CTC val PER (total edits / total phonemes):

- single: each seed's model alone (mean ± sd over seeds), and each TTA transform alone;
- ensemble of K: the K plain models' log-probabilities averaged (``b2txt.data.ensemble``);
- EMA: each seed's averaged model (mean ± sd); TTA: each plain model under all transforms;
- all: the ensemble of the K EMA models, each under TTA;

with the train time per model and the inference time per variant. The learning-rate schedule is
stretched to ``--batches`` (decay over all of them, warm-up an eighth of them, at most 50).

    python benchmarks/ensemble.py [--batches 400] [--seeds 10 11 12] [--ema-decay 0.99]
        [--device cpu] [--threads 2] [--preset baseline] [--n-units N] [--sessions N]
        [--trials-per-block N] [--tta '[{}, {"shift": 2}, ...]'] [--keep DIR]

The full measurement (default simulated data, the baseline preset, 400 batches, 3 seeds) on a GPU:

    python benchmarks/ensemble.py --device cuda --batches 400 --seeds 10 11 12
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TTA = '[{}, {"shift": 1}, {"shift": 2}, {"shift": 3}, {"smooth_std": 1.5}, {"noise_seed": 1, "noise_scale": 0.3}]'


def simulated(tmp: Path, sessions: int | None, trials_per_block: int | None,
              sentence_file: Path | None = None) -> tuple[Path, Path]:
    from b2txt.data.corpus import extract_sentences, read_sentences, read_sources
    from b2txt.data.simulate import simulate
    from b2txt.data.store import build_manifest, write_manifest
    from b2txt.ground.config import load_config
    from b2txt.ground.phonemes import Lexicon

    cfg = load_config(ROOT / "config" / "config.yaml")
    sim = cfg.simulate
    if sessions:
        sim = sim.model_copy(update={"n_sessions": sessions})
    if trials_per_block:
        sim = sim.model_copy(update={"trials_per_block": trials_per_block})
    lex = Lexicon.from_cmudict()
    # a sentence file where the corpus sources (Debian fortunes) are absent, e.g. on a GPU machine
    sentences = (read_sentences(sentence_file) if sentence_file else
                 extract_sentences(read_sources(cfg.corpus.source_dir, cfg.corpus.files), lex, 3, 14))
    data = simulate(sim, sentences, tmp / "sim", lex)
    manifest = tmp / "manifest.csv"
    write_manifest(build_manifest(data), manifest)
    return data, manifest


def per(trials) -> float:
    from b2txt.data.logits import greedy_decode
    from b2txt.evaluation.error_rates import edit_distance

    edits = sum(edit_distance(greedy_decode(t.logits), t.labels.tolist()) for t in trials)
    return edits / sum(len(t.labels) for t in trials)


def with_weights(model_dir: Path, out: Path, state: dict) -> None:
    """A copy of a model directory whose checkpoint holds ``state`` (the published layout)."""
    import shutil

    import torch

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model_dir, out)
    ckpt = torch.load(out / "checkpoint/best_checkpoint", weights_only=True)
    ckpt["model_state_dict"] = {k: v.detach().cpu().clone() for k, v in state.items()}
    torch.save(ckpt, out / "checkpoint/best_checkpoint")


def train_config(args, seed: int, ema: float | None):
    from b2txt.ground.config import TrainConfig, load_config, merge

    base = load_config([ROOT / "config/config.yaml", ROOT / f"config/model/{args.preset}.yaml"]).train
    n = args.batches
    over = {"seed": seed, "num_training_batches": n, "lr_decay_steps": n, "lr_decay_steps_day": n,
            "lr_warmup_steps": min(50, n // 8), "lr_warmup_steps_day": min(50, n // 8),
            "batches_per_val_step": n, "batches_per_checkpoint": n, "batches_per_train_log": max(1, n // 4),
            "ema_decay": ema, "device": args.device, "threads": args.threads}
    if args.n_units:
        over["model"] = {"n_units": args.n_units}
    return TrainConfig.model_validate(merge(base.model_dump(mode="json"), over))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--preset", default="baseline")
    p.add_argument("--n-units", type=int, default=None, help="override the preset's GRU width (small CPU runs)")
    p.add_argument("--sessions", type=int, default=None, help="simulated sessions (default: the simulate config's)")
    p.add_argument("--trials-per-block", type=int, default=None)
    p.add_argument("--tta", default=DEFAULT_TTA, help="the TTA transforms, a JSON list (infer.tta)")
    p.add_argument("--sentences", type=Path, help="sentence file for the simulator (default: the corpus sources)")
    p.add_argument("--keep", type=Path, default=None, help="work here and keep models and logits")
    args = p.parse_args()
    os.environ.setdefault("B2TXT_PROGRESS", "0")

    from b2txt.data.ensemble import ensemble_files
    from b2txt.data.logits import read_logits
    from b2txt.ground.config import TTATransform
    from b2txt.models.inference import infer_split
    from b2txt.training.trainer import Trainer

    tta = [TTATransform.model_validate(t) for t in json.loads(args.tta)]
    with tempfile.TemporaryDirectory(prefix="b2txt-ens-") as tmpdir:
        work = args.keep or Path(tmpdir)
        work.mkdir(parents=True, exist_ok=True)
        data, manifest = simulated(work, args.sessions, args.trials_per_block, args.sentences)
        train_s: list[float] = []
        infer_s: dict[str, list[float]] = {"plain": [], "tta": [], "one": []}
        files: dict[str, list[Path]] = {"plain": [], "ema": [], "tta": [], "ema_tta": []}
        per_transform: dict[str, list[float]] = {}

        def infer(model: Path, out: Path, transforms, kind: str) -> Path:
            t0 = time.perf_counter()
            infer_split(model, data, manifest, "val", out, args.device, known_sessions_only=True, tta=transforms)
            infer_s[kind].append(time.perf_counter() - t0)
            return out

        for seed in args.seeds:
            # One run per seed: the average only watches the weights, so the raw weights follow the
            # same path with and without it; both are taken after the last batch.
            cfg = train_config(args, seed, args.ema_decay)
            t0 = time.perf_counter()
            trainer = Trainer(cfg, data, manifest, work / f"run-{seed}",
                              log=lambda msg: print(f"  seed {seed}: {msg}", flush=True))
            trainer.run()
            train_s.append(time.perf_counter() - t0)
            print(f"trained seed {seed} ({train_s[-1]:.0f} s)", flush=True)
            for kind, state in (("plain", trainer.model.state_dict()),
                                ("ema", {**trainer.model.state_dict(), **trainer.ema.params})):
                model = work / f"{kind}-{seed}"
                with_weights(work / f"run-{seed}", model, state)
                files[kind].append(infer(model, work / f"{kind}-{seed}.hdf5", (), "plain"))
                files[f"{kind}_tta" if kind == "ema" else "tta"].append(
                    infer(model, work / f"{kind}-{seed}-tta.hdf5", tta, "tta"))
                if kind == "plain":
                    for i, t in enumerate(tta):
                        name = json.dumps(t.model_dump(exclude_defaults=True))
                        out = infer(model, work / f"{kind}-{seed}-t{i}.hdf5", [t], "one")
                        per_transform.setdefault(name, []).append(per(read_logits(out)))

        def pers(kind: str) -> list[float]:
            return [per(read_logits(f)) for f in files[kind]]

        def ensemble(kind: str) -> float:
            out = work / f"ensemble-{kind}.hdf5"
            ensemble_files(files[kind], out)
            return per(read_logits(out))

        k = len(args.seeds)
        rows = [
            ("single model", pers("plain")),
            (f"ensemble of {k}", [ensemble("plain")]),
            (f"EMA (decay {args.ema_decay})", pers("ema")),
            (f"TTA ({len(tta)} transforms)", pers("tta")),
            (f"ensemble of {k} EMA models", [ensemble("ema")]),
            (f"ensemble of {k} EMA models + TTA", [ensemble("ema_tta")]),
        ]
        n_val = len(read_logits(files["plain"][0]))
        print(f"\n{args.preset} preset{f' ({args.n_units} units)' if args.n_units else ''}, {args.batches} batches "
              f"per model, seeds {args.seeds}, device {args.device}, {n_val} val trials")
        print(f"{'variant':40s} {'val PER':>18s}")
        single = np.mean(rows[0][1])
        for name, values in rows:
            sd = f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
            print(f"{name:40s} {np.mean(values):9.4f}{sd:9s}  ({100 * (np.mean(values) / single - 1):+.1f} %)")
        print("\nTTA transforms one at a time (mean over seeds):")
        for name, values in per_transform.items():
            print(f"  {name:38s} {np.mean(values):.4f}")
        print(f"\ntrain time per model (with the average): {np.mean(train_s):.0f} s; "
              f"val inference per model: plain {np.mean(infer_s['plain']):.1f} s, with TTA {np.mean(infer_s['tta']):.1f} s")


if __name__ == "__main__":
    main()
