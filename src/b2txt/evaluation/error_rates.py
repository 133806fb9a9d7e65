"""Error rates: edit distances, per-trial tables and their aggregates, bootstrap intervals.

Rates are aggregate: total edit distance over total reference length (REFERENCE §6).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..data.logits import greedy_decode
from ..ground.phonemes import ids_to_string


def edit_distance(hyp: Sequence, ref: Sequence) -> int:
    """Levenshtein distance (substitution, insertion and deletion each cost 1)."""
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, start=1):
        cur = [i]
        for j, r in enumerate(ref, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def phoneme_table(trials) -> pd.DataFrame:
    """One row per labelled trial: session, corpus, day, edits, reference length, decoded ids."""
    rows = []
    for t in trials:
        if t.labels is None:
            continue
        hyp = greedy_decode(t.logits)
        ref = t.labels.tolist()
        rows.append({
            "session": t.attrs["session"], "corpus": t.attrs.get("corpus", "unknown"),
            "post_implant_day": int(t.attrs.get("post_implant_day", -1)),
            "block_num": int(t.attrs["block_num"]), "trial_num": int(t.attrs["trial_num"]),
            "edits": edit_distance(hyp, ref), "ref_len": len(ref),
            "decoded": ids_to_string(hyp), "reference": ids_to_string(ref),
        })
    return pd.DataFrame(rows)


def aggregate(table: pd.DataFrame, by: str) -> pd.DataFrame:
    g = table.groupby(by, sort=True).agg(n_trials=("edits", "size"), edits=("edits", "sum"),
                                         ref_len=("ref_len", "sum"))
    if by == "session":
        g["post_implant_day"] = table.groupby("session")["post_implant_day"].first()
    g["PER"] = g["edits"] / g["ref_len"]
    return g.reset_index()


def bootstrap_ci(edits: np.ndarray, ref_len: np.ndarray, n_resamples: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the aggregate error rate over trials resampled with replacement."""
    edits = np.asarray(edits, dtype=float)
    ref_len = np.asarray(ref_len, dtype=float)
    if len(edits) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(edits), size=(n_resamples, len(edits)))
    rates = edits[idx].sum(1) / np.maximum(ref_len[idx].sum(1), 1e-12)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(rates, [tail, 100 - tail])
    return float(lo), float(hi)


def word_table(decoded: pd.DataFrame) -> pd.DataFrame:
    """Per labelled trial: word edits (substitutions + deletions + insertions, words split on
    whitespace; equal to jiwer's counts, a test checks) and reference words."""
    rows = decoded[decoded["reference"].astype(str).str.strip() != ""].copy()
    refs = [r.split() for r in rows["reference"].astype(str)]
    rows["word_edits"] = [edit_distance(h.split(), r) for h, r in zip(rows["decoded"].astype(str), refs)]
    rows["ref_words"] = [len(r) for r in refs]
    return rows


def aggregate_words(table: pd.DataFrame, by: str) -> pd.DataFrame:
    g = table.groupby(by, sort=True).agg(n_trials=("word_edits", "size"), word_edits=("word_edits", "sum"),
                                         ref_words=("ref_words", "sum"))
    if by == "session" and "post_implant_day" in table:
        g["post_implant_day"] = table.groupby("session")["post_implant_day"].first()
    g["WER"] = g["word_edits"] / g["ref_words"]
    return g.reset_index()
