"""Property-based tests (issue 15): whatever a file or a request holds, the reader either accepts it
and returns what it promises, or raises one clear error of the B2txtError family — never another
exception type, a crash, a hang or an empty result.

Three readers, each fed by Hypothesis:

- the HDF5 trial reader (``b2txt.data.dryad`` through ``b2txt.data.validate``): files of random
  trial groups (shapes, dtypes, missing and extra fields, odd attributes), and valid files
  truncated or with bytes overwritten; the logits file reader (``b2txt.data.logits``) likewise;
- the logits payload decoder (``protocol.decode_logits_entry``): arbitrary bytes and arrays of any
  dtype and shape, with or without (possibly lying) ``logits_dtype``/``logits_shape``;
- the Redis request parsers: parameter updates (``protocol.apply_update``), session names and
  the answer stream for them, and the trial queue's options (``trial_queue.parse_options``).

Kept fast: a modest ``max_examples``, a deadline per example, no example database on disk.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from b2txt.data.dryad import DATA_SUBDIR, MAX_SEQ_ELEMENTS, N_FEATURES, DataFile, read_file
from b2txt.data.logits import read_logits
from b2txt.data.validate import validate_dataset
from b2txt.ground.config import DecodeConfig
from b2txt.ground.errors import B2txtError, DataError
from b2txt.ground.phonemes import N_CLASSES
from b2txt.server import protocol as P
from b2txt.server import trial_queue as Q

SESSION = "t15.2023.08.11"
FAST = settings(max_examples=60, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FILES = settings(FAST, max_examples=100)
TALLY: dict[str, dict[str, int]] = {}


def tally(reader: str, outcome: str) -> None:
    TALLY.setdefault(reader, {}).setdefault(outcome, 0)
    TALLY[reader][outcome] += 1


# ============================================================================ the HDF5 trial reader

NUMERIC = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "<i4", "<i8", "<u1", "|b1"])
ODD_ATTR = st.one_of(
    st.integers(-3, 600), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.binary(max_size=8), st.lists(st.integers(0, 5), min_size=0, max_size=3).map(np.asarray),
    st.just(np.float32(4.0)), st.just(np.int16(2)),
)


@st.composite
def arrays(draw, kind: str) -> np.ndarray:
    """An array for field ``kind``, usually near what the layout wants, often not."""
    dtype = draw(st.one_of(st.just("<f4" if kind == "features" else "<i4"), NUMERIC))
    if kind == "features":
        shape = draw(st.one_of(st.tuples(st.integers(0, 4), st.sampled_from([N_FEATURES, N_FEATURES - 1, 1])),
                               st.tuples(st.integers(0, 4)), st.tuples(st.integers(1, 2), st.integers(1, 2),
                                                                       st.integers(1, 2))))
    else:
        shape = draw(st.one_of(st.tuples(st.integers(0, MAX_SEQ_ELEMENTS + 3)), st.tuples(st.integers(1, 3),
                                                                                        st.integers(1, 3))))
    elements = (st.floats(-5, 5, width=16) if dtype[1] == "f" else
                st.integers(0 if dtype[1] == "u" else -1, 130) if dtype[1] in "iu" else None)
    arr = draw(hnp.arrays(np.dtype(dtype), shape, elements=elements, fill=elements))
    if dtype[-1] in "48" and dtype[1] == "f" and arr.size and draw(st.booleans()) and draw(st.booleans()):
        arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return arr


@st.composite
def trial_groups(draw) -> dict:
    """One trial's datasets and attributes: each field present and right, present and odd, or absent."""
    t = draw(st.integers(1, 4))
    ids = draw(st.lists(st.integers(1, N_CLASSES - 1), min_size=1, max_size=6))
    sentence = draw(st.text(alphabet="abcdefgh '", min_size=1, max_size=12))
    good = {
        "input_features": np.zeros((t, N_FEATURES), np.float32) + 0.5,
        "seq_class_ids": np.pad(np.asarray(ids, np.int32), (0, MAX_SEQ_ELEMENTS - len(ids))),
        "transcription": np.pad(np.frombuffer(sentence.encode(), np.uint8).astype(np.int32),
                                (0, MAX_SEQ_ELEMENTS - len(sentence))),
    }
    good_attrs = {"n_time_steps": t, "block_num": draw(st.integers(0, 3)), "trial_num": draw(st.integers(0, 50)),
                  "session": SESSION, "seq_len": len(ids), "sentence_label": sentence}
    pristine = draw(st.integers(0, 2)) == 0  # a third of the trials as the layout wants them
    datasets: dict = {}
    for name, value in good.items():
        choice = "good" if pristine else draw(st.sampled_from(["good", "good", "odd", "absent", "group"]))
        kind = "features" if name == "input_features" else "ids"
        datasets[name] = {"good": value, "odd": draw(arrays(kind)), "absent": None, "group": "group"}[choice]
    if draw(st.booleans()):  # an extra field is no problem
        datasets["extra_" + draw(st.text(alphabet="xyz", min_size=1, max_size=3))] = draw(arrays("ids"))
    attrs: dict = {}
    for name, value in good_attrs.items():
        choice = "good" if pristine else draw(st.sampled_from(["good", "good", "odd", "absent"]))
        if choice != "absent":
            attrs[name] = value if choice == "good" else draw(ODD_ATTR)
    return {"datasets": datasets, "attrs": attrs}


