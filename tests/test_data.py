"""The Dryad HDF5 layer: round trips, discovery, the description CSV and validation.

Every corruption must be reported with the file path, the trial group and the field, both by
``validate_dataset`` (which collects everything) and by ``read_file`` (which raises
:class:`DataError`, never an h5py/numpy exception).
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.data import SENTENCES, SESSION, make_trials, trial_steps

from b2txt.cli import main
from b2txt.data.description import (
    COLUMNS,
    DESCRIPTION_FILE,
    Block,
    block_index,
    find_description,
    read_description,
    write_description,
)
from b2txt.data.dryad import (
    DATA_SUBDIR,
    MAX_SEQ_ELEMENTS,
    N_FEATURES,
    DataFile,
    Trial,
    data_file_path,
    data_root,
    discover,
    iter_file,
    read_file,
    read_trial,
    session_date,
    session_name,
    write_trials,
)
from b2txt.data.validate import ValidationReport, validate_dataset
from b2txt.ground.errors import B2txtError, DataError


def root_of(path: Path) -> Path:
    """Data-set root of ``<root>/hdf5_data_final/<session>/data_<split>.hdf5``."""
    return path.parents[2]


def data_file(path: Path) -> DataFile:
    return DataFile(path.parent.name, path.name[len("data_"):-len(".hdf5")], path)


def problems_mentioning(report: ValidationReport, *needles: str) -> list[str]:
    return [p for p in report.problems if all(n in p for n in needles)]


# ----------------------------------------------------------------------------- names and paths

def test_session_name_and_date_round_trip():
    d = dt.date(2023, 8, 13)
    assert session_name(d) == "t15.2023.08.13"
    assert session_date("t15.2023.08.13") == d
    assert session_date(session_name(dt.date(2025, 4, 1))) == dt.date(2025, 4, 1)


@pytest.mark.parametrize("bad", ["t15.2023.8.13", "t16.2023.08.13", "session1", "t15.2023.13.01",
                                 "t15.2023.02.30", "t15.2023.08.13x"])
def test_session_date_rejects_bad_names(bad):
    with pytest.raises(ValueError):
        session_date(bad)


def test_data_paths(tmp_path):
    assert data_file_path(tmp_path, SESSION, "val") == tmp_path / DATA_SUBDIR / SESSION / "data_val.hdf5"
    assert data_root(tmp_path) == tmp_path  # no hdf5_data_final below: the folder itself
    (tmp_path / DATA_SUBDIR).mkdir()
    assert data_root(tmp_path) == tmp_path / DATA_SUBDIR


# ----------------------------------------------------------------------------- write / read

def test_write_read_round_trip_is_bit_exact(tmp_path, lexicon):
    rng = np.random.default_rng(1)
    feats = rng.normal(scale=1e3, size=(37, N_FEATURES)).astype(np.float32)
    feats[0, :4] = [np.float32(1e-45), -0.0, np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    trials = [
        Trial(feats, SESSION, block_num=3, trial_num=7, sentence="the cat sat on the mat",
              phoneme_ids=np.asarray(lexicon.sentence_ids("the cat sat on the mat"))),
        *make_trials(lexicon, 2, seed=5, block_num=4),
    ]
    path = data_file_path(tmp_path, SESSION, "train")
    path.parent.mkdir(parents=True)
    write_trials(path, trials)
    out = read_file(DataFile(SESSION, "train", path))
    assert [name for name, _ in out] == ["trial_0000", "trial_0001", "trial_0002"]
    for (_, got), want in zip(out, trials):
        assert got.features.dtype == np.float32 and got.features.shape == want.features.shape
        assert got.features.tobytes() == np.asarray(want.features, dtype=np.float32).tobytes()  # bit-exact
        assert got.n_time_steps == want.features.shape[0]
        np.testing.assert_array_equal(got.phoneme_ids, want.phoneme_ids)
        assert got.sentence == want.sentence
        assert (got.session, got.block_num, got.trial_num) == (want.session, want.block_num, want.trial_num)


def test_written_file_follows_the_dryad_layout(make_trial_file, lexicon):
    path = make_trial_file("val", n_trials=2)
    sentence = SENTENCES[0]
    ids = lexicon.sentence_ids(sentence)
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["trial_0000", "trial_0001"]
        g = f["trial_0000"]
        n_steps = trial_steps(lexicon, sentence)
        assert g["input_features"].dtype == np.float32 and g["input_features"].shape == (n_steps, 512)
        assert g["seq_class_ids"].shape == (MAX_SEQ_ELEMENTS,)
        assert np.issubdtype(g["seq_class_ids"].dtype, np.integer)
        assert list(g["seq_class_ids"][: len(ids)]) == ids and not g["seq_class_ids"][len(ids):].any()
        text = g["transcription"][()]
        assert text.shape == (MAX_SEQ_ELEMENTS,)
        assert "".join(map(chr, text[: len(sentence)])) == sentence and not text[len(sentence):].any()
        assert g.attrs["n_time_steps"] == n_steps and g.attrs["seq_len"] == len(ids)
        assert g.attrs["block_num"] == 1 and g.attrs["trial_num"] == 0
        assert g.attrs["session"] == SESSION and g.attrs["sentence_label"] == sentence


def test_test_split_file_without_labels(make_trial_file):
    path = make_trial_file("test", n_trials=2)
    with h5py.File(path, "r") as f:
        g = f["trial_0001"]
        assert set(g.keys()) == {"input_features"}
        assert set(g.attrs.keys()) == {"n_time_steps", "block_num", "trial_num", "session"}
    out = read_file(data_file(path))
    assert len(out) == 2
    for _, trial in out:
        assert trial.phoneme_ids is None and trial.sentence is None
        assert trial.features.shape[1] == N_FEATURES
    assert validate_dataset(root_of(path)).ok


def test_read_trial_single_group(make_trial_file, lexicon):
    path = make_trial_file("train", n_trials=3)
    t = read_trial(path, "trial_0002", SESSION, "train")
    assert t.trial_num == 2 and t.sentence == SENTENCES[2]
    np.testing.assert_array_equal(t.phoneme_ids, lexicon.sentence_ids(SENTENCES[2]))
    with pytest.raises(DataError, match="trial_0007"):
        read_trial(path, "trial_0007", SESSION, "train")


def test_read_trial_reports_problems(make_trial_file):
    path = make_trial_file("train")
    with h5py.File(path, "a") as f:
        f["trial_0001"].attrs["n_time_steps"] = 999
    with pytest.raises(DataError) as exc:
        read_trial(path, "trial_0001", SESSION, "train")
    assert "n_time_steps" in str(exc.value) and "trial_0001" in str(exc.value)


def test_write_trials_rejects_too_long_labels(tmp_path):
    t = Trial(np.zeros((5, 512), np.float32), SESSION, 1, 0, "a", np.ones(MAX_SEQ_ELEMENTS + 1, int))
    with pytest.raises(ValueError, match="seq_class_ids"):
        write_trials(tmp_path / "x.hdf5", [t])


def test_float_valued_integer_attrs_are_accepted(make_trial_file):
    path = make_trial_file("train")
    with h5py.File(path, "a") as f:
        f["trial_0000"].attrs["block_num"] = 1.0  # some writers store integers as floats
    out = read_file(data_file(path))
    assert out[0][1].block_num == 1


# ----------------------------------------------------------------------------- discover

def test_discover_tiny_sim(tiny_sim):
    files, problems = discover(tiny_sim)
    assert problems == []
    sessions = sorted({f.session for f in files})
    assert len(sessions) == 2
    assert [(f.session, f.split) for f in files] == [(s, sp) for s in sessions for sp in ("train", "val", "test")]
    for f in files:
        assert f.path == tiny_sim / DATA_SUBDIR / f.session / f"data_{f.split}.hdf5"
        assert f.path.is_file()
    # the hdf5_data_final folder itself works too
    files2, problems2 = discover(tiny_sim / DATA_SUBDIR)
    assert files2 == files and problems2 == []


def test_discover_missing_split_and_stray_file(make_trial_file):
    path = make_trial_file("val")
    (path.parent / "notes.txt").write_text("x")
    (path.parent / ".hidden").write_text("x")
    files, problems = discover(root_of(path))
    assert [(f.session, f.split) for f in files] == [(SESSION, "val")]
    assert len(problems) == 1 and "notes.txt" in problems[0]


def test_discover_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    files, problems = discover(tmp_path / "empty")
    assert files == [] and len(problems) == 1 and "no session folders" in problems[0]


# ----------------------------------------------------------------------------- description CSV

def _blocks() -> list[Block]:
    return [
        Block(dt.date(2023, 8, 11), 25, 1, 20, "Switchboard", "Train"),
        Block(dt.date(2023, 8, 11), 25, 2, 40, "OpenWebText2", "Train"),
        Block(dt.date(2023, 9, 10), 55, 3, 10, "50-Word", "Val/Test"),
    ]


def test_description_round_trip(tmp_path):
    path = tmp_path / DESCRIPTION_FILE
    write_description(path, _blocks())
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert read_description(path) == _blocks()
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file
    idx = block_index(read_description(path))
    assert idx[(dt.date(2023, 9, 10), 3)].corpus == "50-Word"


def test_description_bad_rows_are_listed_with_line_numbers(tmp_path):
    path = tmp_path / DESCRIPTION_FILE
    write_description(path, _blocks())
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace("2023-08-11", "2023-13-45")
    lines[3] = lines[3].replace(",10,", ",ten,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        read_description(path)
    assert exc.value.problems and len(exc.value.problems) == 2
    assert "line 3" in exc.value.problems[0] and "line 4" in exc.value.problems[1]
    assert str(path) in str(exc.value)


def test_description_missing_column_and_missing_file(tmp_path):
    path = tmp_path / DESCRIPTION_FILE
    path.write_text("Date,Block number\n2023-08-11,1\n")
    with pytest.raises(DataError, match="Corpus"):
        read_description(path)
    with pytest.raises(DataError):
        read_description(tmp_path / "missing.csv")


def test_find_description(tiny_sim, tmp_path):
    assert find_description(tiny_sim) == tiny_sim / DESCRIPTION_FILE
    assert find_description(tiny_sim / DATA_SUBDIR) == tiny_sim / DESCRIPTION_FILE
    assert find_description(tmp_path) is None


def test_tiny_sim_description_matches_files(tiny_sim):
    blocks = read_description(tiny_sim / DESCRIPTION_FILE)
    counts: dict[tuple[dt.date, int], int] = {}
    for df in discover(tiny_sim)[0]:
        for _, t in read_file(df):
            key = (session_date(df.session), t.block_num)
            counts[key] = counts.get(key, 0) + 1
    assert {(b.date, b.block_num): b.n_sentences for b in blocks} == counts


# ----------------------------------------------------------------------------- validation

def test_clean_tiny_sim_validates(tiny_sim):
    report = validate_dataset(tiny_sim)
    assert report.ok, report.summary()
    assert report.problems == []
    assert report.n_files == 6 and report.n_trials == 18
    assert report.summary() == "6 file(s), 18 trial(s): no problems found"


def test_clean_made_files_validate(make_trial_file):
    root = root_of(make_trial_file("train"))
    make_trial_file("val", root=root, block_num=2)
    make_trial_file("test", root=root, block_num=3)
    report = validate_dataset(root)
    assert report.ok, report.summary()
    assert (report.n_files, report.n_trials) == (3, 9)


def _delete(name):
    def corrupt(g):
        del g[name]
    return corrupt


def _del_attr(name):
    def corrupt(g):
        del g.attrs[name]
    return corrupt


def _set_attr(name, value):
    def corrupt(g):
        g.attrs[name] = value
    return corrupt


def _rewrite(name, fn):
    def corrupt(g):
        data = fn(g[name][()])
        del g[name]
        g.create_dataset(name, data=data)
    return corrupt


def _seq_len_plus(k):
    def corrupt(g):
        g.attrs["seq_len"] = int(g.attrs["seq_len"]) + k
    return corrupt


def _set_label(pos, value):
    def corrupt(g):
        ids = g["seq_class_ids"][()]
        ids[pos] = value
        g["seq_class_ids"][...] = ids
    return corrupt


def _set_feature(value):
    def corrupt(g):
        x = g["input_features"][()]
        x[3, 17] = value
        g["input_features"][...] = x
    return corrupt


def _change_transcription(g):
    codes = g["transcription"][()]
    codes[0] = ord("X")
    g["transcription"][...] = codes


# (id, corruption of trial_0001 of a train file, words the problem line must contain)
CORRUPTIONS = [
    ("no-input_features", _delete("input_features"), ["input_features", "missing"]),
    ("no-seq_class_ids", _delete("seq_class_ids"), ["seq_class_ids", "missing"]),
    ("no-transcription", _delete("transcription"), ["transcription", "missing"]),
    ("no-n_time_steps", _del_attr("n_time_steps"), ["n_time_steps", "missing"]),
    ("no-seq_len", _del_attr("seq_len"), ["seq_len", "missing"]),
    ("no-block_num", _del_attr("block_num"), ["block_num", "missing"]),
    ("no-trial_num", _del_attr("trial_num"), ["trial_num", "missing"]),
    ("no-session", _del_attr("session"), ["session", "missing"]),
    ("no-sentence_label", _del_attr("sentence_label"), ["sentence_label", "missing"]),
    ("features-float64", _rewrite("input_features", lambda x: x.astype(np.float64)), ["input_features", "float64"]),
    ("features-int", _rewrite("input_features", lambda x: x.astype(np.int16)), ["input_features", "int16"]),
    ("features-500-wide", _rewrite("input_features", lambda x: x[:, :500]), ["input_features", "500"]),
    ("features-1d", _rewrite("input_features", lambda x: x[:, 0].copy()), ["input_features", "shape"]),
    ("features-no-rows", _rewrite("input_features", lambda x: x[:0]), ["input_features"]),
    ("n_time_steps-wrong", _set_attr("n_time_steps", 999), ["n_time_steps", "999"]),
    ("n_time_steps-string", _set_attr("n_time_steps", "twenty"), ["n_time_steps"]),
    ("features-nan", _set_feature(np.nan), ["input_features", "NaN"]),
    ("features-inf", _set_feature(np.inf), ["input_features", "Inf"]),
    ("features-neg-inf", _set_feature(-np.inf), ["input_features", "Inf"]),
    ("seq_len-over-500", _set_attr("seq_len", 501), ["seq_len", "501"]),
    ("seq_len-zero", _set_attr("seq_len", 0), ["seq_len"]),
    ("seq_len-too-small", _seq_len_plus(-1), ["seq_len", "seq_class_ids"]),
    ("seq_len-too-large", _seq_len_plus(+1), ["seq_len", "seq_class_ids"]),
    ("label-41", _set_label(1, 41), ["seq_class_ids", "41"]),
    ("label-0-inside", _set_label(1, 0), ["seq_class_ids", "padding (0)"]),
    ("label-negative", _set_label(0, -3), ["seq_class_ids", "-3"]),
    ("labels-float", _rewrite("seq_class_ids", lambda x: x.astype(np.float32)), ["seq_class_ids"]),
    ("labels-2d", _rewrite("seq_class_ids", lambda x: x.reshape(20, 25)), ["seq_class_ids"]),
    ("transcription-differs", _change_transcription, ["transcription", "sentence_label"]),
    ("transcription-non-ascii", _rewrite("transcription", lambda x: np.where(x > 0, 300, 0)),
     ["transcription", "ASCII"]),
    ("session-attr-mismatch", _set_attr("session", "t15.2023.08.14"), ["session", "t15.2023.08.14"]),
]


@pytest.mark.parametrize("corrupt, needles", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_validate_reports_file_trial_and_field(make_trial_file, corrupt, needles):
    path = make_trial_file("train")
    with h5py.File(path, "a") as f:
        corrupt(f["trial_0001"])
    report = validate_dataset(root_of(path))
    assert not report.ok
    hits = problems_mentioning(report, str(path), "trial_0001", *needles)
    assert hits, f"no problem line names {needles}: {report.problems}"
    # the other trials of the file are fine and not blamed
    assert not problems_mentioning(report, "trial_0000") and not problems_mentioning(report, "trial_0002")
    assert report.n_files == 1 and report.n_trials == 3

    # read_file refuses the file with a DataError that lists the same problem
    with pytest.raises(DataError) as exc:
        read_file(data_file(path))
    assert any(all(n in p for n in [str(path), "trial_0001", *needles]) for p in exc.value.problems)
    assert hits[0] in str(exc.value)  # the message shown to the user lists the problem


def test_validate_reports_nan_integer_attr(make_trial_file):
    """An integer attr holding NaN/Inf is a data problem, not a crash."""
    path = make_trial_file("train")
    with h5py.File(path, "a") as f:
        f["trial_0001"].attrs["n_time_steps"] = np.nan
        f["trial_0002"].attrs["block_num"] = np.inf
    report = validate_dataset(root_of(path))
    assert problems_mentioning(report, str(path), "trial_0001", "n_time_steps")
    assert problems_mentioning(report, str(path), "trial_0002", "block_num")
    with pytest.raises(DataError):
        read_file(data_file(path))


def test_labels_in_a_test_file_are_checked_too(make_trial_file):
    path = make_trial_file("test")
    with h5py.File(path, "a") as f:
        f["trial_0000"].attrs["seq_len"] = 4  # labels half present
    report = validate_dataset(root_of(path))
    assert problems_mentioning(report, str(path), "trial_0000", "seq_class_ids", "missing")


def test_validate_reports_non_group_trial_entry(make_trial_file):
    path = make_trial_file("train")
    with h5py.File(path, "a") as f:
        del f["trial_0001"]
        f.create_dataset("trial_0001", data=np.zeros(3))
        f.create_group("extra_stuff")
    report = validate_dataset(root_of(path))
    assert problems_mentioning(report, str(path), "trial_0001", "unexpected entry")
    assert problems_mentioning(report, str(path), "extra_stuff")
    with pytest.raises(DataError, match="trial_0001"):
        read_file(data_file(path))


def test_validate_reports_file_without_trials(make_trial_file):
    """A data file holding no trial group at all (e.g. an interrupted write) is a problem."""
    path = make_trial_file("train", trials=[])
    report = validate_dataset(root_of(path))
    assert not report.ok, report.summary()
    assert problems_mentioning(report, str(path))


def test_validate_collects_every_problem_of_every_file(make_trial_file):
    root = root_of(make_trial_file("train"))
    val = make_trial_file("val", root=root, block_num=2)
    other = make_trial_file("train", root=root, session="t15.2023.09.01")
    train = data_file_path(root, SESSION, "train")
    with h5py.File(train, "a") as f:
        f["trial_0000"].attrs["n_time_steps"] = 1
        f["trial_0002"].attrs["seq_len"] = 600
        del f["trial_0002"]["transcription"]
    with h5py.File(val, "a") as f:
        del f["trial_0001"]["input_features"]
    with h5py.File(other, "a") as f:
        f["trial_0001"].attrs["session"] = "elsewhere"
    report = validate_dataset(root)
    assert report.n_files == 3 and report.n_trials == 9
    assert problems_mentioning(report, str(train), "trial_0000", "n_time_steps")
    assert problems_mentioning(report, str(train), "trial_0002", "seq_len")
    assert problems_mentioning(report, str(train), "trial_0002", "transcription")
    assert problems_mentioning(report, str(val), "trial_0001", "input_features")
    assert problems_mentioning(report, str(other), "trial_0001", "session")
    assert len(report.problems) == 5
    summary = report.summary()
    assert summary.startswith("3 file(s), 9 trial(s): 5 problem(s)")
    assert all(p in summary for p in report.problems)


def _truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_file(make_trial_file):
    path = make_trial_file("train")
    good = make_trial_file("val")
    _truncate_half(path)
    report = validate_dataset(root_of(path))
    assert not report.ok
    hits = problems_mentioning(report, str(path))
    assert len(hits) == 1 and "truncated" in hits[0]
    assert not problems_mentioning(report, str(good))
    with pytest.raises(DataError) as exc:
        read_file(data_file(path))
    assert str(path) in str(exc.value) and "HDF5" in str(exc.value)


@pytest.mark.parametrize("fraction", [0.02, 0.25, 0.5, 0.75, 0.98])
def test_read_file_truncated_anywhere_raises_data_error(make_trial_file, fraction):
    path = make_trial_file("train")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DataError):
        read_file(data_file(path))
    assert not validate_dataset(root_of(path)).ok


def _object_address(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return h5py.h5o.get_info(f[name].id).addr


@pytest.mark.parametrize("obj", ["trial_0001", "trial_0001/input_features"])
def test_corrupted_object_header_is_a_data_error(make_trial_file, obj):
    """Damage inside the file (not a truncation): a group's or dataset's header is overwritten.

    h5py then fails when the object is opened; that must become a DataError naming the file and
    the trial, and validation must report it instead of crashing.
    """
    path = make_trial_file("train")
    addr = _object_address(path, obj)
    data = bytearray(path.read_bytes())
    data[addr: addr + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as exc:
        read_file(data_file(path))
    assert str(path) in str(exc.value) and "trial_0001" in str(exc.value)
    assert problems_mentioning(validate_dataset(root_of(path)), str(path), "trial_0001")


def test_non_hdf5_file(make_trial_file):
    path = make_trial_file("train")
    path.write_text("Date,Block number\nthis is not an HDF5 file\n")
    report = validate_dataset(root_of(path))
    hits = problems_mentioning(report, str(path), "HDF5")
    assert len(hits) == 1
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        read_file(data_file(path))


def test_empty_file(make_trial_file):
    path = make_trial_file("train")
    path.write_bytes(b"")
    assert problems_mentioning(validate_dataset(root_of(path)), str(path))
    with pytest.raises(DataError):
        read_file(data_file(path))


@pytest.mark.parametrize("folder", ["session_1", "t15.2023.8.13", "t15.2023.13.01", "t15_2023_08_13"])
def test_bad_session_folder_name(make_trial_file, folder):
    good = make_trial_file("train")
    bad = make_trial_file("train", session=folder, root=root_of(good))
    report = validate_dataset(root_of(good))
    hits = problems_mentioning(report, str(bad.parent), "t15.YYYY.MM.DD")
    assert len(hits) == 1
    assert report.n_files == 1  # the good session is still checked


def test_duplicate_trials_in_one_file(make_trial_file, lexicon):
    trials = make_trials(lexicon, 3)
    trials[2].trial_num = trials[0].trial_num  # block 1 trial 0 twice
    path = make_trial_file("train", trials=trials)
    report = validate_dataset(root_of(path))
    hits = problems_mentioning(report, str(path), "trial_0002", "duplicate")
    assert len(hits) == 1 and "trial_0000" in hits[0] and "block 1 trial 0" in hits[0]
    assert len(report.problems) == 1


def test_duplicate_trials_across_splits_of_a_session(make_trial_file):
    train = make_trial_file("train", block_num=1)
    val = make_trial_file("val", root=root_of(train), block_num=1)  # same block and trial numbers
    report = validate_dataset(root_of(train))
    assert len(problems_mentioning(report, str(val), "duplicate", str(train))) == 3


def test_same_block_and_trial_in_different_sessions_is_fine(make_trial_file):
    a = make_trial_file("train")
    make_trial_file("train", root=root_of(a), session="t15.2023.09.01")
    assert validate_dataset(root_of(a)).ok


def test_bad_description_csv_is_reported(tiny_sim, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_sim, root)
    desc = root / DESCRIPTION_FILE
    desc.write_text(desc.read_text().replace(",3,", ",three,", 1))
    report = validate_dataset(root)
    assert problems_mentioning(report, str(desc), "line 2")


def test_validate_missing_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        validate_dataset(tmp_path / "nope")


def test_iter_file_yields_each_trial(make_trial_file):
    path = make_trial_file("train", n_trials=4)
    with h5py.File(path, "a") as f:
        f["trial_0002"].attrs["n_time_steps"] = 3
    rows = list(iter_file(data_file(path)))
    assert [r[0] for r in rows] == ["trial_0000", "trial_0001", "trial_0002", "trial_0003"]
    assert [r[1] is None for r in rows] == [False, False, True, False]
    assert [len(r[2]) for r in rows] == [0, 0, 1, 0]


# ----------------------------------------------------------------------------- error messages

def test_data_error_message_lists_problems_and_caps_them():
    err = DataError("head", [f"p{i}" for i in range(60)])
    text = str(err)
    assert isinstance(err, B2txtError) and err.exit_code == 2
    assert text.splitlines()[0] == "head" and "  - p0" in text and "  - p49" in text
    assert "  - p50" not in text and "... and 10 more" in text
    assert len(err.problems) == 60
    assert str(DataError("only")) == "only"


def test_cli_validate_lists_the_problem(make_trial_file, capsys):
    path = make_trial_file("train")
    with h5py.File(path, "a") as f:
        f["trial_0002"]["seq_class_ids"][1] = 41
    assert main(["validate", str(root_of(path))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if "trial_0002" in ln)
    assert str(path) in line and "seq_class_ids" in line and "41" in line


def test_cli_preprocess_error_lists_the_problem(make_trial_file, tmp_path, capsys):
    path = make_trial_file("train")
    with h5py.File(path, "a") as f:
        f["trial_0001"]["input_features"][0, 0] = np.nan
    out = tmp_path / "manifest.csv"
    assert main(["preprocess", "--data", str(root_of(path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b2txt preprocess: error:" in err and "Traceback" not in err
    assert any(str(path) in ln and "trial_0001" in ln and "input_features" in ln for ln in err.splitlines())
    assert not out.exists()


def test_cli_validate_non_hdf5(make_trial_file, capsys):
    path = make_trial_file("val")
    path.write_bytes(b"\x00garbage" * 100)
    assert main(["validate", str(root_of(path))]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "HDF5" in err and "Traceback" not in err
