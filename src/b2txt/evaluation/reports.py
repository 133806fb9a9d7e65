"""Score reports: the PER and WER tables of a split, and the competition submission CSV."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd

from ..ground.fileio import atomic_dir, atomic_file
from ..ground.phonemes import normalize_text
from .error_rates import aggregate, aggregate_words, bootstrap_ci, word_table

#: What ``score --logits`` writes into its directory, and ``score --decoded``; each replaces its own.
PER_FILES = frozenset({"per_session.csv", "per_corpus.csv", "trials.csv", "metrics.json"})
WER_FILES = frozenset({"wer_per_session.csv", "wer_per_corpus.csv", "wer_trials.csv", "wer.json"})


def _whole(out_dir: str | Path, whole: bool, keep: frozenset[str]) -> contextlib.AbstractContextManager[Path]:
    """``out_dir`` built beside and swapped in whole, or (``whole=False``: the caller's own
    temporary directory) written into as it is."""
    if whole:
        return atomic_dir(out_dir, keep=lambda name: name in keep)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(Path(out_dir))


def write_scores(table: pd.DataFrame, out_dir: str | Path, split: str, *, whole: bool = True) -> dict:
    """``per_session.csv``, ``per_corpus.csv``, ``trials.csv`` and ``metrics.json`` in out_dir."""
    per_session = aggregate(table, "session")
    per_corpus = aggregate(table, "corpus")
    metrics = {
        "split": split,
        "PER": float(table["edits"].sum() / table["ref_len"].sum()),
        "n_trials": int(len(table)),
        "n_phonemes": int(table["ref_len"].sum()),
        "per_session": {r.session: round(float(r.PER), 6) for r in per_session.itertuples()},
    }
    # the directory is swapped whole (unless the caller builds one itself), keeping the word
    # scores `score --decoded` wrote there
    with _whole(out_dir, whole, keep=WER_FILES) as tmp:
        for name, df in (("per_session.csv", per_session), ("per_corpus.csv", per_corpus), ("trials.csv", table)):
            df.to_csv(tmp / name, index=False, float_format="%.6g")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_word_scores(decoded: pd.DataFrame, out_dir: str | Path, split: str, *, whole: bool = True) -> dict:
    """``wer_per_session.csv``, ``wer_per_corpus.csv``, ``wer_trials.csv`` and ``wer.json`` in out_dir."""
    table = word_table(decoded)
    if table.empty:
        raise ValueError("no labelled trials to score")
    per_session = aggregate_words(table, "session")
    per_corpus = aggregate_words(table, "corpus")
    lo, hi = bootstrap_ci(table["word_edits"].to_numpy(), table["ref_words"].to_numpy())
    metrics = {
        "split": split,
        "WER": float(table["word_edits"].sum() / table["ref_words"].sum()),
        "WER_ci95": [round(lo, 6), round(hi, 6)],
        "sentence_error_rate": float((table["word_edits"] > 0).mean()),
        "n_trials": int(len(table)),
        "n_words": int(table["ref_words"].sum()),
        "per_session": {r.session: round(float(r.WER), 6) for r in per_session.itertuples()},
        "per_corpus": {r.corpus: round(float(r.WER), 6) for r in per_corpus.itertuples()},
    }
    # the directory is swapped whole (unless the caller builds one itself), keeping the phoneme
    # scores `score --logits` wrote there
    with _whole(out_dir, whole, keep=PER_FILES) as tmp:
        for name, df in (("wer_per_session.csv", per_session), ("wer_per_corpus.csv", per_corpus),
                         ("wer_trials.csv", table)):
            df.to_csv(tmp / name, index=False, float_format="%.6g")
        (tmp / "wer.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_submission(decoded: pd.DataFrame, path: str | Path) -> int:
    """The competition CSV (REFERENCE §7): ``id,text``, ids 0..N-1 in session order, then trial order.

    Trial order within a session is the order of the source file's trials (block, then trial
    number); the text is normalised as for scoring. Returns the number of rows.
    """
    order = decoded.assign(_src=decoded["source_trial"].astype(str)).sort_values(
        ["session", "_src", "block_num", "trial_num"], kind="stable")
    out = pd.DataFrame({"id": range(len(order)),
                        "text": [normalize_text(str(s)) for s in order["decoded"]]})
    with atomic_file(path) as tmp:
        out.to_csv(tmp, index=False)
    return len(out)
