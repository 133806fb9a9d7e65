"""The decoder interface: input checks, per-frame scores, n-best lists and their augmentation.

Every decoder takes logits ``[T, 41]`` in **language-model column order** (blank, SIL, AA … ZH;
:func:`b2txt.ground.phonemes.to_lm_order`), as the published LM server receives them, and returns an
:class:`NBest`. Scores are natural logs, higher is better:

- ``acoustic``: sum over the frames of the chosen alignment of :func:`frame_log_probs`
  (log-softmax, blank lowered by ``log(blank_penalty)``), *not* multiplied by the acoustic scale;
- ``ngram``: the n-gram log-probability of the sentence (the graph weight for WFST decoding);
- ``llm``: the large LM's log-probability (0 until :mod:`b2txt.lm.rescore` fills it in);
- ``total``: ``acoustic_scale · acoustic + ngram + length_penalty · words`` before rescoring,
  ``acoustic_scale · acoustic + (1 − α) · ngram + α · llm + length_penalty · words`` after.

Candidates are ordered by total (descending), ties broken by sentence text, so two runs and
two decoders give the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import numpy as np

from ..ground.config import DecodeConfig
from ..ground.errors import B2txtError
from ..ground.phonemes import N_CLASSES


class DecodeInputError(B2txtError):
    """Logits a decoder cannot take (shape, dtype, non-finite values)."""


class Candidate(NamedTuple):
    sentence: str
    acoustic: float
    ngram: float
    llm: float
    total: float

    @property
    def n_words(self) -> int:
        return len(self.sentence.split())


class NBest(NamedTuple):
    """Candidates, best first. ``best`` is the decoded sentence ('' when there is none)."""

    candidates: tuple[Candidate, ...]

    @property
    def best(self) -> str:
        return self.candidates[0].sentence if self.candidates else ""

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.candidates)


class PartialDecoder(Protocol):
    """One streaming trial: each chunk of logits advances the search from where it stopped, so a
    trial sent in k chunks costs one pass over its frames, not k (the LM server's partials)."""

    def advance(self, logits: np.ndarray) -> str:
        """Search the chunk's frames; the best sentence so far (final-state costs left out)."""
        ...


class Decoder(Protocol):
    """What every decoder offers; construct one with :func:`b2txt.lm.core.make_decoder`."""

    options: DecodeConfig

    def decode(self, logits: np.ndarray) -> NBest: ...

    def stream(self) -> PartialDecoder:
        """A search state of its own for one streaming trial (the graph or trie is shared)."""
        ...


def check_logits(logits: object, what: str = "logits") -> np.ndarray:
    """``logits`` as a C-contiguous float32 ``[T, 41]`` array, or one clear error.

    Checked before any decoder sees them: the C++ decoders read out of bounds on a wrong width.
    """
    if not isinstance(logits, np.ndarray):
        raise DecodeInputError(f"{what}: expected a numpy array, got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[1] != N_CLASSES:
        raise DecodeInputError(f"{what}: expected shape [T, {N_CLASSES}], got {list(logits.shape)}")
    if logits.shape[0] < 1:
        raise DecodeInputError(f"{what}: no frames (T = 0)")
    if logits.dtype != np.float32:
        raise DecodeInputError(f"{what}: expected float32, got {logits.dtype}")
    if not np.isfinite(logits).all():
        bad = np.argwhere(~np.isfinite(logits))[0]
        raise DecodeInputError(f"{what}: non-finite value at frame {bad[0]}, column {bad[1]}")
    return np.ascontiguousarray(logits)


def frame_log_probs(logits: np.ndarray, opts: DecodeConfig) -> np.ndarray:
    """Per-frame log-probabilities the search uses (unscaled), blank-skipped frames removed.

    Log-softmax (a per-frame constant, so rankings equal those on raw logits), then the blank
    column (0 in LM order) lowered by ``log(blank_penalty)``. Frames whose blank probability is
    at least ``blank_skip_threshold`` are dropped when the threshold is below 1 (1 keeps all).
    """
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    if opts.blank_skip_threshold < 1.0:
        keep = np.exp(logp[:, 0]) < opts.blank_skip_threshold
        if keep.any():  # never skip every frame
            logp = logp[keep]
    logp[:, 0] -= math.log(opts.blank_penalty)
    return logp.astype(np.float32)


def total_score(acoustic: float, ngram: float, n_words: int, opts: DecodeConfig,
                llm: float | None = None, alpha: float = 0.0) -> float:
    if llm is None:
        return opts.acoustic_scale * acoustic + ngram + opts.length_penalty * n_words
    return (opts.acoustic_scale * acoustic + (1 - alpha) * ngram + alpha * llm
            + opts.length_penalty * n_words)


def make_nbest(candidates: Iterable[Candidate], limit: int | None = None) -> NBest:
    """Sort by total (descending, ties by text), keep the best-scored copy of each sentence."""
    ordered = sorted(candidates, key=lambda c: (-c.total, c.sentence))
    seen: set[str] = set()
    out = []
    for c in ordered:
        if c.sentence in seen:
            continue
        seen.add(c.sentence)
        out.append(c)
        if limit is not None and len(out) >= limit:
            break
    return NBest(tuple(out))


def augment_nbest(nbest: NBest, top: int = 20, penalty: float = 0.01) -> NBest:
    """REFERENCE §4 n-best augmentation.

    Among the ``top`` best candidates, every pair with the same number of words yields new
    sentences: for each position where the two differ, the word of one is put into the other
    (both directions). A new sentence's scores are the pair's mean scores lowered by
    ``penalty`` of their magnitude (1 % by default), so it ranks just below an equally
    supported original. Sentences already in the list keep their original scores.
    """
    if top <= 1 or len(nbest) < 2:
        return nbest
    head = nbest.candidates[:top]
    known = {c.sentence for c in nbest.candidates}
    new: dict[str, Candidate] = {}
    for i, a in enumerate(head):
        wa = a.sentence.split()
        for b in head[i + 1:]:
            wb = b.sentence.split()
            if len(wa) != len(wb) or wa == wb:
                continue
            mean = [(x + y) / 2 for x, y in zip(a[1:], b[1:])]
            scores = [m - penalty * abs(m) for m in mean]
            for k in range(len(wa)):
                if wa[k] == wb[k]:
                    continue
                for words, other in ((wa, wb), (wb, wa)):
                    s = " ".join(words[:k] + [other[k]] + words[k + 1:])
                    if s in known:
                        continue
                    cand = Candidate(s, *scores)
                    if s not in new or cand.total > new[s].total:
                        new[s] = cand
    return make_nbest([*nbest.candidates, *new.values()])


def scoring_string(nbest: NBest) -> str:
    """The published ``scoring`` field: rows ``sentence;acoustic;ngram;llm;total`` joined by ``;``."""
    return ";".join(f"{c.sentence};{c.acoustic:.6g};{c.ngram:.6g};{c.llm:.6g};{c.total:.6g}"
                    for c in nbest.candidates)


def parse_scoring(text: str) -> NBest:
    """Inverse of :func:`scoring_string` (as the published client reads it)."""
    if not text:
        return NBest(())
    parts = text.split(";")
    if len(parts) % 5:
        raise ValueError(f"scoring field has {len(parts)} parts, not a multiple of 5")
    rows = [Candidate(parts[i], *map(float, parts[i + 1:i + 5])) for i in range(0, len(parts), 5)]
    return make_nbest(rows)
