"""The manifest (one row per trial) and the in-memory trial store used for training.

The ``preprocess`` stage checks every trial once and writes the manifest; training then loads
each split into memory once (:class:`TrialStore`) instead of re-opening HDF5 files per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..ground.console import Log, progress
from ..ground.errors import B2txtError, DataError
from ..ground.fileio import atomic_file
from .description import block_index, find_description, read_description, undescribed_blocks
from .dryad import DataFile, discover, implausible_features, read_file, session_date

MANIFEST_COLUMNS = [
    "session", "split", "file", "trial", "block_num", "trial_num", "n_time_steps", "seq_len",
    "corpus", "post_implant_day", "sentence",
]


def build_manifest(data_dir: str | Path, splits: Sequence[str] | None = None,
                   warn: Log | None = None) -> pd.DataFrame:
    """Read and check every trial (of ``splits``, default all); one row per trial.

    Raises :class:`DataError` listing every problem found: in the files, trials reached twice
    (the same session, block and trial number), blocks the description CSV lacks. ``warn`` is
    told of trials whose feature values lie far outside any plausible range.
    """
    files, problems = discover(data_dir)
    if splits is not None:
        files = [f for f in files if f.split in splits]
    if problems:
        raise DataError(f"{data_dir}: layout problems", problems)
    desc_path = find_description(data_dir)
    described = read_description(desc_path) if desc_path else []
    blocks = block_index(described)
    rows = []
    used: dict[tuple, tuple[str, int, str]] = {}
    for df in progress(files, desc="preprocess", unit="file"):
        date = session_date(df.session)
        for name, trial in read_file(df):
            block = blocks.get((date, trial.block_num))
            session, n, first = used.get((date, trial.block_num), (df.session, 0, f"{df.path}: {name}"))
            used[(date, trial.block_num)] = (session, n + 1, first)
            odd = implausible_features(trial.features, f"{df.path}: {name}")
            if odd and warn is not None:
                warn(f"warning: {odd}")
            rows.append({
                "session": df.session, "split": df.split,
                "file": str(df.path.relative_to(Path(data_dir))), "trial": name,
                "block_num": trial.block_num, "trial_num": trial.trial_num,
                "n_time_steps": trial.n_time_steps,
                "seq_len": -1 if trial.phoneme_ids is None else len(trial.phoneme_ids),
                "corpus": block.corpus if block else "unknown",
                "post_implant_day": block.post_implant_day if block else -1,
                "sentence": trial.sentence or "",
            })
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    problems = duplicate_trials(manifest, Path(data_dir))
    if desc_path is not None:
        problems += undescribed_blocks(desc_path, described, used)
    if problems:
        raise DataError(f"{data_dir}: {len(problems)} problem(s) across trials; `b2txt validate` reports "
                        "them all", problems)
    return manifest


def duplicate_trials(manifest: pd.DataFrame, where: Path | str) -> list[str]:
    """Problems for trials listed twice: the same session, block and trial number, or the same
    group of the same file (training would weigh them double; the split would hold them twice)."""
    problems = []
    numbers = ["session", "block_num", "trial_num"]
    for keys, what in ((numbers, "block {1} trial {2} of session {0}"), (["file", "trial"], "{0}: {1}")):
        dup = manifest[manifest.duplicated(keys, keep=False)]
        for key, group in dup.groupby(keys, sort=True):
            if keys != numbers and group.duplicated(numbers).any():
                continue  # the same trial listed twice: reported once, above
            places = ", ".join(f"{f}: {t}" for f, t in zip(group["file"], group["trial"]))
            problems.append(f"{where}: duplicate trial: {what.format(*key)} appears {len(group)} times ({places})")
    return problems


def write_manifest(manifest: pd.DataFrame, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        manifest.to_csv(tmp, index=False)


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype={"sentence": str, "corpus": str})
    except (OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read manifest: {exc}") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: manifest lacks column(s) {missing}; re-run `b2txt preprocess`")
    problems = duplicate_trials(df, path)
    if problems:
        raise DataError(f"{path}: the manifest lists trials twice; re-run `b2txt preprocess`", problems)
    return df


@dataclass
class TrialStore:
    """All trials of one split in memory: features, labels and day (session) indices."""

    features: list[np.ndarray]
    labels: list[np.ndarray | None]
    day_idx: np.ndarray  # index into ``sessions`` per trial
    sessions: list[str]  # the model's day order (all sessions of the data set)
    rows: pd.DataFrame  # the manifest rows, aligned with the lists

    def __len__(self) -> int:
        return len(self.features)

    @classmethod
    def load(cls, data_dir: str | Path, manifest: pd.DataFrame, split: str,
             sessions: Sequence[str] | None = None) -> "TrialStore":
        """Load ``split`` into memory. ``sessions`` fixes the day order (default: manifest order)."""
        sessions = list(sessions) if sessions is not None else sorted(manifest["session"].unique())
        day_of = {s: i for i, s in enumerate(sessions)}
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        unknown = sorted(set(rows["session"]) - set(day_of))
        if unknown:
            raise DataError(f"session(s) {unknown} are not among the model's sessions {sessions}")
        feats: list[np.ndarray] = []
        labels: list[np.ndarray | None] = []
        by_trial: dict[tuple[str, str], tuple] = {}
        for file, group in rows.groupby("file", sort=False):
            first = group.iloc[0]
            df = DataFile(first["session"], split, Path(data_dir) / file)
            wanted = set(group["trial"])
            for name, trial in read_file(df):
                if name in wanted:
                    by_trial[(file, name)] = (trial.features, trial.phoneme_ids)
        for file, name in zip(rows["file"], rows["trial"]):
            if (file, name) not in by_trial:
                raise DataError(f"{data_dir}/{file}: {name}: listed in the manifest but not in the file; "
                                "re-run `b2txt preprocess`")
            f, lab = by_trial[(file, name)]
            feats.append(f)
            labels.append(lab)
        day_idx = np.array([day_of[s] for s in rows["session"]], dtype=np.int64)
        return cls(feats, labels, day_idx, sessions, rows)

    def days_present(self) -> list[int]:
        return sorted(set(self.day_idx.tolist()))


class DayBatchSampler:
    """Batches drawn from ``days_per_batch`` random sessions, equal trials from each.

    As in the published trainer: each batch picks ``days_per_batch`` sessions at random
    (always including ``must_include_days``), then the trials of each. ``draw="even"``:
    ``batch_size // days_per_batch`` distinct random trials of each (remainder spread over the
    first days). ``draw="published"``: the published order, ``ceil(batch_size / days_per_batch)``
    trials of each drawn with replacement, then one trial dropped from the end of a random
    session's share until the batch has ``batch_size``. Deterministic for a seed; the one
    generator ``rng`` is the whole state (resume checkpoints save it).

    With ``lengths`` (length bucketing), every batch first draws a position q in [0, 1]; each
    session's n trials are then drawn from a window of ``width`` · n neighbours (at least n + 1)
    in that session's length order, starting at q of the way from (window - 1) places before its
    first trial to its last (clipped to the trials there are), so a batch holds trials of similar
    length, padding shrinks, and every trial lies in as many windows as any other (no edge is
    under-drawn). ``mix`` is the chance that a batch ignores the lengths (drawn as without
    bucketing): length-homogeneous batches cost accuracy per step, random ones padding, and
    the mix keeps ``1 - mix`` of the padding saving.
    """

    def __init__(self, store: TrialStore, batch_size: int, days_per_batch: int, seed: int,
                 must_include_days: Sequence[int] = (), lengths: np.ndarray | None = None,
                 mix: float = 0.0, width: float = 1.5, draw: str = "even"):
        self.plain = {d: np.flatnonzero(store.day_idx == d) for d in store.days_present()}
        if not self.plain:
            raise DataError("no training trials")
        if draw not in ("even", "published"):
            raise B2txtError(f"trial draw {draw!r}: must be 'even' or 'published'")
        self.by_day = self.plain
        if lengths is not None:  # each day's trials sorted by length (stable: ties keep file order)
            self.by_day = {d: idx[np.argsort(lengths[idx], kind="stable")] for d, idx in self.plain.items()}
        self.bucketing = lengths is not None
        self.mix, self.width, self.draw = float(mix), float(width), draw
        self.days = sorted(self.plain)
        self.batch_size = batch_size
        self.days_per_batch = max(1, min(days_per_batch, len(self.days)))
        self.must = [d for d in must_include_days if d in self.plain]
        self.rng = np.random.default_rng(seed)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()

    def next_batch(self) -> np.ndarray:
        others = [d for d in self.days if d not in self.must]
        n_pick = max(0, self.days_per_batch - len(self.must))
        chosen = list(self.must) + list(self.rng.choice(others, size=min(n_pick, len(others)), replace=False))
        if self.draw == "published":
            per_day = np.full(len(chosen), -(-self.batch_size // len(chosen)))
        else:
            per_day = np.full(len(chosen), self.batch_size // len(chosen))
            per_day[: self.batch_size % len(chosen)] += 1
        # no draw for the mix when it is 0: the default stream stays what it always was
        bucketed = self.bucketing and not (self.mix > 0 and self.rng.random() < self.mix)
        quantile = self.rng.random() if bucketed else 0.0
        picks = []
        for day, n in zip(chosen, per_day):
            pool = self.by_day[day] if bucketed else self.plain[day]
            width = n + max(int((self.width - 1) * n), 1)  # some choice within the window, little length spread
            if bucketed and len(pool) > width:
                start = int(np.floor(quantile * (len(pool) + width - 1))) - (width - 1)
                pool = pool[max(start, 0): start + width]
            replace = True if self.draw == "published" else n > len(pool)
            picks.append(self.rng.choice(pool, size=n, replace=replace))
        extra = int(per_day.sum()) - self.batch_size
        while extra > 0:  # published: drop the last trial of a random session's share
            d = int(self.rng.choice([i for i, p in enumerate(picks) if len(p)]))
            picks[d] = picks[d][:-1]
            extra -= 1
        return np.concatenate(picks)


def split_by_length(trials: np.ndarray, lengths: np.ndarray, parts: int) -> list[np.ndarray]:
    """``trials`` in ``parts`` groups of (nearly) equal size by ``lengths[trial]``, shortest first;
    padding each group to its own longest trial wastes less than padding all to the longest.
    One part: ``trials`` unchanged (the batch's own order)."""
    if parts <= 1 or len(trials) <= 1:
        return [trials]
    ordered = trials[np.argsort(lengths[trials], kind="stable")]
    return [p for p in np.array_split(ordered, min(parts, len(trials))) if len(p)]


def resolve_sessions(all_sessions: list[str], refs: list[int | str], what: str) -> list[str]:
    """Session names from names or indices into ``all_sessions`` (negative counts from the end)."""
    out = []
    for ref in refs:
        if isinstance(ref, int):
            if not -len(all_sessions) <= ref < len(all_sessions):
                raise B2txtError(f"{what}: index {ref} is out of range for {len(all_sessions)} sessions")
            out.append(all_sessions[ref])
        elif ref in all_sessions:
            out.append(ref)
        else:
            raise B2txtError(f"{what}: unknown session {ref!r}")
    return out
