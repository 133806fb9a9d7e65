"""The paper's Dryad pickles (REFERENCE §6), read safely and turned into our own tables.

``t15_copyTask.pkl`` (figure 2) becomes the tables our run writes, so that one plotting module
(:mod:`b2txt.figures`) draws both:

- phoneme trials, as ``scores/<split>/trials.csv``: ``session, corpus, post_implant_day,
  block_num, trial_num, edits, ref_len, decoded, reference`` plus ``vocabulary``;
- word trials, as ``wer_trials.csv``: ``… reference, decoded, word_edits, ref_words``;
- the logits of every trial in our model column order (blank, AA … ZH, SIL): the pickle holds
  them in the language-model order (blank, SIL, AA … ZH).

Each post-implant day was one session; its name is rebuilt from the day (day 25 = 2023-08-11,
as in the description CSV). ``t15_personalUse.pkl`` (figure 4) becomes a per-trial rating table
and a per-day usage table.

Pickles can run any code while they load. :func:`load_pickle` therefore uses an unpickler that
only resolves the numpy, pandas and builtin names these files need, and refuses every other
name before anything is called.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .data.dryad import session_name
from .ground.errors import B2txtError
from .ground.phonemes import N_CLASSES, PHONEME_TO_ID, SIL, from_lm_order, ids_to_string, normalize_text, strip_stress

#: Day 0 of participant t15: the description CSV has post-implant day 25 on 2023-08-11.
IMPLANT_DATE = dt.date(2023, 7, 17)

COPY_TASK_KEYS = ("cue_sentence", "cue_sentence_phonemes", "decoded_phonemes_raw", "decoded_sentence",
                  "decoded_logits", "post_implant_day", "vocab_size")
PERSONAL_USE_KEYS = ("trialized_info", "total_use_time", "total_trial_count")
TRIALIZED_KEYS = ("post_implant_day", "correctness_rating", "wpm")

#: Each rating of the personal-use data and the group figure 4 counts it in.
RATING_GROUPS: dict[str, str] = {
    "correct": "100% correct",
    "mostly correct": "mostly correct",
    "one word wrong": "mostly correct",
    "incorrect": "incorrect",
    "blank trial": "blank trial",
    "response timeout": "no rating",
    "no user rating": "no rating",
}
GROUP_ORDER = ("100% correct", "mostly correct", "incorrect", "blank trial", "no rating")
#: The groups of the pie (rated sentences only).
PIE_GROUPS = ("100% correct", "mostly correct", "incorrect")


# ----------------------------------------------------------------------------- safe loading

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_BUILTINS = ("builtins", "__builtin__")

#: (module, name) pairs an unpickler may resolve: data types and their rebuild helpers only.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {(m, n) for m in _BUILTINS for n in ("set", "frozenset", "slice", "complex", "bytearray", "range")}
    | {("collections", "OrderedDict"), ("_codecs", "encode")}
    | {("numpy", "ndarray"), ("numpy", "dtype")}
    | {(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar")}
    | {(m, "_frombuffer") for m in _NUMPY_NUMERIC}
    | {("pandas", n) for n in ("DataFrame", "Series", "Index", "RangeIndex", "Categorical", "CategoricalDtype",
                               "StringDtype")}
    | {("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
       ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.base", "Index"),
       ("pandas.core.indexes.range", "RangeIndex"),
       ("pandas.core.internals.managers", "BlockManager"),
       ("pandas.core.internals.managers", "SingleBlockManager"),
       ("pandas.core.internals.blocks", "new_block"), ("pandas._libs.internals", "_unpickle_block"),
       ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
       ("pandas.arrays", "StringArray"), ("pandas.core.arrays.string_", "StringArray"),
       ("pandas.core.arrays.string_", "StringDtype"),
       ("pandas.core.arrays.categorical", "Categorical"),
       ("pandas.core.dtypes.dtypes", "CategoricalDtype")}
)


class RefusedPickle(pickle.UnpicklingError):
    """The pickle names something that is not plain data (it could run code)."""

    def __init__(self, module: str, name: str):
        self.qualname = f"{module}.{name}"
        super().__init__(self.qualname)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; any other name is refused unresolved."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedPickle(module, name)
        return super().find_class(module, name)


def load_pickle(path: str | Path) -> Any:
    """Load a pickle holding only numpy, pandas and builtin data; anything else is one clear error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise B2txtError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedPickle as exc:
        raise B2txtError(f"{path}: refused: the pickle asks for {exc.qualname}, which is not a numpy, pandas or "
                         "builtin data type (loading it could run code); nothing from it was run") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as exc:
        raise B2txtError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- field access

