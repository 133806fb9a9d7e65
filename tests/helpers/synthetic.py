"""Synthetic phoneme logits whose correct decoding is known: the language-model decoders and the
LM server exercised without a trained model (tests and benchmarks/)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from b2txt.data.logits import write_logits
from b2txt.ground.phonemes import BLANK_ID, CLASSES, LM_ORDER, N_CLASSES, PHONEME_TO_ID, SIL_ID, Lexicon, from_lm_order

from .arpa import template_sentences


def phoneme_logits(ids: list[int] | np.ndarray, rng: np.random.Generator, frames_per_phoneme: tuple[int, int] = (2, 4),
                   blank_frames: tuple[int, int] = (0, 3), peak: float = 8.0, noise_sd: float = 1.0,
                   confusion: float = 0.0, runner_up: float | None = None) -> np.ndarray:
    """Model-order logits ``[T, 41]`` (float32) that a phoneme decoder could emit for ``ids``.

    Each phoneme is the top class for a random number of frames, with blank frames between;
    Gaussian noise of ``noise_sd`` on every logit, and with probability ``confusion`` a phoneme's
    frames favour a random other phoneme instead (a decoding error the LM must fix); with
    ``runner_up`` the true phoneme stays second there, ``runner_up`` below the peak, as in a
    trained model's uncertain errors. For tests and benchmarks of the language-model decoders,
    where a trained model is not the point.
    """
    rows: list[np.ndarray] = []

    def frames(cls: int, n: int, second: int | None = None) -> None:
        for _ in range(n):
            row = rng.normal(0.0, noise_sd, N_CLASSES)
            row[cls] += peak
            if second is not None:
                row[second] += peak - runner_up
            rows.append(row)

    frames(0, int(rng.integers(blank_frames[0], blank_frames[1] + 1)) + 1)
    for i in ids:
        shown, second = int(i), None
        if confusion > 0 and rng.random() < confusion:
            shown = int(rng.integers(1, N_CLASSES))
            second = int(i) if runner_up is not None and shown != int(i) else None
        frames(shown, int(rng.integers(frames_per_phoneme[0], frames_per_phoneme[1] + 1)), second)
        frames(0, int(rng.integers(blank_frames[0], blank_frames[1] + 1)))
    frames(0, 1)
    return np.asarray(rows, dtype=np.float32)


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


def synthetic_logits_file(path: Path, lexicon: Lexicon, n: int, split: str = "val", seed: int = 1,
                          noisy_every: int = 0) -> Path:
    """A logits file (as `b2txt infer` writes, model column order) of ``n`` labelled trials of the
    template sentences over three sessions; with ``noisy_every`` every such trial is noisy, so some
    decode wrong and the WER is not 0."""
    sentences = template_sentences(300)
    rng = np.random.default_rng(seed)
    rows, logits, labels = [], [], []
    for i in range(n):
        s = sentences[i % len(sentences)]
        rows.append({"session": f"t15.2023.08.{11 + i % 3:02d}", "split": split, "trial": i, "block_num": 1,
                     "trial_num": i, "corpus": "Fortunes", "post_implant_day": 25 + i % 3, "sentence": s})
        noisy = dict(noise=2.0, peak=4.0) if noisy_every and i % noisy_every == noisy_every - 1 else {}
        logits.append(from_lm_order(synthetic_logits(s, lexicon, rng, **noisy)))
        labels.append(np.asarray(lexicon.sentence_ids(s)))
    write_logits(path, pd.DataFrame(rows), logits, labels)
    return path


def ids_to_words(ids: Sequence[int], lexicon: Lexicon) -> str:
    """Greedy phonemes to text without a language model: split at SIL, look each word up.

    The no-LM baseline the decoders are compared with; a phoneme string that is no word stays out.
    """
    words, current = [], []
    for i in [*ids, SIL_ID]:
        if i == SIL_ID:
            if current:
                word = lexicon.word_for([CLASSES[c] for c in current])
                if word is not None:
                    words.append(word)
            current = []
        elif i != BLANK_ID:
            current.append(i)
    return " ".join(words)


def trials_file(path: Path, lexicon: Lexicon, sentences: Sequence[str], seed: int = 0, **kw) -> tuple[Path, list[np.ndarray]]:
    """A val logits file of ``sentences`` (phoneme_logits per sentence, two sessions), and its logits."""
    rng = np.random.default_rng(seed)
    logits = [phoneme_logits(lexicon.sentence_ids(s), rng, **kw) for s in sentences]
    rows = pd.DataFrame({
        "session": [f"t15.2023.08.{11 + i % 2:02d}" for i in range(len(sentences))],
        "split": "val", "trial": [f"trial_{i:04d}" for i in range(len(sentences))],
        "block_num": 1, "trial_num": range(len(sentences)), "corpus": "Fortunes",
        "post_implant_day": 25, "sentence": sentences,
    })
    write_logits(path, rows, logits, [lexicon.sentence_ids(s) for s in sentences])
    return path, logits
