"""The Dryad HDF5 layout of the published data set (REFERENCE §1): read, write, check.

``<root>/hdf5_data_final/<session>/data_{train,val,test}.hdf5``; each file holds one group per
trial (``trial_0000`` …) with dataset ``input_features`` (float32 ``[T, 512]``), and for labelled
splits ``seq_class_ids`` (phoneme ids 1..40, zero-padded to 500) and ``transcription`` (ASCII
codes, zero-padded to 500); attributes ``n_time_steps``, ``seq_len``, ``block_num``,
``trial_num``, ``session`` and ``sentence_label``. Test files carry no labels.

Every reader goes through :func:`check_trial`, so a malformed file is reported with its file,
trial and field instead of failing deep inside h5py or torch.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..ground.errors import DataError
from ..ground.outputs import write_hdf5
from ..ground.phonemes import N_CLASSES

N_FEATURES = 512
MAX_SEQ_ELEMENTS = 500
SPLITS: tuple[str, ...] = ("train", "val", "test")
LABELLED_SPLITS: tuple[str, ...] = ("train", "val")
DATA_SUBDIR = "hdf5_data_final"
SESSION_RE = re.compile(r"^t15\.(\d{4})\.(\d{2})\.(\d{2})$")
TRIAL_RE = re.compile(r"^trial_\d{4,}$")
FILE_RE = re.compile(r"^data_(train|val|test)\.hdf5$")


@dataclass
class Trial:
    """One attempted sentence. ``phoneme_ids`` and ``sentence`` are None in test files."""

    features: np.ndarray  # float32 [T, 512]
    session: str
    block_num: int
    trial_num: int
    sentence: str | None = None
    phoneme_ids: np.ndarray | None = None  # int, unpadded, values 1..40

    @property
    def n_time_steps(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class DataFile:
    session: str
    split: str
    path: Path


def session_date(session: str) -> dt.date:
    m = SESSION_RE.match(session)
    if not m:
        raise ValueError(f"session name {session!r} is not of the form t15.YYYY.MM.DD")
    return dt.date(int(m[1]), int(m[2]), int(m[3]))


def session_name(date: dt.date) -> str:
    return f"t15.{date:%Y.%m.%d}"


def data_root(data_dir: str | Path) -> Path:
    """The directory holding the session folders (accepts the Dryad root or the folder itself)."""
    data_dir = Path(data_dir)
    if (data_dir / DATA_SUBDIR).is_dir():
        return data_dir / DATA_SUBDIR
    return data_dir


#: What :func:`discover` says of a link that leads nowhere: a file or session lost, never skippable.
LOST_LINK = "symbolic link"


def broken_link(path: Path) -> str | None:
    """Why ``path`` is a symbolic link that leads to nothing (dangling or looping), else None."""
    if not path.is_symlink():
        return None
    try:
        path.resolve(strict=True)
    except FileNotFoundError:
        return f"dangling {LOST_LINK} (-> {os.readlink(path)}): its target does not exist"
    except (OSError, RuntimeError):  # ELOOP (RuntimeError before Python 3.13)
        return f"looping {LOST_LINK} (-> {os.readlink(path)}): it never reaches a file"
    return None


def data_file_path(data_dir: str | Path, session: str, split: str) -> Path:
    return Path(data_dir) / DATA_SUBDIR / session / f"data_{split}.hdf5"


def discover(data_dir: str | Path) -> tuple[list[DataFile], list[str]]:
    """All data files below ``data_dir`` in session then split order, and layout problems."""
    root = data_root(data_dir)
    if not root.is_dir():
        broken = broken_link(Path(data_dir))
        raise DataError(f"{data_dir}: data directory does not exist" + (f" ({broken})" if broken else ""))
    files: list[DataFile] = []
    problems: list[str] = []
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    # A link that leads nowhere is reported, never skipped: skipping it would silently drop a
    # session (or, for a data file, a whole split) from everything downstream.
    problems += [f"{p}: {broken_link(p)}" for p in entries if broken_link(p)]
    for sdir in (p for p in entries if p.is_dir()):
        try:
            session_date(sdir.name)
        except ValueError:
            problems.append(f"{sdir}: session name {sdir.name!r} is not of the form t15.YYYY.MM.DD")
            continue
        for f in sorted(sdir.iterdir()):
            if f.name.startswith("."):
                continue
            if broken_link(f):
                problems.append(f"{f}: {broken_link(f)}")
            elif not FILE_RE.match(f.name):
                problems.append(f"{f}: unexpected file (expected data_train/val/test.hdf5)")
            elif not f.is_file():
                problems.append(f"{f}: not a regular file")
        for split in SPLITS:
            path = sdir / f"data_{split}.hdf5"
            if path.is_file():
                files.append(DataFile(sdir.name, split, path))
    if not files and not problems:
        problems.append(f"{root}: no session folders with data_*.hdf5 files")
    return files, problems


# ----------------------------------------------------------------------------- writing

def _padded(values: np.ndarray, name: str) -> np.ndarray:
    if len(values) > MAX_SEQ_ELEMENTS:
        raise ValueError(f"{name} has {len(values)} elements, more than {MAX_SEQ_ELEMENTS}")
    out = np.zeros(MAX_SEQ_ELEMENTS, dtype=np.int32)
    out[: len(values)] = values
    return out


def write_trials(path: str | Path, trials: list[Trial]) -> None:
    """Write one ``data_<split>.hdf5`` file; labels are written only when a trial has them.
    Built in memory (:func:`~b2txt.ground.outputs.write_hdf5`): a full disk is a plain OSError."""
    write_hdf5(path, lambda f: _fill_trials(f, trials))


def _fill_trials(f: h5py.File, trials: list[Trial]) -> None:
    for i, t in enumerate(trials):
        g = f.create_group(f"trial_{i:04d}")
        g.create_dataset("input_features", data=np.asarray(t.features, dtype=np.float32))
        g.attrs["n_time_steps"] = np.int64(t.n_time_steps)
        g.attrs["block_num"] = np.int64(t.block_num)
        g.attrs["trial_num"] = np.int64(t.trial_num)
        g.attrs["session"] = t.session
        if t.phoneme_ids is not None:
            ids = np.asarray(t.phoneme_ids, dtype=np.int32)
            g.create_dataset("seq_class_ids", data=_padded(ids, "seq_class_ids"))
            g.attrs["seq_len"] = np.int64(len(ids))
        if t.sentence is not None:
            codes = np.frombuffer(t.sentence.encode("ascii"), dtype=np.uint8).astype(np.int32)
            g.create_dataset("transcription", data=_padded(codes, "transcription"))
            g.attrs["sentence_label"] = t.sentence


# ----------------------------------------------------------------------------- checking

def _attr_int(g: h5py.Group, name: str, where: str, problems: list[str]) -> int | None:
    if name not in g.attrs:
        problems.append(f"{where}: attr {name}: missing")
        return None
    value = g.attrs[name]
    arr = np.asarray(value)
    if arr.size != 1 or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 1 and np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr) and float(arr) == int(arr):
            return int(arr)  # some writers store integers as floats; the value is what matters
        problems.append(f"{where}: attr {name}: expected an integer, got {value!r}")
        return None
    return int(arr.reshape(()))


def _attr_str(g: h5py.Group, name: str, where: str, problems: list[str]) -> str | None:
    if name not in g.attrs:
        problems.append(f"{where}: attr {name}: missing")
        return None
    value = g.attrs[name]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "OSU":
        item = value.reshape(()).item()
        return item.decode() if isinstance(item, bytes) else str(item)
    problems.append(f"{where}: attr {name}: expected a string, got {value!r}")
    return None


def _int_dataset(g: h5py.Group, name: str, where: str, problems: list[str]) -> np.ndarray | None:
    if name not in g:
        problems.append(f"{where}: dataset {name}: missing")
        return None
    ds = g[name]
    if not isinstance(ds, h5py.Dataset):
        problems.append(f"{where}: {name}: expected a dataset, found a group")
        return None
    if ds.ndim != 1 or not np.issubdtype(ds.dtype, np.integer):
        problems.append(f"{where}: dataset {name}: expected a 1-D integer array, got {ds.dtype} {ds.shape}")
        return None
    return ds[()]


def check_trial(g: h5py.Group, where: str, labelled: bool, session: str | None) -> tuple[Trial | None, list[str]]:
    """Check one trial group; return the trial (None if unusable) and the problems found.

    ``labelled``: whether labels must be present (train/val). Labels present in a test file
    are checked too.
    """
    problems: list[str] = []
    features = None
    if "input_features" not in g:
        problems.append(f"{where}: dataset input_features: missing")
    else:
        ds = g["input_features"]
        if not isinstance(ds, h5py.Dataset):
            problems.append(f"{where}: input_features: expected a dataset, found a group")
        elif ds.dtype.kind != "f" or ds.dtype.itemsize != 4:  # float32 of either byte order
            problems.append(f"{where}: dataset input_features: dtype {ds.dtype}, expected float32")
        elif ds.ndim != 2 or ds.shape[1] != N_FEATURES:
            problems.append(f"{where}: dataset input_features: shape {ds.shape}, expected [T, {N_FEATURES}]")
        elif ds.shape[0] == 0:
            problems.append(f"{where}: dataset input_features: no time steps")
        else:
            features = ds[()]
            bad = ~np.isfinite(features)
            if bad.any():
                rows, cols = np.nonzero(bad)
                problems.append(
                    f"{where}: dataset input_features: {bad.sum()} NaN/Inf value(s), "
                    f"first at time step {rows[0]}, feature {cols[0]}")
    n_steps = _attr_int(g, "n_time_steps", where, problems)
    if features is not None and n_steps is not None and n_steps != features.shape[0]:
        problems.append(f"{where}: attr n_time_steps: {n_steps} but input_features has {features.shape[0]} rows")
    block = _attr_int(g, "block_num", where, problems)
    trial_num = _attr_int(g, "trial_num", where, problems)
    sess = _attr_str(g, "session", where, problems)
    if sess is not None and session is not None and sess != session:
        problems.append(f"{where}: attr session: {sess!r} but the file is in folder {session!r}")

    has_labels = "seq_class_ids" in g or "seq_len" in g.attrs
    ids = None
    if labelled or has_labels:
        padded = _int_dataset(g, "seq_class_ids", where, problems)
        seq_len = _attr_int(g, "seq_len", where, problems)
        if padded is not None and seq_len is not None:
            if seq_len < 1:
                problems.append(f"{where}: attr seq_len: {seq_len}, expected at least 1")
            elif seq_len > MAX_SEQ_ELEMENTS:
                problems.append(f"{where}: attr seq_len: {seq_len} exceeds the maximum of {MAX_SEQ_ELEMENTS}")
            elif seq_len > len(padded):
                problems.append(f"{where}: attr seq_len: {seq_len} but seq_class_ids has only {len(padded)} entries")
            else:
                head, tail = padded[:seq_len], padded[seq_len:]
                if (head == 0).any():
                    problems.append(f"{where}: dataset seq_class_ids: padding (0) within the first seq_len={seq_len} entries")
                elif tail.any():
                    problems.append(
                        f"{where}: dataset seq_class_ids: {int(np.count_nonzero(tail))} non-zero id(s) after seq_len={seq_len}")
                out_of_range = head[(head < 1) | (head >= N_CLASSES)]
                if out_of_range.size:
                    problems.append(
                        f"{where}: dataset seq_class_ids: id(s) {sorted(set(out_of_range.tolist()))[:5]} outside 1..{N_CLASSES - 1}")
                else:
                    ids = head.astype(np.int64)
    sentence = None
    if labelled or "transcription" in g or "sentence_label" in g.attrs:
        sentence = _attr_str(g, "sentence_label", where, problems)
        codes = _int_dataset(g, "transcription", where, problems)
        if codes is not None:
            end = np.flatnonzero(codes == 0)
            chars = codes[: end[0]] if end.size else codes
            if (chars < 0).any() or (chars > 127).any():
                problems.append(f"{where}: dataset transcription: values outside the ASCII range")
            elif sentence is not None:
                text = "".join(map(chr, chars.tolist()))
                if text.strip() != sentence.strip():
                    problems.append(
                        f"{where}: dataset transcription: {text!r} differs from sentence_label {sentence!r}")
    if problems or features is None:
        return None, problems
    return Trial(features, sess or "", block or 0, trial_num or 0, sentence, ids), problems


#: No feature of either data set comes near this magnitude: the published features are z-scored
#: (against the preceding 20 trials, so a few tens at most), the simulator's are threshold-crossing
#: counts per 20 ms bin (a few hundred at most) and spike-band power of a few units. A value beyond
#: it is garbage (uninitialised memory, another unit or type), though not provably wrong: a warning.
FEATURE_LIMIT = 1e4


def implausible_features(features: np.ndarray, where: str) -> str | None:
    """A warning naming ``where`` when a trial's features lie far outside any plausible range."""
    big = np.abs(features) > FEATURE_LIMIT
    if not big.any():
        return None
    rows, cols = np.nonzero(big)
    return (f"{where}: dataset input_features: {int(big.sum())} value(s) beyond ±{FEATURE_LIMIT:g} "
            f"(largest {float(np.abs(features).max()):.4g}, first at time step {rows[0]}, feature {cols[0]}); "
            "features are z-scored or counts per bin, so these look like garbage")


