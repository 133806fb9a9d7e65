"""The logits file: phoneme logits of every trial of a split, and greedy CTC decoding.

HDF5, one group per trial, ``trial_00000`` … in manifest order, holding dataset ``logits``
(float32 ``[T', 41]``, model column order — see :func:`b2txt.ground.phonemes.to_lm_order` for the
language-model order) and, for labelled trials, ``seq_class_ids`` (unpadded); attributes
``session``, ``split``, ``source_trial``, ``block_num``, ``trial_num``, ``corpus``,
``post_implant_day``, ``sentence_label`` (empty when unknown).

Kept free of torch so that decoding processes stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ..ground.errors import B2txtError
from ..ground.fileio import atomic_file
from ..ground.outputs import write_hdf5, writing
from ..ground.phonemes import BLANK_ID, N_CLASSES


def greedy_decode(logits: np.ndarray) -> list[int]:
    """Best path: arg-max per frame, merge repeats, drop blanks."""
    best = np.asarray(logits).argmax(-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(c) for c in best[keep] if c != BLANK_ID]


def write_logits(path: str | Path, rows: pd.DataFrame, logits: list[np.ndarray],
                 labels: list[np.ndarray | None]) -> None:
    # built in memory, then written: a full disk is one error naming the path, and HDF5 never holds
    # a half-written file (it crashed the interpreter at exit)
    with atomic_file(path) as tmp, writing(path):
        write_hdf5(tmp, lambda f: _fill_logits(f, rows, logits, labels))


def _fill_logits(f: h5py.File, rows: pd.DataFrame, logits: list[np.ndarray], labels: list[np.ndarray | None]) -> None:
    f.attrs["n_classes"] = N_CLASSES
    f.attrs["column_order"] = "model"  # blank, AA..ZH, SIL
    for i, (row, lg, lab) in enumerate(zip(rows.itertuples(index=False), logits, labels)):
        g = f.create_group(f"trial_{i:05d}")
        g.create_dataset("logits", data=lg.astype(np.float32))
        if lab is not None:
            g.create_dataset("seq_class_ids", data=np.asarray(lab, dtype=np.int32))
        g.attrs["session"] = row.session
        g.attrs["split"] = row.split
        g.attrs["source_trial"] = row.trial
        g.attrs["block_num"] = int(row.block_num)
        g.attrs["trial_num"] = int(row.trial_num)
        g.attrs["corpus"] = str(row.corpus)
        g.attrs["post_implant_day"] = int(row.post_implant_day)
        g.attrs["sentence_label"] = str(row.sentence)


def write_logits_trials(path: str | Path, trials: list[LogitsTrial], file_attrs: dict | None = None) -> None:
    """Write trials as read by :func:`read_logits` (their attributes as they were), e.g. an
    ensemble of several files; ``file_attrs`` are added to the file's own attributes."""
    def fill(f: h5py.File) -> None:
        f.attrs["n_classes"] = N_CLASSES
        f.attrs["column_order"] = "model"
        for key, value in (file_attrs or {}).items():
            f.attrs[key] = value
        for i, t in enumerate(trials):
            g = f.create_group(f"trial_{i:05d}")
            g.create_dataset("logits", data=np.asarray(t.logits, dtype=np.float32))
            if t.labels is not None:
                g.create_dataset("seq_class_ids", data=np.asarray(t.labels, dtype=np.int32))
            for key, value in t.attrs.items():
                g.attrs[key] = value

    with atomic_file(path) as tmp, writing(path):
        write_hdf5(tmp, fill)


@dataclass
class LogitsTrial:
    logits: np.ndarray
    labels: np.ndarray | None
    attrs: dict


#: The column orders this reader knows: ``model`` (blank, AA..ZH, SIL), what ``write_logits`` writes.
COLUMN_ORDERS = ("model",)

#: What h5py raises on a damaged file (a name it cannot decode is a UnicodeDecodeError, a ValueError).
_DAMAGE = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def _attr_text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_logits(path: str | Path) -> list[LogitsTrial]:
    """Every trial of a logits file, checked: a known column order and class count, and per trial
    float ``[T, 41]`` logits with at least one frame and no NaN/Inf; otherwise one error naming
    the file and trial (never a silently empty or NaN result downstream). A damaged file is one
    error naming it, never an h5py exception."""
    try:
        return _read_logits(Path(path))
    except B2txtError:
        raise
    except _DAMAGE as exc:
        raise B2txtError(f"{path}: cannot read logits file, it is truncated or damaged "
                         f"({type(exc).__name__}: {exc})") from None


def _read_logits(path: Path) -> list[LogitsTrial]:
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise B2txtError(f"{path}: cannot read logits file: {exc}") from None
    out = []
    with f:
        order = _attr_text(f.attrs.get("column_order", "model"))
        if order not in COLUMN_ORDERS:
            raise B2txtError(f"{path}: attr column_order: {order!r} is not a column order b2txt knows "
                             f"({', '.join(COLUMN_ORDERS)}: blank, AA..ZH, SIL)")
        n_classes = f.attrs.get("n_classes", N_CLASSES)
        if np.asarray(n_classes).size != 1 or int(np.asarray(n_classes).reshape(())) != N_CLASSES:
            raise B2txtError(f"{path}: attr n_classes: {n_classes!r}, expected {N_CLASSES}")
        for name in sorted(f.keys()):
            g = f[name]
            if not isinstance(g, h5py.Group) or "logits" not in g or not isinstance(g["logits"], h5py.Dataset):
                raise B2txtError(f"{path}: {name}: dataset logits missing")
            lg = g["logits"][()]
            if lg.ndim != 2 or lg.shape[1] != N_CLASSES:
                raise B2txtError(f"{path}: {name}: logits shape {lg.shape}, expected [T, {N_CLASSES}]")
            if lg.dtype.kind != "f":
                raise B2txtError(f"{path}: {name}: logits dtype {lg.dtype}, expected float")
            if lg.shape[0] == 0:
                raise B2txtError(f"{path}: {name}: no frames (T = 0): the trial is shorter than the model's patch")
            bad = ~np.isfinite(lg)
            if bad.any():
                row, col = np.argwhere(bad)[0]
                raise B2txtError(f"{path}: {name}: {int(bad.sum())} NaN/Inf logit(s), first at frame {row}, "
                                 f"column {col}")
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
            out.append(LogitsTrial(lg, g["seq_class_ids"][()] if "seq_class_ids" in g else None, attrs))
    return out
