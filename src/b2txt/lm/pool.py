"""``b2txt decode``: every trial of a logits file decoded in process, by a pool of processes.

``b2txt decode`` reads a logits file (:mod:`b2txt.data.logits`, model column order), re-orders
every trial to the language-model order, decodes it to an n-best list, augments the list
(REFERENCE §4), optionally rescores it with a large LM, and writes

- ``decoded.csv``: one row per trial (session, block, trial, corpus, reference sentence when
  known, decoded sentence, number of candidates); deterministic, so reruns give the same file;
- ``timing.json``: decoding time per trial (median, p90, total), kept apart for that reason,
  and with LLM rescoring how many lists it rescored (``rescore.fraction_rescored``: those whose
  n-best margin is below ``rescore.unsure_margin``, all without one);
- ``nbest.jsonl``: one JSON object per trial with its candidates
  ``[sentence, acoustic, ngram, llm, total]``, best first.

Each trial goes through the one decoding core (:class:`b2txt.lm.core.DecodingCore`), as in the
LM server and the consumer-group workers. The C++ decoders hold the GIL, so trials are spread
over processes. The decoder (graph or lexicon trie, possibly gigabytes) is loaded once in the
parent and the workers are forked from it: they share its memory copy-on-write instead of each
loading their own. LLM rescoring, when enabled, runs afterwards in the parent (the LLM uses the
GPU or all cores).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.decoded import decoded_row, write_decoded
from ..data.logits import read_logits
from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.console import Log, progress
from ..ground.device import available_cores
from ..ground.errors import B2txtError
from ..ground.fileio import atomic_dir
from ..ground.procs import dies_with_parent
from .core import DecodingCore, load_rescorer, trial_logits
from .nbest import NBest, check_logits
from .rescore import should_rescore


@dataclass(frozen=True)
class TrialResult:
    index: int
    nbest: NBest
    seconds: float


# The core of this process; set in the parent before forking so that workers share its decoder.
_CORE: DecodingCore | None = None


def _decode_one(item: tuple[int, np.ndarray]) -> TrialResult:
    index, logits = item
    assert _CORE is not None
    t0 = time.perf_counter()
    nbest = _CORE.nbest(logits)
    return TrialResult(index, nbest, time.perf_counter() - t0)


def decode_many(core: DecodingCore, logits: Sequence[np.ndarray], workers: int | None = None,
                show_progress: bool = True) -> list[TrialResult]:
    """Decode and augment LM-order logits (checked first, so a bad trial fails before any work), in order."""
    global _CORE
    items = [(i, check_logits(x, f"trial {i}")) for i, x in enumerate(logits)]
    workers = min(workers or available_cores(), max(len(items), 1))
    core.load()
    _CORE = core
    results: list[TrialResult] = []
    try:
        if workers == 1:
            it: Iterator[TrialResult] = map(_decode_one, items)
            results = list(progress(it, desc="decode", total=len(items), unit="trial") if show_progress else it)
        else:
            # fork: the workers inherit the loaded decoder (copy-on-write), nothing is pickled but logits
            with mp.get_context("fork").Pool(workers, initializer=dies_with_parent()) as pool:
                it = pool.imap(_decode_one, items, chunksize=max(1, min(8, len(items) // (4 * workers))))
                results = list(progress(it, desc=f"decode ({workers} processes)", total=len(items), unit="trial")
                               if show_progress else it)
    finally:
        _CORE = None
    return results


def decode_file(logits_path: str | Path, lm_dir: str | Path, out_dir: str | Path, options: DecodeConfig,
                rescore: RescoreConfig | None = None, log: Log = print,
                core: DecodingCore | None = None) -> pd.DataFrame:
    """Decode every trial of a logits file; write ``decoded.csv`` and ``nbest.jsonl`` to ``out_dir``.

    ``core``: a core already built on ``lm_dir`` with ``options``, so that several files decode
    with one load of the graph (benchmarks/ensemble.py); by default one is built here.
    """
    if core is not None and (core.lm_dir != Path(lm_dir) or core.options != options):
        raise ValueError(f"decode_file: the core given ({core.lm_dir}) is not one on {lm_dir} with these options")
    trials = read_logits(logits_path)
    if not trials:
        raise B2txtError(f"{logits_path}: no trials")
    lm_logits = trial_logits(trials, logits_path)
    t0 = time.perf_counter()
    llm = rescore if rescore is not None and rescore.enabled else None
    if core is None:
        core = DecodingCore(lm_dir, options).load()
        log(f"{options.decoder} decoder on {lm_dir} ready in {time.perf_counter() - t0:.1f} s")
    done = decode_many(core, list(lm_logits.values()), options.workers)
    nbests: list[NBest] = [NBest(())] * len(trials)
    seconds = [0.0] * len(trials)
    for i, r in zip(lm_logits, done):
        nbests[i], seconds[i] = r.nbest, r.seconds
    gate = None
    if llm is not None:
        t1 = time.perf_counter()
        unsure = [should_rescore(nb, options, llm.unsure_margin) for nb in nbests]
        if any(unsure):  # a gate that lets nothing through never loads the LLM
            core.rescorer = load_rescorer(llm)
        lists = sum(1 for nb in nbests if nb.candidates)
        log(f"rescoring {sum(unsure)} of {lists} n-best lists with {llm.model} (alpha {llm.alpha}"
            + (f", n-best margin below {llm.unsure_margin}" if llm.unsure_margin is not None else "") + ")")
        nbests = [core.rescore(nb, llm) if u else nb
                  for nb, u in zip(progress(nbests, desc="rescore", unit="trial"), unsure)]
        gate = {"model": llm.model, "alpha": llm.alpha, "unsure_margin": llm.unsure_margin, "lists": lists,
                "rescored": sum(unsure), "fraction_rescored": round(sum(unsure) / lists, 6) if lists else 0.0,
                "seconds": round(time.perf_counter() - t1, 3)}
    table = pd.DataFrame([decoded_row(i, t, nb.best, len(nb)) | {"decode_ms": round(1000 * seconds[i], 3)}
                          for i, (t, nb) in enumerate(zip(trials, nbests))])
    ms = table["decode_ms"]
    timing = {"trials": len(table), "decoder": options.decoder, "workers": options.workers or available_cores(),
              "median_ms": round(float(ms.median()), 3), "p90_ms": round(float(ms.quantile(0.9)), 3),
              "wall_s": round(time.perf_counter() - t0, 3)}
    if gate is not None:  # how many trials the LLM saw (rescore.unsure_margin)
        timing["rescore"] = gate
    with atomic_dir(out_dir) as tmp:
        write_decoded(tmp, table.drop(columns=["decode_ms"]), [nb.candidates for nb in nbests])
        (tmp / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    return table