def patched_length(n_steps: int, patch_size: int, patch_stride: int) -> int:
    """Model outputs of a trial of ``n_steps`` bins (REFERENCE §3): 0 when shorter than one patch."""
    return 0 if n_steps < patch_size else (n_steps - patch_size) // patch_stride + 1


def ctc_frames_needed(ids: np.ndarray) -> int:
    """The fewest frames CTC can align ``ids`` to: one per label, plus a blank between repeats."""
    ids = np.asarray(ids)
    return int(len(ids) + np.count_nonzero(ids[1:] == ids[:-1]))


def fit_problem(trial: Trial, where: str, patch_size: int, patch_stride: int) -> str | None:
    """Why ``trial`` cannot go through a model of this patch size and stride, or None.

    A trial shorter than one patch has no output frames (its logits would be empty); a labelled
    trial needs at least as many output frames as CTC needs to align its labels (no loss otherwise).
    """
    n_out = patched_length(trial.n_time_steps, patch_size, patch_stride)
    if n_out == 0:
        return (f"{where}: {trial.n_time_steps} time step(s), shorter than the model's patch of {patch_size} "
                "bins: no output frames")
    if trial.phoneme_ids is not None:
        needed = ctc_frames_needed(trial.phoneme_ids)
        if n_out < needed:
            return (f"{where}: {len(trial.phoneme_ids)} phonemes need {needed} output frames for CTC (labels + "
                    f"repeats) but its {trial.n_time_steps} time steps give {n_out} after patching "
                    f"(patch {patch_size}, stride {patch_stride})")
    return None


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable HDF5 file (truncated, corrupt or another format): {exc}") from None