def _field(container: Any, key: str, source: str) -> Any:
    try:
        present = key in container
    except TypeError:
        present = False
    if not present:
        have = sorted(map(str, container.keys())) if hasattr(container, "keys") else type(container).__name__
        raise B2txtError(f"{source}: key {key!r} missing (found: {have})")
    return container[key]


def _sequence(container: Any, key: str, source: str) -> list[Any]:
    """A per-trial field as a list (lists, tuples, numpy arrays and pandas columns alike)."""
    value = _field(container, key, source)
    if isinstance(value, (pd.Series, pd.Index)):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return list(value) if value.ndim else [value.item()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise B2txtError(f"{source}: {key} should be a per-trial list or array, got {type(value).__name__}")


def _columns(container: Any, keys: Sequence[str], source: str) -> dict[str, list[Any]]:
    """Several per-trial fields, checked to have one entry per trial."""
    cols = {k: _sequence(container, k, source) for k in keys}
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise B2txtError(f"{source}: per-trial fields differ in length: {lengths}")
    return cols


def _int(value: Any, what: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise B2txtError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise B2txtError(f"{what}: {value!r} is not a whole number")
    return int(number)


def _phoneme_ids(phonemes: Any, what: str) -> list[int]:
    """Phoneme names (``SIL`` between words, stress digits allowed) as our class ids."""
    if isinstance(phonemes, str):
        phonemes = phonemes.split()
    ids = []
    for p in list(phonemes):
        name = strip_stress(str(p).strip().upper())
        if name in ("", "BLANK"):
            continue
        if name == "|":
            name = SIL
        if name not in PHONEME_TO_ID:
            raise B2txtError(f"{what}: unknown phoneme {str(p)!r}")
        ids.append(PHONEME_TO_ID[name])
    return ids


def vocabulary_label(vocab_size: int) -> str:
    return f"{vocab_size:,} words"


def session_of_day(day: int) -> str:
    return session_name(IMPLANT_DATE + dt.timedelta(days=day))


# ----------------------------------------------------------------------------- copy task (figure 2)

@dataclass
class CopyTask:
    """Figure 2's data as our tables (see the module docstring)."""

    phoneme_trials: pd.DataFrame
    word_trials: pd.DataFrame
    logits: list[np.ndarray]  # per trial, [T, 41], model column order


def _trial_logits(value: Any, what: str) -> np.ndarray:
    x = np.asarray(value, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != N_CLASSES:
        raise B2txtError(f"{what}: logits of shape {x.shape}, expected [T, {N_CLASSES}]")
    return from_lm_order(x)


def copy_task_tables(raw: Any, source: str = "copy task") -> CopyTask:
    """Turn the copy-task dict into our phoneme and word trial tables and model-order logits."""
    from .evaluation.error_rates import edit_distance, word_table

    cols = _columns(raw, COPY_TASK_KEYS, source)
    rows = []
    for i in range(len(cols["cue_sentence"])):
        where = f"{source}: trial {i}"
        day = _int(cols["post_implant_day"][i], f"{where}: post_implant_day")
        vocab = _int(cols["vocab_size"][i], f"{where}: vocab_size")
        ref = _phoneme_ids(cols["cue_sentence_phonemes"][i], f"{where}: cue_sentence_phonemes")
        hyp = _phoneme_ids(cols["decoded_phonemes_raw"][i], f"{where}: decoded_phonemes_raw")
        rows.append({
            "session": session_of_day(day), "corpus": "50-Word" if vocab == 50 else "copy task",
            "vocabulary": vocabulary_label(vocab), "post_implant_day": day, "block_num": -1, "trial_num": i,
            "edits": edit_distance(hyp, ref), "ref_len": len(ref),
            "decoded": ids_to_string(hyp), "reference": ids_to_string(ref),
            "reference_text": normalize_text(str(cols["cue_sentence"][i])),
            "decoded_text": normalize_text(str(cols["decoded_sentence"][i])),
        })
    trials = pd.DataFrame(rows)
    if trials.empty:
        raise B2txtError(f"{source}: no trials")
    phonemes = trials.drop(columns=["reference_text", "decoded_text"])
    words = word_table(trials.drop(columns=["decoded", "reference", "edits", "ref_len"]).rename(
        columns={"reference_text": "reference", "decoded_text": "decoded"}))
    logits = [_trial_logits(x, f"{source}: trial {i}: decoded_logits") for i, x in enumerate(cols["decoded_logits"])]
    return CopyTask(phonemes, words.reset_index(drop=True), logits)


def read_copy_task(path: str | Path) -> CopyTask:
    return copy_task_tables(load_pickle(path), str(path))


# ----------------------------------------------------------------------------- personal use (figure 4)

@dataclass
class PersonalUse:
    """Figure 4's data: one row per rated sentence, one row per day of use."""

    trials: pd.DataFrame  # post_implant_day, correctness_rating, rating_group, wpm
    usage: pd.DataFrame  # post_implant_day, use_hours, n_sentences, cumulative_hours, cumulative_sentences


def _day_mapping(raw: Any, key: str, source: str) -> dict[int, float]:
    value = _field(raw, key, source)
    if isinstance(value, pd.Series):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise B2txtError(f"{source}: {key} should be a {{day: value}} mapping, got {type(value).__name__}")
    out = {}
    for day, v in value.items():
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise B2txtError(f"{source}: {key}[{day!r}]: {v!r} is not a number") from None
        out[_int(day, f"{source}: {key} day")] = number
    return out


def usage_table(use_seconds: dict[int, float], sentences: dict[int, float]) -> pd.DataFrame:
    """Per day of use: hours, sentences and their running totals; days without use are skipped."""
    days = sorted(set(use_seconds) | set(sentences))
    table = pd.DataFrame({
        "post_implant_day": days,
        "use_hours": [use_seconds.get(d, 0.0) / 3600 for d in days],
        "n_sentences": [int(sentences.get(d, 0)) for d in days],
    })
    table = table[table["use_hours"] > 0].reset_index(drop=True)
    table["cumulative_hours"] = table["use_hours"].cumsum()
    table["cumulative_sentences"] = table["n_sentences"].cumsum()
    return table


def personal_use_tables(raw: Any, source: str = "personal use") -> PersonalUse:
    info = _field(raw, "trialized_info", source)
    cols = _columns(info, TRIALIZED_KEYS, f"{source}: trialized_info")
    ratings = []
    for i, label in enumerate(cols["correctness_rating"]):
        key = str(label).strip().lower()
        if key not in RATING_GROUPS:
            raise B2txtError(f"{source}: trialized_info trial {i}: unknown correctness_rating {str(label)!r}; "
                             f"known: {', '.join(RATING_GROUPS)}")
        ratings.append(key)
    wpm = []
    for i, v in enumerate(cols["wpm"]):
        try:
            wpm.append(float("nan") if v is None else float(v))
        except (TypeError, ValueError):
            raise B2txtError(f"{source}: trialized_info trial {i}: wpm {v!r} is not a number") from None
    trials = pd.DataFrame({
        "post_implant_day": [_int(d, f"{source}: trialized_info trial {i}: post_implant_day")
                             for i, d in enumerate(cols["post_implant_day"])],
        "correctness_rating": ratings,
        "rating_group": [RATING_GROUPS[r] for r in ratings],
        "wpm": wpm,
    })
    usage = usage_table(_day_mapping(raw, "total_use_time", source), _day_mapping(raw, "total_trial_count", source))
    return PersonalUse(trials, usage)


def rating_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per day: trial count, count and percentage of each rating group, mean words per minute."""
    counts = pd.crosstab(trials["post_implant_day"], trials["rating_group"]).reindex(columns=list(GROUP_ORDER),
                                                                                     fill_value=0)
    table = pd.DataFrame({"n_trials": counts.sum(axis=1)})
    for group in GROUP_ORDER:
        table[f"n_{group}"] = counts[group]
        table[f"pct_{group}"] = 100 * counts[group] / table["n_trials"]
    table["mean_wpm"] = trials.groupby("post_implant_day")["wpm"].mean()  # NaN-skipping; NaN if none known
    return table.reset_index()


def pie_table(trials: pd.DataFrame) -> pd.DataFrame:
    counts = trials["rating_group"].value_counts()
    return pd.DataFrame({"group": list(PIE_GROUPS), "n_trials": [int(counts.get(g, 0)) for g in PIE_GROUPS]})


def read_personal_use(path: str | Path) -> PersonalUse:
    return personal_use_tables(load_pickle(path), str(path))

