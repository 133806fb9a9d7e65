"""The decoded sentences of a split: ``decoded.csv`` and ``nbest.jsonl``.

``b2txt decode`` (in process) and ``b2txt evaluate`` (through Redis) write the same two files:

- ``decoded.csv``: one row per trial of the logits file (trial index, session, split, source
  file, block, trial number, corpus, post-implant day, the normalised reference sentence when
  known, the decoded sentence, the number of candidates). Deterministic: timing goes elsewhere.
- ``nbest.jsonl``: one JSON object per trial, ``{"trial", "session", "candidates"}``, each
  candidate ``[sentence, acoustic, ngram, llm, total]``, best first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..ground.errors import B2txtError
from ..ground.phonemes import normalize_text
from .logits import LogitsTrial

#: Columns ``b2txt score --decoded`` and ``b2txt submission`` need.
REQUIRED = ("session", "trial_num", "block_num", "decoded", "reference")


def decoded_row(index: int, trial: LogitsTrial, sentence: str, n_candidates: int) -> dict[str, Any]:
    """One row of ``decoded.csv``."""
    a = trial.attrs
    label = str(a.get("sentence_label", "") or "")
    return {
        "trial": index, "session": a.get("session", ""), "split": a.get("split", ""),
        "source_trial": a.get("source_trial", ""), "block_num": int(a.get("block_num", -1)),
        "trial_num": int(a.get("trial_num", -1)), "corpus": a.get("corpus", "unknown"),
        "post_implant_day": int(a.get("post_implant_day", -1)),
        "reference": normalize_text(label) if label else "", "decoded": sentence, "n_candidates": n_candidates,
    }


def write_decoded(directory: Path, table: pd.DataFrame, candidates: Sequence[Sequence[Sequence[Any]]]) -> None:
    """``decoded.csv`` (``table``, one row per trial) and ``nbest.jsonl`` (``candidates[i]`` of row i)."""
    table.to_csv(directory / "decoded.csv", index=False)
    with open(directory / "nbest.jsonl", "w") as f:
        for trial, session, cands in zip(table["trial"], table["session"], candidates):
            f.write(json.dumps({"trial": int(trial), "session": session,
                                "candidates": [list(c) for c in cands]}) + "\n")


def read_decoded(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise B2txtError(f"{path}: decoded file not found (run `b2txt decode`)")
    table = pd.read_csv(path, keep_default_na=False)
    missing = set(REQUIRED) - set(table.columns)
    if missing:
        raise B2txtError(f"{path}: not a decoded file, columns missing: {sorted(missing)}")
    return table
