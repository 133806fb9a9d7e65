"""Language-model decoding speed and memory: WFST (TLG) and lexicon (KenLM) decoders, 1/3/5-gram.

By default it decodes with the LMs the pipeline builds (config/config.yaml: `results/<run>/lm/<n>gram`
for each order of `lm.orders`, the whole ~126k-word CMU lexicon as vocabulary), built with Snakemake
when absent, and the trials are simulated phoneme logits (`tests/helpers/synthetic.py`, confusions
included) of the pipeline data's val and test sentences, which `lm text` keeps out of the LM text.
`--own-lms` builds its own LMs instead (orders `--orders`, e.g. a 5-gram the default run does not
make) from the corpus less held-out corpus sentences, into a cache directory. `--logits FILE`
decodes a trained model's logits file instead. Each decoder and order runs in its own process
so the peak resident memory is its own. Prints the LM directories, then per decoder and order:
graph/trie load time, ms/trial (median, p90; one process, n-best and augmentation included),
WER and peak RSS.

    python benchmarks/decode.py [--trials 100] [--logits FILE]
    python benchmarks/decode.py --own-lms [--orders 1 3 5] [--wfst-orders 1 3] [--trials 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.synthetic: logits whose sentence is known
CACHE = Path(os.environ.get("B2TXT_BENCH_CACHE", Path.home() / ".cache" / "b2txt" / "bench-lm"))


def build_lms(orders: list[int], wfst_orders: list[int], held_out: set[str]) -> Path:
    """LM text, n-grams and graphs in CACHE (rebuilt only when missing)."""
    from b2txt.data.corpus import read_sources
    from b2txt.ground.config import load_config
    from b2txt.ground.phonemes import Lexicon
    from b2txt.lm.graph import build_graph_from_arpa
    from b2txt.lm.ngram import build_ngram
    from b2txt.lm.text import prepare_text, source_sentences

    cfg = load_config(ROOT / "config" / "config.yaml")
    lex = Lexicon.from_cmudict()
    text = CACHE / "text.txt"
    if not text.is_file():
        raw = source_sentences(read_sources(cfg.corpus.source_dir, cfg.corpus.files), True)
        stats = prepare_text(text, raw, lex, exclude=held_out, add_lexicon_words=True)
        print(f"LM text: {stats.summary()}", file=sys.stderr)
    for n in orders:
        d = CACHE / f"{n}gram"
        if not (d / "lm.bin").is_file():
            t0 = time.perf_counter()
            build_ngram(text, d, n, memory=cfg.lm.memory, kenlm_dir=cfg.lm.kenlm_dir)
            print(f"{n}-gram ARPA + binary: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if n in wfst_orders and not (d / "TLG.fst").is_file():
            t0 = time.perf_counter()
            build_graph_from_arpa(d / "lm.arpa", d, lex)
            print(f"{n}-gram TLG: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return CACHE


def pipeline_lms(trial_count: int) -> tuple[Path, list[int], list[str]]:
    """The pipeline's LM directory (results/<run>/lm), its orders and up to ``trial_count`` of the
    data's val/test sentences (excluded from the LM text), built with Snakemake when absent."""
    import pandas as pd

    from b2txt.ground.config import load_config

    cfg = load_config(ROOT / "config" / "config.yaml")
    lm, manifest = ROOT / f"results/{cfg.run}/lm", ROOT / f"results/{cfg.run}/manifest.csv"
    targets = [str(p.relative_to(ROOT)) for n in cfg.lm.orders for p in (lm / f"{n}gram" / "TLG.fst", lm / f"{n}gram" / "lm.bin")]
    targets.append(str(manifest.relative_to(ROOT)))
    if not all((ROOT / t).is_file() for t in targets):
        print(f"building the pipeline's LMs: snakemake --cores all {' '.join(targets)} (minutes, once)", flush=True)
        subprocess.run(["snakemake", "--cores", "all", *targets], cwd=ROOT, check=True)
    rows = pd.read_csv(manifest)
    held = rows[rows["split"].isin(cfg.lm.exclude_splits)]["sentence"].dropna().astype(str).tolist()
    rng = np.random.default_rng(0)
    picked = [held[i] for i in rng.choice(len(held), size=min(trial_count, len(held)), replace=False)]
    return lm, list(cfg.lm.orders), picked


def held_out_sentences(n: int) -> list[str]:
    """Corpus sentences for the trials; they are removed from the LM text (no leakage)."""
    from b2txt.data.corpus import extract_sentences, read_sources
    from b2txt.ground.config import load_config
    from b2txt.ground.phonemes import Lexicon

    cfg = load_config(ROOT / "config" / "config.yaml")
    sentences = extract_sentences(read_sources(cfg.corpus.source_dir, cfg.corpus.files), Lexicon.from_cmudict(), 3, 12)
    rng = np.random.default_rng(0)
    return [sentences[i] for i in rng.choice(len(sentences), size=n, replace=False)]


def trials(sentences: list[str], logits_file: Path | None) -> tuple[list[np.ndarray], list[str]]:
    from helpers.synthetic import phoneme_logits

    from b2txt.ground.phonemes import Lexicon, normalize_text

    if logits_file is not None:
        from b2txt.data.logits import read_logits

        ts = [t for t in read_logits(logits_file) if len(t.logits) and t.attrs.get("sentence_label")]
        return [t.logits for t in ts], [normalize_text(t.attrs["sentence_label"]) for t in ts]
    lex = Lexicon.from_cmudict()
    rng = np.random.default_rng(1)
    # soft logits (peak 8) whose errors are uncertain: where a wrong phoneme wins, the true one is second
    return [phoneme_logits(lex.sentence_ids(s), rng, confusion=0.1, runner_up=2.0) for s in sentences], sentences