def write_group(f: h5py.File, name: str, trial: dict) -> None:
    g = f.create_group(name)
    for key, value in trial["datasets"].items():
        if value is None:
            continue
        if isinstance(value, str):
            g.create_group(key)
        else:
            g.create_dataset(key, data=value)
    for key, value in trial["attrs"].items():
        set_attr(g, key, value)


def set_attr(obj: h5py.HLObject, key: str, value: object) -> None:
    try:
        obj.attrs[key] = value
    except (ValueError, TypeError):  # h5py cannot store it (bytes with a NUL): no such file can exist
        pass


def dataset_dir(root: Path, split: str, groups: list[tuple[str, dict]], root_attrs: dict) -> DataFile:
    path = root / DATA_SUBDIR / SESSION / f"data_{split}.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, trial in groups:
            write_group(f, name, trial)
        for key, value in root_attrs.items():
            set_attr(f, key, value)
    return DataFile(SESSION, split, path)


def check_read(df: DataFile, root: Path) -> str:
    """The property: validation reports problems (strings naming the file) or none; reading then
    gives the trials, each checked, or one DataError. Returns the outcome."""
    report = validate_dataset(root)  # must not raise: everything is a problem line
    assert all(isinstance(p, str) and p for p in report.problems)
    try:
        trials = read_file(df)
    except DataError as exc:
        assert str(df.path) in str(exc)
        assert not report.ok
        return "clear error"
    # a file read whole may still hold a problem only visible across trials (a duplicate) or one
    # that depends on the model's patch (fit_problem: no output frames, too few for CTC)
    fit = ("no output frames", "output frames for CTC")
    assert all("duplicate trial" in p or any(f in p for f in fit) for p in report.problems), report.summary()
    assert trials, "an empty result without an error"
    for _name, trial in trials:
        assert trial.features.dtype == np.float32 and trial.features.ndim == 2
        assert trial.features.shape[0] >= 1 and trial.features.shape[1] == N_FEATURES
        assert np.isfinite(trial.features).all()
        if df.split != "test":
            assert trial.phoneme_ids is not None and len(trial.phoneme_ids) >= 1
            assert ((trial.phoneme_ids >= 1) & (trial.phoneme_ids < N_CLASSES)).all()
            assert trial.sentence
    return "accepted"


@FILES
@given(split=st.sampled_from(["train", "val", "test"]),
       groups=st.lists(st.tuples(st.sampled_from(["trial_0000", "trial_0001", "trial_0002", "trial_12345"] * 3
                                                 + ["trial_x", "notes"]), trial_groups()),
                       min_size=0, max_size=3, unique_by=lambda g: g[0]),
       root_attrs=st.dictionaries(st.sampled_from(["version", "n_trials"]), ODD_ATTR, max_size=2))
def test_any_trial_file_is_read_or_refused_clearly(tmp_path_factory, split, groups, root_attrs):
    root = tmp_path_factory.mktemp("prop-h5")
    df = dataset_dir(root, split, groups, root_attrs)
    tally("hdf5 reader", check_read(df, root))


def damage(path: Path, data: st.DataObject) -> None:
    """Truncate the file, or overwrite up to 8 runs of its bytes, as drawn."""
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="n_writes")):
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            chunk = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
            raw[at:at + len(chunk)] = chunk
    path.write_bytes(bytes(raw))


@FILES
@given(data=st.data())
def test_a_damaged_file_is_read_or_refused_clearly(tmp_path_factory, data):
    """A valid file truncated or with bytes overwritten: a problem naming the file, never a crash."""
    root = tmp_path_factory.mktemp("prop-h5-damaged")
    good = {"datasets": {"input_features": np.full((3, N_FEATURES), 0.25, np.float32),
                         "seq_class_ids": np.pad(np.asarray([5, 6, 7], np.int32), (0, MAX_SEQ_ELEMENTS - 3)),
                         "transcription": np.pad(np.frombuffer(b"hi", np.uint8).astype(np.int32),
                                                 (0, MAX_SEQ_ELEMENTS - 2))},
            "attrs": {"n_time_steps": 3, "block_num": 1, "trial_num": 2, "session": SESSION, "seq_len": 3,
                      "sentence_label": "hi"}}
    second = {"datasets": good["datasets"], "attrs": {**good["attrs"], "trial_num": 3}}
    df = dataset_dir(root, "train", [("trial_0000", good), ("trial_0001", second)], {})
    damage(df.path, data)
    tally("hdf5 reader (damaged)", check_read(df, root))