_DAMAGE = (OSError, KeyError, RuntimeError, ValueError)  # what h5py raises on damaged files


def iter_file(df: DataFile) -> Iterator[tuple[str, Trial | None, list[str]]]:
    """Yield ``(group name, trial, problems)`` for every trial of a file, in trial order.

    Damage anywhere in the file (its index, a trial's header or data) becomes a problem line
    naming the file and trial, never an h5py exception.
    """
    with _open(df.path) as f:
        try:
            names = list(f.keys())
        except _DAMAGE as exc:
            raise DataError(f"{df.path}: cannot list the trials; the file is damaged ({exc})") from None
        if not names:
            yield "", None, [f"{df.path}: no trials (an empty data file)"]
        for name in names:
            if not isinstance(name, str):  # a damaged name h5py cannot decode comes back as bytes
                yield repr(name), None, [f"{df.path}: {name!r}: unexpected entry name (the file is damaged?)"]
                continue
            where = f"{df.path}: {name}"
            try:
                if not TRIAL_RE.match(name) or not isinstance(f[name], h5py.Group):
                    yield name, None, [f"{where}: unexpected entry (expected groups trial_0000, trial_0001, ...)"]
                    continue
                trial, problems = check_trial(f[name], where, df.split in LABELLED_SPLITS, df.session)
            except _DAMAGE as exc:
                trial, problems = None, [f"{where}: unreadable, the file is truncated or damaged ({exc})"]
            yield name, trial, problems


def read_file(df: DataFile) -> list[tuple[str, Trial]]:
    """Read every trial of a file; raise :class:`DataError` with all problems if any."""
    out: list[tuple[str, Trial]] = []
    problems: list[str] = []
    for name, trial, found in iter_file(df):
        problems.extend(found)
        if trial is not None:
            out.append((name, trial))
    if problems:
        raise DataError(f"{df.path}: {len(problems)} problem(s); run `b2txt validate` for a full report", problems)
    return out


def read_trial(path: str | Path, group: str, session: str, split: str) -> Trial:
    """Read and check a single trial."""
    with _open(Path(path)) as f:
        where = f"{path}: {group}"
        if group not in f:
            raise DataError(f"{where}: trial group missing")
        trial, problems = check_trial(f[group], where, split in LABELLED_SPLITS, session)
    if trial is None:
        raise DataError(f"{where}: invalid trial", problems)
    return trial
