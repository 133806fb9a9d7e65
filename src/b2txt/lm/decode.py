"""Decoding logits files with a language model: the decoder factory and a process pool.

``b2txt decode`` reads a logits file (:mod:`b2txt.logits`, model column order), re-orders
every trial to the language-model order, decodes it to an n-best list, augments the list
(REFERENCE §4), optionally rescores it with a large LM, and writes

- ``decoded.csv``: one row per trial (session, block, trial, corpus, reference sentence when
  known, decoded sentence, number of candidates); deterministic, so reruns give the same file;
- ``timing.json``: decoding time per trial (median, p90, total), kept apart for that reason;
- ``nbest.jsonl``: one JSON object per trial with its candidates
  ``[sentence, acoustic, ngram, llm, total]``, best first.

The C++ decoders hold the GIL, so trials are spread over processes. The decoder (graph or
lexicon trie, possibly gigabytes) is built once in the parent and the workers are forked from
it: they share its memory copy-on-write instead of each loading their own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DecodeConfig, RescoreConfig
from ..errors import B2txtError
from ..fileio import atomic_dir, progress
from ..logits import LogitsTrial, read_logits
from ..phonemes import normalize_text, to_lm_order
from .nbest import Decoder, NBest, augment_nbest, check_logits

#: KenLM model files the lexicon decoder looks for in an LM directory, in order of preference.
KENLM_NAMES = ("lm.bin", "lm.arpa")


def find_kenlm_model(lm_dir: Path) -> Path:
    for name in KENLM_NAMES:
        if (lm_dir / name).is_file():
            return lm_dir / name
    raise B2txtError(f"{lm_dir}: no KenLM model ({' or '.join(KENLM_NAMES)}) for the lexicon decoder; "
                     "build one with `b2txt lm ngram`")


def make_decoder(options: DecodeConfig, lm_dir: str | Path) -> Decoder:
    """The decoder ``options.decoder`` names, on the LM directory ``lm_dir``.

    ``wfst`` reads ``TLG.fst`` + ``words.txt`` (ours or a published graph directory);
    ``lexicon`` reads a KenLM model (``lm.bin`` / ``lm.arpa``) and decodes with the CMU-dict
    lexicon restricted to the LM's vocabulary.
    """
    lm_dir = Path(lm_dir)
    if not lm_dir.is_dir():
        raise B2txtError(f"{lm_dir}: language-model directory not found")
    if options.decoder == "wfst":
        from .wfst import WfstDecoder

        return WfstDecoder(lm_dir, options)
    from ..phonemes import Lexicon
    from .lexicon_search import LexiconDecoder

    return LexiconDecoder(find_kenlm_model(lm_dir), options, lexicon=Lexicon.from_cmudict())


@dataclass(frozen=True)
class TrialResult:
    index: int
    nbest: NBest
    seconds: float


# The decoder of this process; set in the parent before forking so that workers share it.
_DECODER: Decoder | None = None
_AUGMENT: tuple[int, float] = (0, 0.0)


def _decode_one(item: tuple[int, np.ndarray]) -> TrialResult:
    index, logits = item
    assert _DECODER is not None
    t0 = time.perf_counter()
    nbest = _DECODER.decode(logits)
    top, penalty = _AUGMENT
    if top > 1:
        nbest = augment_nbest(nbest, top, penalty)
    return TrialResult(index, nbest, time.perf_counter() - t0)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def decode_many(decoder: Decoder, logits: Sequence[np.ndarray], workers: int | None = None,
                show_progress: bool = True) -> list[TrialResult]:
    """Decode LM-order logits (checked first, so a bad trial fails before any work) in order."""
    global _DECODER, _AUGMENT
    items = [(i, check_logits(x, f"trial {i}")) for i, x in enumerate(logits)]
    workers = min(workers or default_workers(), max(len(items), 1))
    _DECODER = decoder
    _AUGMENT = (decoder.options.augment_top, decoder.options.augment_penalty)
    results: list[TrialResult] = []
    try:
        if workers == 1:
            it: Iterator[TrialResult] = map(_decode_one, items)
            results = list(progress(it, desc="decode", total=len(items), unit="trial") if show_progress else it)
        else:
            # fork: the workers inherit the loaded decoder (copy-on-write), nothing is pickled but logits
            with mp.get_context("fork").Pool(workers) as pool:
                it = pool.imap(_decode_one, items, chunksize=max(1, min(8, len(items) // (4 * workers))))
                results = list(progress(it, desc=f"decode ({workers} processes)", total=len(items), unit="trial")
                               if show_progress else it)
    finally:
        _DECODER = None
    return results


def rescore_all(nbests: list[NBest], options: DecodeConfig, cfg: RescoreConfig,
                log: Callable[[str], None] = print) -> list[NBest]:
    """LLM rescoring of every n-best list (in this process: the LLM uses the GPU or all cores)."""
    from .rescore import LLMRescorer

    rescorer = LLMRescorer(cfg)
    log(f"rescoring {len(nbests)} n-best lists with {cfg.model} (alpha {cfg.alpha})")
    return [rescorer.rescore(nb, options, cfg) for nb in progress(nbests, desc="rescore", unit="trial")]


def decoded_row(index: int, trial: LogitsTrial, sentence: str, n_candidates: int) -> dict:
    """One row of ``decoded.csv`` (``b2txt decode`` and ``b2txt evaluate`` write the same columns)."""
    a = trial.attrs
    label = str(a.get("sentence_label", "") or "")
    return {
        "trial": index, "session": a.get("session", ""), "split": a.get("split", ""),
        "source_trial": a.get("source_trial", ""), "block_num": int(a.get("block_num", -1)),
        "trial_num": int(a.get("trial_num", -1)), "corpus": a.get("corpus", "unknown"),
        "post_implant_day": int(a.get("post_implant_day", -1)),
        "reference": normalize_text(label) if label else "", "decoded": sentence, "n_candidates": n_candidates,
    }


def decode_file(logits_path: str | Path, lm_dir: str | Path, out_dir: str | Path, options: DecodeConfig,
                rescore: RescoreConfig | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Decode every trial of a logits file; write ``decoded.csv`` and ``nbest.jsonl`` to ``out_dir``."""
    trials = read_logits(logits_path)
    if not trials:
        raise B2txtError(f"{logits_path}: no trials")
    lm_logits = []
    for i, t in enumerate(trials):
        where = f"{logits_path}: trial {i} ({t.attrs.get('session', '?')})"
        x = check_logits(np.asarray(t.logits), where) if len(t.logits) else None
        lm_logits.append(to_lm_order(x) if x is not None else None)
    t0 = time.perf_counter()
    decoder = make_decoder(options, lm_dir)
    log(f"{options.decoder} decoder on {lm_dir} ready in {time.perf_counter() - t0:.1f} s")
    runnable = [i for i, x in enumerate(lm_logits) if x is not None]
    done = decode_many(decoder, [lm_logits[i] for i in runnable], options.workers)
    nbests: list[NBest] = [NBest(())] * len(trials)
    seconds = [0.0] * len(trials)
    for i, r in zip(runnable, done):
        nbests[i], seconds[i] = r.nbest, r.seconds
    if rescore is not None and rescore.enabled:
        nbests = rescore_all(nbests, options, rescore, log)
    rows = [decoded_row(i, t, nb.best, len(nb)) | {"decode_ms": round(1000 * seconds[i], 3)}
            for i, (t, nb) in enumerate(zip(trials, nbests))]
    table = pd.DataFrame(rows)
    ms = table["decode_ms"]
    timing = {"trials": len(table), "decoder": options.decoder, "workers": options.workers or default_workers(),
              "median_ms": round(float(ms.median()), 3), "p90_ms": round(float(ms.quantile(0.9)), 3),
              "wall_s": round(time.perf_counter() - t0, 3)}
    with atomic_dir(out_dir) as tmp:
        table.drop(columns=["decode_ms"]).to_csv(tmp / "decoded.csv", index=False)
        (tmp / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        with open(tmp / "nbest.jsonl", "w") as f:
            for i, nb in enumerate(nbests):
                f.write(json.dumps({"trial": i, "session": rows[i]["session"],
                                    "candidates": [list(c) for c in nb.candidates]}) + "\n")
    return table


def read_decoded(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise B2txtError(f"{path}: decoded file not found (run `b2txt decode`)")
    table = pd.read_csv(path, keep_default_na=False)
    missing = {"session", "trial_num", "block_num", "decoded", "reference"} - set(table.columns)
    if missing:
        raise B2txtError(f"{path}: not a decoded file, columns missing: {sorted(missing)}")
    return table
