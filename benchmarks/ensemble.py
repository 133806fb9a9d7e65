"""Beyond one model (issue 17, part 2): val PER and WER of a single model vs an ensemble of K seeds,
checkpoint averaging (EMA), test-time augmentation (TTA) and their combination, at a fixed number
of training batches per model, on simulated data.

Trains the preset (default: baseline) once per seed with ``train.ema_decay`` (the real
:class:`b2txt.training.trainer.Trainer`; the average only watches the weights, so the raw weights
follow the path they follow without it), takes the raw and the averaged weights after the last
batch, runs every model on the val split of the sessions it knows
(``b2txt.models.inference.infer_split``, with and without ``infer.tta``), and prints per variant:

- single: each seed's model alone; ensemble of K: the K plain models' log-probabilities averaged
  (``b2txt.data.ensemble``); EMA: each seed's averaged model; TTA: each plain model under all
  transforms; the K EMA models ensembled; all: the ensemble of the K EMA models, each under TTA;
- val PER (greedy CTC, total edits / total phonemes) and its relative change vs the single model;
- val WER: each variant's logits decoded exactly as ``b2txt decode`` does
  (:func:`b2txt.lm.pool.decode_file`: LM column order, the n-gram graph, the ``decode`` section of
  config/config.yaml + config/model/<preset>.yaml, no LLM rescoring; the graph is loaded once and
  shared), scored as ``b2txt score --decoded`` does (``word_table``), with the bootstrap 95 %
  interval over val trials (``bootstrap_ci``, as in ``wer.json``), the relative WER change vs the
  single model with its 95 % interval (trials resampled in pairs), and the decode time;
- for the variants with one model per seed (single, EMA, TTA): PER and WER are the mean over seeds
  ± sd, and the interval is the mean's: it resamples the trials' word edits averaged over seeds;
- each TTA transform alone (val PER, mean over seeds); the train time per model and the val
  inference time per model;
- a summary: the combination's relative WER cut vs the single model against the issue's target
  (at least 20 %), and its cost in train, inference and decode time.

The graph is the pipeline's (``results/<run>/lm/<decode_order>gram``, built with Snakemake when
absent: benchmarks/pipeline_lm.py), or ``--lm DIR``; the printout says how many val sentences are
lines of the LM's training text (``text.txt`` beside the graph), since simulated data other than the
pipeline's own may share sentences with it. ``--no-wer`` skips decoding (PER only).
The learning-rate schedule is stretched to ``--batches`` (decay over all of them, warm-up an
eighth of them, at most 50).

    python benchmarks/ensemble.py [--batches 400] [--seeds 10 11 12] [--ema-decay 0.99]
        [--device cpu] [--threads 2] [--preset baseline] [--n-units N] [--sessions N]
        [--trials-per-block N] [--tta '[{}, {"shift": 2}, ...]'] [--sentences FILE] [--keep DIR]
        [--lm DIR | --no-wer] [--decode-workers N]

The full measurement (default simulated data, the baseline preset, 400 batches, 3 seeds) on a GPU:

    python benchmarks/ensemble.py --device cuda --batches 400 --seeds 10 11 12
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Transforms that keep the frames aligned: smoothing widths either side of the model's 2 and the
# training noise. Shifts by fewer bins than the patch stride move the outputs by a fraction of a
# frame, and averaging misaligned frames blurs the CTC spikes: the identity averaged with shifts
# 1, 2, 3 gave val PER 0.116 against the identity's 0.106, though shift 3 alone gave 0.097
# (baseline preset, 400 batches, 3 seeds); the TTA set with those shifts cost +4.3 % WER.
DEFAULT_TTA = ('[{}, {"smooth_std": 1.5}, {"smooth_std": 2.5}, {"noise_seed": 1, "noise_scale": 0.3}, '
               '{"noise_seed": 2, "noise_scale": 0.3}]')


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


@dataclass
class Variant:
    """One row of the table: its val logits (one file per seed, or the ensemble's one)."""

    name: str
    files: list[Path]
    models: int  # models trained and run for it
    infer_s: float  # val inference seconds (all its models)
    pers: list[float] = field(default_factory=list)  # greedy-CTC PER of each file
    wers: list[float] = field(default_factory=list)  # WER of each file
    decode_s: list[float] = field(default_factory=list)  # decode wall seconds of each file
    decode_ms: list[float] = field(default_factory=list)  # median ms per trial of each file
    edits: np.ndarray | None = None  # per val trial: word edits, mean over the files
    ref_words: np.ndarray | None = None  # per val trial: reference words

    @property
    def wer(self) -> float:
        """The aggregate WER; for one model per seed the mean over seeds (the trials are the same)."""
        assert self.edits is not None and self.ref_words is not None
        return float(self.edits.sum() / self.ref_words.sum())


def decode_options(args):
    """The decode section the pipeline uses for this preset (config.yaml + model/<preset>.yaml)."""
    from b2txt.ground.config import load_config

    options = load_config([ROOT / "config/config.yaml", ROOT / f"config/model/{args.preset}.yaml"]).decode
    return options.model_copy(update={"workers": args.decode_workers}) if args.decode_workers else options


def word_error_rates(variants: list[Variant], args, work: Path) -> str:
    """Decode every variant's val logits as ``b2txt decode`` does (one core: the graph loads once)
    and score words as ``b2txt score --decoded`` does; returns a line on the LM used."""
    from pipeline_lm import describe, pipeline_graph

    from b2txt.evaluation.error_rates import word_table
    from b2txt.ground.device import available_cores
    from b2txt.lm.core import DecodingCore
    from b2txt.lm.pool import decode_file

    lm = args.lm or pipeline_graph()
    options = decode_options(args)
    t0 = time.perf_counter()
    core = DecodingCore(lm, options).load()
    print(f"decoding with {describe(lm)}, loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    keys = refs = None
    for i, v in enumerate(variants):
        tables = []
        for j, f in enumerate(v.files):
            t0 = time.perf_counter()
            decoded = decode_file(f, lm, work / "decoded" / f"{i}-{j}", options, rescore=None, core=core)
            v.decode_s.append(time.perf_counter() - t0)
            v.decode_ms.append(float(decoded["decode_ms"].median()))
            table = word_table(decoded)
            these = list(zip(table["session"], table["block_num"], table["trial_num"]))
            if keys is None:
                keys, refs = these, table["reference"].tolist()
            # per-trial edits are averaged over seeds and paired between variants: the same trials
            assert these == keys, f"{f}: other val trials than {variants[0].files[0]}"
            v.wers.append(float(table["word_edits"].sum() / table["ref_words"].sum()))
            tables.append(table)
        v.edits = np.mean([t["word_edits"].to_numpy(dtype=float) for t in tables], axis=0)
        v.ref_words = tables[0]["ref_words"].to_numpy(dtype=float)
        print(f"  decoded {v.name}: WER {v.wer:.4f} ({np.mean(v.decode_s):.1f} s per file)", flush=True)
    # the LM must not have been trained on the val sentences (the pipeline's lm.exclude_splits
    # removes its own data's; other simulated data may share sentences with the LM text)
    text = lm.parent / "text.txt"
    assert refs is not None
    if text.is_file():
        lines = set(text.read_text().splitlines())
        leak = f"{sum(r in lines for r in refs)} of {len(refs)} val sentences are lines of its training text {text}"
    else:
        leak = f"no {text}: whether the LM saw the val sentences is unchecked"
    return (f"LM {describe(lm)}: {options.decoder}, acoustic_scale {options.acoustic_scale:g}, blank_penalty "
            f"{options.blank_penalty:g}, nbest {options.nbest}, decoding processes: "
            f"{options.workers or available_cores()}, no LLM; {leak}")


def interval(lo: float, hi: float, scale: float = 1.0, fmt: str = ".4f") -> str:
    return f"[{scale * lo:{fmt}}, {scale * hi:{fmt}}]"


def report(variants: list[Variant], lm_note: str | None) -> None:
    from b2txt.evaluation.error_rates import bootstrap_ci

    single = variants[0]
    print("val PER: greedy CTC, total edits / total phonemes. Rows with ± are one model per seed: the mean over "
          "seeds ± sd.")
    if lm_note is None:
        print(f"{'variant':36s} {'   val PER':17s} {'vs single':>9s}")
        for v in variants:
            sd = f" ± {np.std(v.pers, ddof=1):.4f}" if len(v.pers) > 1 else ""
            print(f"{v.name:36s} {np.mean(v.pers):8.4f}{sd:9s} {100 * (np.mean(v.pers) / np.mean(single.pers) - 1):+8.1f}%")
        return
    print("val WER: `b2txt decode` (the LM column order, the decode section of config.yaml + the preset's) + "
          "`b2txt score --decoded` (word edits / reference words); 95 % CI: bootstrap over val trials "
          "(b2txt.evaluation.error_rates.bootstrap_ci, 10,000 resamples); for the rows with ± it resamples the "
          "trials' word edits averaged over the seeds, so it is the interval of the mean over seeds.")
    print("vs single: relative change of the aggregate against the single model's mean over seeds; the WER "
          "change's 95 % CI resamples trials in pairs (both aggregates on the same resample).")
    print(f"  {lm_note}")
    print(f"{'variant':36s} {'   val PER':17s} {'vs single':>9s} {'   val WER':17s} {'95 % CI':^18s} "
          f"{'WER vs single [95 % CI]':>27s} {'decode':>14s}")
    for v in variants:
        sd = f" ± {np.std(v.pers, ddof=1):.4f}" if len(v.pers) > 1 else ""
        wsd = f" ± {np.std(v.wers, ddof=1):.4f}" if len(v.wers) > 1 else ""
        lo, hi = bootstrap_ci(v.edits, v.ref_words)
        if v is single or single.wer == 0:
            change = "" if v is single else "n/a (single WER 0)"
        else:
            # the ratio of the two aggregates, trials resampled in pairs (the reference words cancel)
            rlo, rhi = bootstrap_ci(v.edits, single.edits)
            change = f"{100 * (v.wer / single.wer - 1):+.1f}% {interval(rlo - 1, rhi - 1, 100, '+.1f')}"
        decode = f"{np.mean(v.decode_s):.1f} s {np.mean(v.decode_ms):.0f} ms"
        print(f"{v.name:36s} {np.mean(v.pers):8.4f}{sd:9s} {100 * (np.mean(v.pers) / np.mean(single.pers) - 1):+8.1f}% "
              f"{v.wer:8.4f}{wsd:9s} {interval(lo, hi):>18s} {change:>27s} {decode:>14s}")
    print("decode: wall seconds per file (all processes), median ms per trial")


def summary(variants: list[Variant], train_s: float) -> None:
    """The combination against the single model: the issue's target (a WER cut of at least 20 %) and the cost."""
    from b2txt.evaluation.error_rates import bootstrap_ci

    single, combo = variants[0], variants[-1]
    if single.wer == 0:
        print(f"\nthe single model's val WER is 0: no relative cut to measure ({combo.name}: {combo.wer:.4f})")
        return
    ratio = combo.wer / single.wer
    rlo, rhi = bootstrap_ci(combo.edits, single.edits)
    if ratio <= 0.8:
        met = "met, " + ("and the whole 95 % interval is a cut of 20 % or more" if rhi <= 0.8 else
                         "but the 95 % interval includes cuts under 20 %")
    else:
        met = "NOT met, " + ("but the 95 % interval includes cuts of 20 % or more" if rlo <= 0.8 else
                             "and the whole 95 % interval is a cut under 20 %")
    print(f"\ncombination ({combo.name}) vs single model: val WER {combo.wer:.4f} vs {single.wer:.4f} (mean over "
          f"seeds), a cut of {100 * (1 - ratio):.1f} % [95 % CI {100 * (1 - rhi):.1f}, {100 * (1 - rlo):.1f}]; "
          f"the issue's target (a cut of at least 20 %): {met}")
    print(f"its cost: train {combo.models} models ({combo.models * train_s:.0f} s against {train_s:.0f} s), val "
          f"inference {combo.infer_s:.1f} s against {single.infer_s:.1f} s, decode {np.mean(combo.decode_s):.1f} s "
          f"against {np.mean(single.decode_s):.1f} s")


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
    p.add_argument("--keep", type=Path, default=None, help="work here and keep models, logits and decoded sentences")
    p.add_argument("--lm", type=Path, default=None, help="graph directory to decode with (TLG.fst + words.txt); "
                   "default: the pipeline's, results/<run>/lm/<decode_order>gram, built with Snakemake when absent")
    p.add_argument("--no-wer", action="store_true", help="skip the n-gram decoding: val PER only")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="decoding processes (default: the config's decode.workers, else all cores)")
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

        def ensemble(kind: str) -> Path:
            out = work / f"ensemble-{kind}.hdf5"
            ensemble_files(files[kind], out)
            return out

        k = len(args.seeds)
        # each variant: its logits files (one per seed, or the one ensemble), the models it runs
        # and its val inference seconds (K models for an ensemble)
        plain_s, tta_s = float(np.mean(infer_s["plain"])), float(np.mean(infer_s["tta"]))
        variants = [
            Variant("single model", files["plain"], 1, plain_s),
            Variant(f"ensemble of {k}", [ensemble("plain")], k, k * plain_s),
            Variant(f"EMA (decay {args.ema_decay})", files["ema"], 1, plain_s),
            Variant(f"TTA ({len(tta)} transforms)", files["tta"], 1, tta_s),
            Variant(f"ensemble of {k} EMA models", [ensemble("ema")], k, k * plain_s),
            Variant(f"ensemble of {k} EMA models + TTA", [ensemble("ema_tta")], k, k * tta_s),
        ]
        for v in variants:
            v.pers = [per(read_logits(f)) for f in v.files]
        n_val = len(read_logits(files["plain"][0]))
        lm_note = None if args.no_wer else word_error_rates(variants, args, work)
        print(f"\n{args.preset} preset{f' ({args.n_units} units)' if args.n_units else ''}, {args.batches} batches "
              f"per model, seeds {args.seeds}, device {args.device}, {n_val} val trials")
        report(variants, lm_note)
        print("\nTTA transforms one at a time (val PER, mean over seeds):")
        for name, values in per_transform.items():
            print(f"  {name:38s} {np.mean(values):.4f}")
        print(f"\ntrain time per model (with the average): {np.mean(train_s):.0f} s; "
              f"val inference per model: plain {plain_s:.1f} s, with TTA {tta_s:.1f} s")
        if lm_note is not None:
            summary(variants, np.mean(train_s))


if __name__ == "__main__":
    main()
