"""Error rates and score tables.

Rates are aggregate: total edit distance over total reference length (REFERENCE §6).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .fileio import atomic_file, write_text_atomic


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
    from .infer import greedy_decode
    from .phonemes import ids_to_string

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


def write_scores(table: pd.DataFrame, out_dir: str | Path, split: str) -> dict:
    """``per_session.csv``, ``per_corpus.csv``, ``trials.csv`` and ``metrics.json`` in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_session = aggregate(table, "session")
    per_corpus = aggregate(table, "corpus")
    for name, df in (("per_session.csv", per_session), ("per_corpus.csv", per_corpus), ("trials.csv", table)):
        with atomic_file(out_dir / name) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
    metrics = {
        "split": split,
        "PER": float(table["edits"].sum() / table["ref_len"].sum()),
        "n_trials": int(len(table)),
        "n_phonemes": int(table["ref_len"].sum()),
        "per_session": {r.session: round(float(r.PER), 6) for r in per_session.itertuples()},
    }
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


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
