"""Ensembles of logits: several models' (or one model's under several input transforms) phoneme
log-probabilities averaged per frame.

Each member's logits go through log-softmax per frame; the ensemble's frame is the weighted mean
of those log-probabilities (a weighted geometric mean of the probabilities), normalised again by
log-softmax, so the output is itself a log-probability per frame. An ensemble of one is its
member's log-softmax, an ensemble of a file with itself is that file's log-softmax. Decoding
(log-softmax per frame) and greedy PER (arg-max) read it like any logits file.

The members must have the same trials, in the same order, and the same number of frames per
trial (models of one patch size and stride): frames are averaged position by position.
Kept free of torch, like :mod:`b2txt.data.logits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..ground.errors import B2txtError
from .logits import LogitsTrial, read_logits, write_logits_trials

#: The attributes that say which trial a group holds (the same in every member file).
TRIAL_KEYS = ("session", "split", "source_trial", "block_num", "trial_num")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Per-frame log-softmax in float64 (an empty ``[0, C]`` stays empty)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.shape[0] == 0:
        return x
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def check_weights(weights: Sequence[float] | None, n: int, what: str = "weights") -> np.ndarray:
    """Member weights as an array (equal when None): as many as members, none negative, sum above 0."""
    w = np.ones(n) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if w.shape != (n,):
        raise B2txtError(f"{what}: {len(w)} weight(s) for {n} member(s)")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise B2txtError(f"{what}: weights must be finite, not negative, and not all zero (got {w.tolist()})")
    return w


def average_log_probs(members: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """One trial's ensemble: the weighted mean of the members' per-frame log-softmax, normalised
    again (float32 ``[T, C]``). All members must have the same shape."""
    if not members:
        raise B2txtError("an ensemble needs at least one member")
    w = check_weights(weights, len(members))
    shape = np.shape(members[0])
    for m in members[1:]:
        if np.shape(m) != shape:
            raise B2txtError(f"ensemble members of shapes {shape} and {np.shape(m)}: frames must match")
    acc = np.zeros(shape, dtype=np.float64)
    for wi, m in zip(w, members):
        if wi:
            acc += wi * log_softmax(m)
    return log_softmax(acc / w.sum()).astype(np.float32)


def _describe(t: LogitsTrial) -> str:
    return f"session {t.attrs.get('session')} trial {t.attrs.get('source_trial')}"


def check_same_trials(paths: Sequence[Path], files: Sequence[list[LogitsTrial]]) -> None:
    """Every member file holds the first one's trials, in its order, with as many frames each."""
    first, ref = paths[0], files[0]
    for path, trials in zip(paths[1:], files[1:]):
        if len(trials) != len(ref):
            raise B2txtError(f"{path}: {len(trials)} trials, but {first} has {len(ref)}: the members of an "
                             "ensemble must be logits of the same trials (same split, same sessions)")
        for i, (a, b) in enumerate(zip(ref, trials)):
            name = f"trial_{i:05d}"
            if any(a.attrs.get(k) != b.attrs.get(k) for k in TRIAL_KEYS):
                raise B2txtError(f"{path}: {name} is {_describe(b)}, but in {first} it is {_describe(a)}: "
                                 "the members of an ensemble must be logits of the same trials")
            if b.logits.shape[0] != a.logits.shape[0]:
                raise B2txtError(f"{path}: {name} ({_describe(b)}) has {b.logits.shape[0]} frames, but "
                                 f"{a.logits.shape[0]} in {first}: ensemble members need the same patch size "
                                 "and stride")


def ensemble_files(paths: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None) -> int:
    """Write the ensemble of the logits files ``paths`` to ``out``; returns the number of trials.
    Trial attributes and labels come from the first file (they are checked to be the same trials)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise B2txtError("an ensemble needs at least one logits file")
    w = check_weights(weights, len(paths), "ensemble weights")
    files = [read_logits(p) for p in paths]
    check_same_trials(paths, files)
    trials = [LogitsTrial(average_log_probs([f[i].logits for f in files], w), t.labels, t.attrs)
              for i, t in enumerate(files[0])]
    write_logits_trials(out, trials, {"ensemble_of": [str(p) for p in paths], "ensemble_weights": w.tolist()})
    return len(trials)