@FILES
@given(data=st.data())
def test_a_damaged_logits_file_is_read_or_refused_clearly(tmp_path_factory, data):
    """The logits file (``infer``'s output, read by score, decode and evaluate), damaged likewise."""
    path = tmp_path_factory.mktemp("prop-logits") / "val.hdf5"
    with h5py.File(path, "w") as f:
        for i in range(2):
            g = f.create_group(f"trial_{i:05d}")
            g.create_dataset("logits", data=np.full((5, N_CLASSES), 0.5, np.float32))
            g.create_dataset("seq_class_ids", data=np.arange(1, 4, dtype=np.int32))
            g.attrs["session"] = SESSION
    damage(path, data)
    try:
        trials = read_logits(path)
    except B2txtError as exc:
        assert str(path) in str(exc)
        tally("logits file reader (damaged)", "clear error")
        return
    tally("logits file reader (damaged)", "accepted")
    assert trials and all(t.logits.ndim == 2 and t.logits.shape[1] == N_CLASSES for t in trials)


# ============================================================================ the logits payload decoder

MAX_BYTES = 64 * P.FRAME_BYTES
DTYPE_TEXT = st.one_of(st.sampled_from(["float32", "<f4", "float64", "int32", "FLOAT32", " float32 "]),
                       st.text(max_size=10))
SHAPE_TEXT = st.one_of(st.tuples(st.integers(-2, 70), st.integers(-1, 45)).map(lambda s: f"{s[0]},{s[1]}"),
                       st.text(max_size=10))


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.nan_to_num(x, nan=0, posinf=0, neginf=0).astype(dtype) if dtype[1] == "i" else x.astype(dtype)


@st.composite
def logits_entries(draw) -> dict:
    """A logits request entry as redis-py hands it over: field values as bytes."""
    valid = hnp.arrays(np.float32, st.tuples(st.integers(1, 70), st.just(N_CLASSES)),
                       elements=st.floats(-1e3, 1e3, width=32))
    if draw(st.integers(0, 2)) == 0:  # a third as our client sends them (what the decoder must accept)
        fields = {k: (v.encode() if isinstance(v, str) else v) for k, v in P.logits_fields(draw(valid)).items()}
        if draw(st.booleans()):  # or as a published client: the bare bytes
            fields = {P.LOGITS_FIELD: fields[P.LOGITS_FIELD]}
        return fields
    payload = draw(st.one_of(
        st.binary(max_size=3 * P.FRAME_BYTES),
        st.tuples(hnp.arrays(np.float64, st.tuples(st.integers(0, 70), st.sampled_from([N_CLASSES, N_CLASSES - 1, 82])),
                             elements=st.one_of(st.floats(-1e7, 1e7), st.sampled_from([np.nan, np.inf, -np.inf]))),
                  st.sampled_from(["<f4", "<f8", "<i4", "<f2", ">f4"])).map(lambda a: _cast(*a).tobytes()),
    ))
    fields: dict = {}
    if draw(st.integers(0, 9)):  # sometimes no logits field at all
        fields[P.LOGITS_FIELD] = payload
    if draw(st.booleans()):
        fields[P.DTYPE_FIELD] = draw(DTYPE_TEXT).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        fields[P.SHAPE_FIELD] = draw(SHAPE_TEXT).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        fields[P.REQUEST_ID_FIELD] = draw(st.binary(max_size=12))
    return fields


def check_logits(fields: dict) -> str:
    try:
        x = P.decode_logits_entry(fields, MAX_BYTES)
    except P.ProtocolError as exc:
        assert str(exc)
        return "clear error"
    assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == N_CLASSES and x.shape[0] >= 1
    assert np.isfinite(x).all() and (np.abs(x) <= P.MAX_ABS_LOGIT).all()
    assert x.nbytes == len(fields[P.LOGITS_FIELD]) <= MAX_BYTES
    np.testing.assert_array_equal(x, np.frombuffer(fields[P.LOGITS_FIELD], "<f4").reshape(-1, N_CLASSES))
    return "accepted"