def current_rss_mb(field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS) or at its peak (VmHWM) from /proc: ru_maxrss would carry the
    parent's peak across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(decoder: str, order: int, trials_file: Path, options: dict) -> dict:
    from b2txt.evaluation.error_rates import edit_distance
    from b2txt.ground.config import DecodeConfig
    from b2txt.ground.phonemes import Lexicon, to_lm_order
    from b2txt.lm.core import make_decoder
    from b2txt.lm.nbest import augment_nbest

    data = np.load(trials_file, allow_pickle=False)
    logits = [data[f"x{i}"] for i in range(int(data["n"]))]
    refs = [str(r) for r in data["refs"]]
    Lexicon.from_cmudict()  # loaded by both decoders; not part of the graph/trie time
    opts = DecodeConfig(decoder=decoder, **options)
    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    dec = make_decoder(opts, CACHE / f"{order}gram")
    load_s = time.perf_counter() - t0
    times, edits, words = [], 0, 0
    for x, ref in zip(logits, refs):
        t0 = time.perf_counter()
        nb = augment_nbest(dec.decode(to_lm_order(x)), opts.augment_top, opts.augment_penalty)
        times.append(time.perf_counter() - t0)
        edits += edit_distance(nb.best.split(), ref.split())
        words += len(ref.split())
    peak = current_rss_mb("VmHWM")
    decoder_rss = current_rss_mb() - rss0
    return {"decoder": decoder, "order": order, "load_s": load_s, "median_ms": 1000 * float(np.median(times)),
            "p90_ms": 1000 * float(np.percentile(times, 90)), "wer": edits / max(words, 1),
            "peak_rss_mb": peak, "decoder_rss_mb": decoder_rss,
            "lm_bin_mb": (CACHE / f"{order}gram" / "lm.bin").stat().st_size / 2**20}


def main() -> None:
    global CACHE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--own-lms", action="store_true", help="build LMs of its own (held-out corpus sentences) "
                                                                "instead of using the pipeline's")
    ap.add_argument("--orders", type=int, nargs="+", default=[1, 3, 5], help="with --own-lms: n-gram orders")
    ap.add_argument("--wfst-orders", type=int, nargs="+", default=[1, 3],
                    help="orders that also get a TLG graph (a 5-gram TLG of the whole lexicon needs several GB)")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--logits", type=Path, help="decode this logits file instead of simulated logits")
    ap.add_argument("--acoustic-scale", type=float,
                    help="default: 0.5 for the (soft) simulated logits, decode.acoustic_scale of config.yaml for --logits")
    ap.add_argument("--max-active", type=int, default=7000)
    ap.add_argument("--nbest", type=int, default=100)
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.acoustic_scale is None:
        from b2txt.ground.config import load_config

        args.acoustic_scale = load_config(ROOT / "config" / "config.yaml").decode.acoustic_scale if args.logits else 0.5
    options = {"acoustic_scale": args.acoustic_scale, "max_active": args.max_active, "nbest": args.nbest}
    if args.one:
        CACHE = args.cache
        decoder, order, trials_file = args.one
        print(json.dumps(one(decoder, int(order), Path(trials_file), options)))
        return
    if args.own_lms:
        sentences = held_out_sentences(args.trials)
        logits, refs = trials(sentences, args.logits)
        if args.logits:  # the file's sentences must not be in the LM text either: an LM of its own
            import hashlib

            CACHE = CACHE / ("held-out-" + hashlib.sha256("\n".join(sorted(refs)).encode()).hexdigest()[:12])
        build_lms(args.orders, args.wfst_orders, set(sentences) | set(refs))
        orders, wfst_orders = args.orders, args.wfst_orders
    else:
        CACHE, orders, sentences = pipeline_lms(args.trials)
        wfst_orders = orders
        logits, refs = trials(sentences, args.logits)
    print("LMs: " + ", ".join(str(CACHE / f"{n}gram") for n in orders))
    CACHE.mkdir(parents=True, exist_ok=True)
    trials_file = Path(tempfile.mkdtemp(prefix="b2txt-decode-bench-")) / "trials.npz"
    np.savez(trials_file, n=len(logits), refs=np.array(refs), **{f"x{i}": x for i, x in enumerate(logits)})
    print(f"{len(logits)} trials ({'file ' + str(args.logits) if args.logits else 'simulated, 10 % uncertain confusions'}), "
          f"mean {np.mean([len(x) for x in logits]):.0f} frames; options {options}; 1 process")
    print(f"{'decoder':8s} {'order':>5s} {'load s':>7s} {'ms/trial':>9s} {'p90 ms':>7s} {'WER':>6s} "
          f"{'peak RSS':>9s} {'decoder':>9s} {'lm.bin':>8s}   (decoder: resident memory the graph/trie + LM add)")
    runs = [("wfst", n) for n in orders if n in wfst_orders] + [("lexicon", n) for n in orders]
    for decoder, order in runs:
        r = subprocess.run([sys.executable, __file__, "--one", decoder, str(order), str(trials_file), "--cache", str(CACHE),
                            "--acoustic-scale", str(args.acoustic_scale), "--max-active", str(args.max_active),
                            "--nbest", str(args.nbest)], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{decoder:8s} {order:5d} failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{m['decoder']:8s} {m['order']:5d} {m['load_s']:7.1f} {m['median_ms']:9.1f} {m['p90_ms']:7.1f} "
              f"{100 * m['wer']:5.1f}% {m['peak_rss_mb']:7.0f} MB {m['decoder_rss_mb']:6.0f} MB {m['lm_bin_mb']:6.0f} MB")
    shutil.rmtree(trials_file.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
