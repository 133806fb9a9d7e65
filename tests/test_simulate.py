"""The neural-data simulator: determinism, Dryad format, labels, description, learnability."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from helpers.data import SENTENCES, TINY_SIM_CONFIG

from b2txt.data.description import DESCRIPTION_FILE, read_description
from b2txt.data.dryad import DATA_SUBDIR, discover, read_file, session_date
from b2txt.data.simulate import FIFTY_WORDS, TRUTH_FILE, NeuralModel, SentenceSource, plan, session_days, simulate
from b2txt.ground.config import SimulateConfig
from b2txt.ground.errors import B2txtError, UnknownWordsError
from b2txt.ground.phonemes import PHONEME_TO_ID, SIL_ID

SESSION_RE = re.compile(r"^t15\.\d{4}\.\d{2}\.\d{2}$")


def all_features(root: Path) -> dict[tuple[str, str, str], np.ndarray]:
    """(session, split, trial group) -> features, for every trial below ``root``."""
    out = {}
    for path in sorted((root / DATA_SUBDIR).glob("*/data_*.hdf5")):
        with h5py.File(path, "r") as f:
            for name in f:
                out[(path.parent.name, path.stem, name)] = f[name]["input_features"][()]
    return out


def all_attrs(root: Path) -> dict[tuple[str, str, str], dict]:
    out = {}
    for path in sorted((root / DATA_SUBDIR).glob("*/data_*.hdf5")):
        with h5py.File(path, "r") as f:
            for name in f:
                out[(path.parent.name, path.stem, name)] = {k: np.asarray(v).tolist() for k, v in f[name].attrs.items()}
    return out


@pytest.fixture(scope="module")
def tiny_features(tiny_sim):
    return all_features(tiny_sim)


@pytest.fixture(scope="module")
def tiny_trials(tiny_sim):
    """(DataFile, group name, Trial) for every trial of tiny_sim."""
    files, problems = discover(tiny_sim)
    assert problems == []
    return [(df, name, t) for df in files for name, t in read_file(df)]


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_byte_identical_data(tiny_sim, lexicon, tmp_path, tiny_features):
    again = simulate(TINY_SIM_CONFIG, SENTENCES, tmp_path / "again", lexicon)
    feats = all_features(again)
    assert feats.keys() == tiny_features.keys() and len(feats) == 18
    for key, x in feats.items():
        assert x.tobytes() == tiny_features[key].tobytes(), key
    assert all_attrs(again) == all_attrs(tiny_sim)
    for name in (DESCRIPTION_FILE, TRUTH_FILE, "simulation.yaml"):
        assert (again / name).read_bytes() == (tiny_sim / name).read_bytes(), name


def test_different_seed_gives_different_data(lexicon, tmp_path, tiny_features):
    other = simulate(TINY_SIM_CONFIG.model_copy(update={"seed": 1}), SENTENCES, tmp_path / "other", lexicon)
    feats = all_features(other)
    assert len(feats) == len(tiny_features)
    for key, x in feats.items():
        y = tiny_features[key]
        assert x.shape != y.shape or not np.array_equal(x, y), key


def test_trials_are_keyed_by_seed_session_block_trial(tiny_sim, lexicon, tiny_trials):
    """Rebuild the generator state as documented and regenerate every trial bit-exactly."""
    cfg = TINY_SIM_CONFIG
    rng = np.random.default_rng(cfg.seed)
    model = NeuralModel(cfg.neural, rng)
    blocks = plan(cfg, SentenceSource(SENTENCES, lexicon, cfg, rng), rng)
    states = model.sessions(session_days(cfg), rng)
    truth = pd.read_csv(tiny_sim / TRUTH_FILE)
    sessions = sorted({b.session for b in blocks})
    assert sessions == sorted({df.session for df, _, _ in tiny_trials})
    for df, _, t in tiny_trials:
        si = sessions.index(df.session)
        row = truth[(truth.session == df.session) & (truth.block_num == t.block_num) & (truth.trial_num == t.trial_num)]
        assert len(row) == 1
        ids = lexicon.sentence_ids(row.sentence.iloc[0])
        x = model.trial(ids, states[si], np.random.default_rng([cfg.seed, si, t.block_num, t.trial_num]))
        assert x.tobytes() == t.features.tobytes()
        # dead electrodes: no threshold crossings at all in that session
        dead = np.flatnonzero(states[si].dead)
        assert not t.features[:, dead].any()


# ----------------------------------------------------------------------------- format

def test_layout_and_session_names(tiny_sim):
    root = tiny_sim / DATA_SUBDIR
    sessions = sorted(p.name for p in root.iterdir())
    assert len(sessions) == TINY_SIM_CONFIG.n_sessions == 2
    assert all(SESSION_RE.match(s) for s in sessions)
    days = session_days(TINY_SIM_CONFIG)
    assert days == [25, 55]  # first_day 25, span 30
    assert [session_date(s) for s in sessions] == [TINY_SIM_CONFIG.implant_date + dt.timedelta(days=d) for d in days]
    for s in sessions:
        assert sorted(p.name for p in (root / s).iterdir()) == ["data_test.hdf5", "data_train.hdf5", "data_val.hdf5"]
    assert (tiny_sim / DESCRIPTION_FILE).is_file() and (tiny_sim / TRUTH_FILE).is_file()
    assert not list(tiny_sim.parent.glob(".*tmp*"))  # atomic: no leftovers


def test_labels_only_in_train_and_val(tiny_sim):
    for path in sorted((tiny_sim / DATA_SUBDIR).glob("*/data_*.hdf5")):
        split = path.stem.removeprefix("data_")
        with h5py.File(path, "r") as f:
            assert len(f) == 3
            for name in f:
                g = f[name]
                assert {"n_time_steps", "block_num", "trial_num", "session"} <= set(g.attrs)
                assert g.attrs["session"] == path.parent.name
                if split == "test":
                    assert set(g) == {"input_features"}
                    assert not {"seq_len", "sentence_label"} & set(g.attrs)
                else:
                    assert set(g) == {"input_features", "seq_class_ids", "transcription"}
                    assert {"seq_len", "sentence_label"} <= set(g.attrs)


def test_features_are_float32_512_with_counts_then_sbp(tiny_features):
    for key, x in tiny_features.items():
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 512, key
        assert x.shape[0] >= (600 + 200) // 20, key  # pre-speech + post-speech rest at least
        assert np.isfinite(x).all()
        tx, sbp = x[:, :256], x[:, 256:]
        assert (tx >= 0).all() and (tx == np.round(tx)).all(), key  # Poisson counts
        assert tx.max() > 0
        assert (sbp != np.round(sbp)).mean() > 0.99, key  # continuous power
        assert (sbp < 0).any() and (sbp > 0).any()


def test_n_time_steps_fit_the_sentence(tiny_trials):
    for _, _, t in tiny_trials:
        if t.phoneme_ids is None:
            continue
        n_phones = len(t.phoneme_ids)
        lo_ms = 600 + 200 + n_phones * 40  # shortest pre + post + every segment at its minimum
        hi_ms = 1200 + 500 + n_phones * 160
        assert lo_ms / 20 <= t.n_time_steps <= hi_ms / 20 + 1


def test_labels_are_lexicon_phonemes_of_the_sentence(tiny_trials, lexicon):
    labelled = [t for df, _, t in tiny_trials if df.split != "test"]
    assert len(labelled) == 12
    for t in labelled:
        assert t.sentence in SENTENCES
        np.testing.assert_array_equal(t.phoneme_ids, lexicon.sentence_ids(t.sentence))
        assert t.phoneme_ids[-1] == SIL_ID
        assert (t.phoneme_ids == SIL_ID).sum() == len(t.sentence.split())
    for df, _, t in tiny_trials:
        if df.split == "test":
            assert t.sentence is None and t.phoneme_ids is None


def test_truth_csv_matches_the_files(tiny_sim, tiny_trials):
    truth = pd.read_csv(tiny_sim / TRUTH_FILE, keep_default_na=False)
    assert list(truth.columns) == ["split", "session", "block_num", "trial_num", "corpus", "sentence"]
    assert len(truth) == len(tiny_trials) == 18
    by_key = {(r.session, r.split, r.block_num, r.trial_num): r.sentence for r in truth.itertuples()}
    for df, _, t in tiny_trials:
        sentence = by_key[(df.session, df.split, t.block_num, t.trial_num)]
        assert sentence in SENTENCES
        if t.sentence is not None:
            assert sentence == t.sentence
    # Fortunes sentences are drawn without replacement while the corpus lasts (18 of 20).
    assert truth.sentence.is_unique


def test_description_rows_match_the_blocks(tiny_sim, tiny_trials):
    cfg = TINY_SIM_CONFIG
    blocks = read_description(tiny_sim / DESCRIPTION_FILE)
    n_blocks = cfg.train_blocks + cfg.val_blocks + cfg.test_blocks
    assert len(blocks) == cfg.n_sessions * n_blocks == 6
    dates = sorted({session_date(df.session) for df, _, _ in tiny_trials})
    assert sorted({b.date for b in blocks}) == dates
    for b in blocks:
        assert b.post_implant_day == (b.date - cfg.implant_date).days
        assert b.n_sentences == cfg.trials_per_block
        assert b.corpus in {"Fortunes", "50-Word", "Random"}
        assert b.split == ("Train" if b.block_num == 1 else "Val/Test")
        if b.split == "Val/Test":
            assert b.corpus == "Fortunes"  # held-out blocks use natural sentences
    trials_by_split_block = {}
    for df, _, t in tiny_trials:
        trials_by_split_block.setdefault((session_date(df.session), t.block_num), set()).add(df.split)
        assert 0 <= t.trial_num < cfg.trials_per_block
    expected_split = {1: {"train"}, 2: {"val"}, 3: {"test"}}
    for (date, block), splits in trials_by_split_block.items():
        assert splits == expected_split[block]
        assert (date, block) in {(b.date, b.block_num) for b in blocks}


def test_simulated_data_passes_validation(tiny_sim):
    from b2txt.data.validate import validate_dataset

    assert validate_dataset(tiny_sim).ok


# ----------------------------------------------------------------------------- corpora and errors

def test_fifty_word_and_random_corpora(lexicon, tmp_path):
    fifty = SimulateConfig(n_sessions=1, train_blocks=1, val_blocks=1, test_blocks=0, trials_per_block=2,
                           max_words=6, corpus_mix={"50-Word": 1.0})
    simulate(fifty, SENTENCES, tmp_path / "fifty", lexicon)
    truth = pd.read_csv(tmp_path / "fifty" / TRUTH_FILE)
    assert set(truth.corpus) == {"50-Word"}
    for s in truth.sentence:
        assert 3 <= len(s.split()) <= 6 and set(s.split()) <= set(FIFTY_WORDS)

    rand = fifty.model_copy(update={"corpus_mix": {"Random": 1.0}})
    simulate(rand, SENTENCES, tmp_path / "rand", lexicon)
    truth = pd.read_csv(tmp_path / "rand" / TRUTH_FILE)
    vocab = {w for s in SENTENCES for w in s.split()}
    assert set(truth.corpus) == {"Random"}
    for s in truth.sentence:
        assert 3 <= len(s.split()) <= 6 and set(s.split()) <= vocab


def test_unknown_word_fails_without_partial_output(lexicon, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(UnknownWordsError) as exc:
        simulate(TINY_SIM_CONFIG, ["the zzqxv sat down"] * 3, out, lexicon)
    assert exc.value.words == ["zzqxv"]
    assert not out.exists() and not list(tmp_path.glob(".bad.tmp-*"))


def test_no_sentence_of_the_right_length(lexicon, tmp_path):
    with pytest.raises(B2txtError, match="no corpus sentence"):
        simulate(TINY_SIM_CONFIG, ["one two", "a b c d e f g h"], tmp_path / "x", lexicon)


# ----------------------------------------------------------------------------- learnability

def _phoneme_run(model, state, phoneme, seed):
    """Bins 65..144 of a trial of 30 copies of one phoneme: pure speech of that phoneme.

    Speech starts before 1,200 ms (bin 60) and lasts at least 30 x 60 ms, so these bins fall
    inside it; with a single phoneme, coarticulation cannot blend in a neighbour.
    """
    x = model.trial([PHONEME_TO_ID[phoneme]] * 30, state, np.random.default_rng(seed))
    assert x.shape[0] >= 150
    return x[65:145, 256:]  # SBP


def test_phonemes_are_separable_in_feature_means():
    cfg = TINY_SIM_CONFIG
    rng = np.random.default_rng(123)
    model = NeuralModel(cfg.neural, rng)
    state = model.sessions(session_days(cfg), rng)[0]
    phones = ["AA", "IY", "S", "M"]
    runs = {p: _phoneme_run(model, state, p, seed=i) for i, p in enumerate(phones)}
    repeat = _phoneme_run(model, state, "AA", seed=99)
    within = [
        np.linalg.norm(runs["AA"].mean(0) - repeat.mean(0)),  # same phoneme, another trial
        *(np.linalg.norm(r[:40].mean(0) - r[40:].mean(0)) for r in runs.values()),  # two halves
    ]
    between = [np.linalg.norm(runs[a].mean(0) - runs[b].mean(0))
               for i, a in enumerate(phones) for b in phones[i + 1:]]
    assert min(between) > 2 * max(within), (between, within)


def test_sessions_drift_but_share_the_code():
    cfg = TINY_SIM_CONFIG.model_copy(update={"span_days": 120})
    rng = np.random.default_rng(7)
    model = NeuralModel(cfg.neural, rng)
    s0, s1 = model.sessions(session_days(cfg), rng)
    ids = [PHONEME_TO_ID[p] for p in ("HH", "AH", "L", "OW", "SIL")]
    a = model.trial(ids, s0, np.random.default_rng(5))
    a_again = model.trial(ids, s0, np.random.default_rng(5))
    b = model.trial(ids, s1, np.random.default_rng(5))
    assert a.tobytes() == a_again.tobytes()
    assert a.shape == b.shape  # timing comes from the trial generator only
    assert not np.array_equal(a, b)
    assert np.abs(a[:, 256:] - b[:, 256:]).mean() > 0.1
    assert not np.allclose(s0.sbp_offset, s1.sbp_offset) and not np.allclose(s0.log_gain, s1.log_gain)
    assert not (s0.dead & ~s1.dead).any()  # dead electrodes stay dead
    # tuning drifts but stays correlated (rho = exp(-120/300) ~ 0.67)
    corr = np.corrcoef(s0.tuning.ravel(), s1.tuning.ravel())[0, 1]
    assert 0.4 < corr < 0.9


def test_two_sessions_of_tiny_sim_differ(tiny_trials):
    by_session = {}
    for df, _, t in tiny_trials:
        by_session.setdefault(df.session, []).append(t.features)
    assert len(by_session) == 2
    means = [np.concatenate(v)[:, 256:].mean(0) for v in by_session.values()]
    assert not np.allclose(means[0], means[1])
