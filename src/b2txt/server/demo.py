"""Synthetic phoneme logits for a sentence: exercising an LM server without a trained model.

Tests and ``benchmarks/server.py`` need trials whose correct decoding is known. Each phoneme of
the sentence's label (words, each followed by SIL) gets a few frames peaked on its column, with
blank frames between and Gaussian noise on every value, in LM column order (REFERENCE §2) —
what the server receives on ``remote_lm_input``.
"""

from __future__ import annotations

import numpy as np

from ..phonemes import LM_ORDER, N_CLASSES, PHONEME_TO_ID, Lexicon

#: LM column of each phoneme name (blank 0, SIL 1, AA 2, …).
LM_COLUMN = {name: LM_ORDER.index(class_id) for name, class_id in PHONEME_TO_ID.items()}


def synthetic_logits(sentence: str, lexicon: Lexicon, rng: np.random.Generator, noise: float = 1.0,
                     peak: float = 8.0, frames: tuple[int, int] = (1, 3)) -> np.ndarray:
    """``[T, 41]`` float32 logits (LM order) that decode to ``sentence`` when noise is moderate."""
    rows: list[np.ndarray] = []

    def emit(column: int, n: int) -> None:
        for _ in range(n):
            row = rng.normal(0.0, noise, N_CLASSES).astype(np.float32)
            row[column] += peak
            rows.append(row)

    emit(0, 2)
    for phone in lexicon.sentence_phonemes(sentence):
        emit(LM_COLUMN[phone], int(rng.integers(frames[0], frames[1] + 1)))
        emit(0, int(rng.integers(0, 2)))
    emit(0, 2)
    return np.stack(rows).astype(np.float32)