@FAST
@given(entry=logits_entries())
def test_any_logits_entry_is_decoded_or_refused_clearly(entry):
    tally("logits decoder", check_logits(P.fields_text(entry)))


@FAST
@given(raw=st.one_of(st.none(), st.integers(), st.text(max_size=20), st.floats(), st.lists(st.integers()),
                     st.binary(max_size=400)))
def test_any_logits_field_value_is_decoded_or_refused_clearly(raw):
    tally("logits decoder", check_logits({P.LOGITS_FIELD: raw}))


@FAST
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 60), st.just(N_CLASSES)),
                    elements=st.floats(-1e5, 1e5, width=32)))
def test_what_our_client_sends_the_server_decodes_unchanged(x):
    wire = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in P.logits_fields(x).items()}
    np.testing.assert_array_equal(P.decode_logits_entry(P.fields_text(wire), 1 << 20), x)


# ============================================================================ the Redis request parsers

NAMES = st.one_of(st.sampled_from(sorted(P.UPDATABLE) + list(P.READ_ONLY) + [P.REQUEST_ID_FIELD]),
                  st.text(max_size=10))
VALUES = st.one_of(
    st.sampled_from(["1", "0", "true", "off", "nan", "inf", "-inf", "1e309", "-0", "0.5", "1.5", "2", "-3",
                     "9" * 400, "1e12", "0x10", "", " 7 ", "٣"]),
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=10), st.binary(max_size=10),
)


@FAST
@given(fields=st.dictionaries(NAMES, VALUES, max_size=5))
def test_any_parameter_update_is_applied_whole_or_refused_clearly(fields):
    before = P.SessionParams()
    try:
        after = P.apply_update(before, fields)
    except P.ProtocolError as exc:
        assert str(exc).startswith(("parameter", "unknown parameter"))
        tally("update parser", "clear error")
        return
    tally("update parser", "accepted")
    assert [n for n in fields if n not in P.NOT_PARAMS]  # an update names at least one parameter
    DecodeConfig.model_validate(after.decode.model_dump())  # every value within the config's constraints
    assert 0.0 <= after.alpha <= 1.0
    for name in ("max_active", "min_active", "nbest", "augment_top", "beam_size_token"):
        assert abs(getattr(after.decode, name)) <= P.INT32_MAX  # fits the C++ decoders
    for name in ("beam", "lattice_beam", "acoustic_scale", "length_penalty", "blank_penalty"):
        assert math.isfinite(getattr(after.decode, name))
    args = P.args_fields(after, "/lm")  # what the server publishes after it: strings, round-trippable
    assert all(isinstance(v, str) for v in args.values())


@FAST
@given(raw=st.one_of(st.binary(max_size=80), st.text(max_size=80), st.from_regex(P.SESSION_NAME, fullmatch=True)))
def test_any_session_name_is_accepted_or_refused_with_a_stream_to_answer_on(raw):
    name = P.text(raw)
    try:
        P.check_session_name(name)
    except P.ProtocolError as exc:
        assert str(exc).startswith("session name ") and len(str(exc)) < 300
        tally("session names", "clear error")
    else:
        assert P.Streams(name).done_opening.encode() == P.done_opening_stream(raw)
        tally("session names", "accepted")
    stream = P.done_opening_stream(raw)
    assert isinstance(stream, bytes) and stream.endswith(P.DONE_OPENING.encode())


OPTION_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)


@FAST
@given(raw=st.one_of(
    st.binary(max_size=40), st.text(max_size=40), OPTION_JSON.map(json.dumps),
    st.fixed_dictionaries({"decode": st.dictionaries(st.sampled_from(["beam", "nbest", "decoder", "x"]),
                                                     OPTION_JSON, max_size=3),
                           "alpha": OPTION_JSON, "do_opt": OPTION_JSON}).map(json.dumps),
))
def test_any_trial_options_are_parsed_or_refused_clearly(raw):
    try:
        params = Q.parse_options(raw)
    except P.ProtocolError as exc:
        assert str(exc).startswith(f"{Q.OPTIONS_FIELD}:")
        tally("trial options", "clear error")
        return
    tally("trial options", "accepted")
    assert isinstance(params.decode, DecodeConfig)


def test_zz_report_the_counts():
    """Not a property: prints what the properties tried (the issue's note asks for the counts)."""
    for reader, outcomes in sorted(TALLY.items()):
        print(f"{reader}: {sum(outcomes.values())} inputs, " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    assert all(isinstance(v, int) for o in TALLY.values() for v in o.values())


def test_a_b2txt_error_is_what_the_cli_prints():
    # the family the properties accept as "one clear error": the CLI prints these without a traceback
    assert issubclass(DataError, B2txtError) and issubclass(P.ProtocolError, B2txtError)


pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
