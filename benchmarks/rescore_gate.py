"""Gated LLM rescoring (``rescore.unsure_margin``): fraction of trials rescored, WER and LLM time
per margin, with a tiny real causal LM (tests/helpers/tiny_llm.py: a word-level OPT of a few
thousand parameters plus its vocabulary's embeddings), randomly initialised (``--llm-steps 0``),
briefly trained on the n-gram text, and trained with the trials' sentences too (``--informed-steps``:
an LLM that knows better than the n-gram, the case the gate is for).

The n-gram side is real: a KenLM 3-gram + TLG graph over ``--lm-sentences`` corpus sentences
(Debian fortunes, as the pipeline's corpus) and the trials' words, the trials are simulated
phoneme logits of ``--trials`` other corpus sentences with uncertain confusions (``--confusion``, ``--runner-up``) (tests/helpers/synthetic.py), decoded
once to augmented n-best lists. The n-best margin is the best minus the second-best search score
(``acoustic_scale · acoustic + ngram + length_penalty · words``, natural log, no LLM). Margins
tried: 0 (no rescoring), the 10/25/50/75/90 % quantiles of the trials' margins, +inf (everything).

    python benchmarks/rescore_gate.py [--trials 100] [--lm-sentences 1000] [--llm-steps 0 300]
                                      [--confusion 0.3] [--runner-up 1.0] [--nbest 50]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers: synthetic logits, the tiny LLM


def wer(hyps: list[str], refs: list[str]) -> float:
    from b2txt.evaluation.error_rates import edit_distance

    return sum(edit_distance(h.split(), r.split()) for h, r in zip(hyps, refs)) / sum(len(r.split()) for r in refs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--lm-sentences", type=int, default=1000, help="corpus sentences in the 3-gram and LLM text")
    ap.add_argument("--llm-steps", type=int, nargs="+", default=[0, 300], help="LLM training steps (0: random)")
    ap.add_argument("--informed-steps", type=int, default=300,
                    help="also an LLM trained with the trials' sentences (0: not)")
    ap.add_argument("--alpha", type=float, default=0.55)
    ap.add_argument("--acoustic-scale", type=float, default=0.5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--confusion", type=float, default=0.3, help="share of phonemes shown as another one")
    ap.add_argument("--runner-up", type=float, default=1.0, help="the true phoneme's logit below the wrong one's")
    ap.add_argument("--nbest", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny tensors: 1 is fastest)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from helpers.synthetic import phoneme_logits
    from helpers.tiny_llm import build_tiny_opt

    from b2txt.data.corpus import extract_sentences, read_sources
    from b2txt.ground.config import DecodeConfig, RescoreConfig, load_config
    from b2txt.ground.phonemes import Lexicon, to_lm_order
    from b2txt.lm.core import DecodingCore
    from b2txt.lm.graph import build_graph_from_arpa
    from b2txt.lm.ngram import build_ngram
    from b2txt.lm.pool import decode_many
    from b2txt.lm.rescore import LLMRescorer, nbest_margin, should_rescore
    from b2txt.lm.text import prepare_text

    cfg = load_config(ROOT / "config" / "config.yaml")
    lex = Lexicon.from_cmudict()
    corpus = extract_sentences(read_sources(cfg.corpus.source_dir, cfg.corpus.files), lex, 3, 12)
    rng = np.random.default_rng(0)
    picked = [corpus[i] for i in rng.choice(len(corpus), size=min(args.lm_sentences + args.trials, len(corpus)),
                                            replace=False)]
    refs, text = picked[: args.trials], picked[args.trials:]
    # the trials' sentences are not in the n-gram text, their words are (one per line): errors are
    # left for the rescoring to fix, none of them out of vocabulary
    ngram_text = text + sorted({w for s in refs for w in s.split()})
    opts = DecodeConfig(acoustic_scale=args.acoustic_scale, nbest=args.nbest, augment_top=20, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        prepare_text(tmp / "text.txt", ngram_text, lex, add_lexicon_words=False)
        build_ngram(tmp / "text.txt", tmp / "3gram", 3, memory="5%", kenlm_dir=cfg.lm.kenlm_dir)
        build_graph_from_arpa(tmp / "3gram" / "lm.arpa", tmp / "3gram", lex)
        print(f"3-gram + TLG over {len(text)} sentences: {time.perf_counter() - t0:.0f} s", flush=True)
        logits = [to_lm_order(phoneme_logits(lex.sentence_ids(s), rng, confusion=args.confusion,
                                                  runner_up=args.runner_up)) for s in refs]
        core = DecodingCore(tmp / "3gram", opts)
        t0 = time.perf_counter()
        nbests = [r.nbest for r in decode_many(core, logits, args.workers, show_progress=False)]
        print(f"decoded {len(nbests)} trials in {time.perf_counter() - t0:.1f} s; n-gram WER "
              f"{wer([nb.best for nb in nbests], refs):.4f}", flush=True)
        from b2txt.evaluation.error_rates import edit_distance

        oracle = [min((c.sentence for c in nb.candidates), key=lambda h: edit_distance(h.split(), r.split()))
                  if nb.candidates else "" for nb, r in zip(nbests, refs)]
        print(f"n-best oracle WER {wer(oracle, refs):.4f} (the best any rescoring of these lists can do)", flush=True)
        margins = np.array([nbest_margin(nb, opts) for nb in nbests])
        finite = margins[np.isfinite(margins)]
        print(f"n-best margins: {len(finite)} finite, median {np.median(finite):.2f}, "
              f"10/90 % {np.quantile(finite, 0.1):.2f} / {np.quantile(finite, 0.9):.2f}", flush=True)
        gates = [0.0, *(float(np.quantile(finite, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)), math.inf]
        trial_words = sorted({w for s in refs for w in s.split()})
        llms = [("random" if steps == 0 else f"{steps} steps on the n-gram text", steps, text) for steps in args.llm_steps]
        if args.informed_steps:  # an LLM that has seen the trials' sentences: what a good LLM could gain
            llms.append((f"{args.informed_steps} steps on the n-gram text + the trials' sentences (informed)",
                         args.informed_steps, text + refs * 3))
        for k, (name, steps, train) in enumerate(llms):
            llm_dir = build_tiny_opt(tmp / f"llm{k}", train, trial_words, steps=steps, batch=64)
            rescorer = LLMRescorer(RescoreConfig(model=str(llm_dir), device="cpu", batch_size=64))
            print(f"\ntiny OPT ({sum(p.numel() for p in rescorer.model.parameters())} parameters, {name}), "
                  f"alpha {args.alpha}")
            print(f"{'unsure_margin':>13s} {'rescored':>9s} {'WER':>7s} {'LLM s':>6s}")
            for gate in gates:
                rc = RescoreConfig(model=str(llm_dir), alpha=args.alpha, unsure_margin=gate)
                t0 = time.perf_counter()
                done = [rescorer.rescore(nb, opts, rc) for nb in nbests]
                seconds = time.perf_counter() - t0
                frac = np.mean([should_rescore(nb, opts, gate) for nb in nbests])
                print(f"{gate:13.2f} {100 * frac:8.0f}% {wer([nb.best for nb in done], refs):7.4f} {seconds:6.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
