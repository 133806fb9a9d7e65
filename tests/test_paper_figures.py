"""The paper's figures 2 and 4 from small pickles with the documented keys, and the same
figure-2 panels from our own run's tables; the restricted unpickler refuses code."""

from __future__ import annotations

import argparse
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from b2txt.cli.figures import figures_paper_arguments, run_figures_paper
from b2txt.figures import make_paper_figures, make_pipeline_figures
from b2txt.ground.errors import B2txtError
from b2txt.ground.phonemes import N_CLASSES, PHONEME_TO_ID, from_lm_order
from b2txt.paper import RATING_GROUPS, load_pickle, read_copy_task, read_personal_use, session_of_day

# (day, vocab, cue sentence, cue phonemes, decoded phonemes, decoded sentence)
# Phoneme edits and word edits of each trial are counted by hand in the comments.
TRIALS = [
    (25, 50, "i am thirsty", "AY SIL AE M SIL TH ER S T IY SIL", "AY SIL AE M SIL TH ER S T IY SIL",
     "i am thirsty"),  # 0 of 11 phonemes, 0 of 3 words
    (25, 50, "i am cold", "AY SIL AE M SIL K OW L D SIL", "AY SIL AE N SIL K OW L SIL",
     "i am old"),  # AE M -> AE N (1), D deleted (1): 2 of 10; cold -> old: 1 of 3
    (25, 125000, "we went home", "W IY SIL W EH N T SIL HH OW M SIL", "W IY SIL W EH N T SIL HH OW M SIL",
     "we went home"),  # 0 of 12, 0 of 3
    (27, 125000, "the cat sat", "DH AH SIL K AE T SIL S AE T SIL", "DH AH SIL K AE T SIL S AE T SIL Z",
     "the cat sat down"),  # 1 inserted of 11; 1 inserted of 3
    (27, 125000, "open the door", "OW P AH N SIL DH AH SIL D AO R SIL", "OW0 P AH1 N SIL DH AH SIL D AO R SIL",
     "open the the door"),  # stress digits ignored: 0 of 12; 1 of 3
]


def phoneme_lists(text: str, as_array: bool):
    return np.array(text.split()) if as_array else text.split()


def lm_order_logits(phonemes: str, rng: np.random.Generator) -> np.ndarray:
    """Logits in the pickle's column order (blank, SIL, AA … ZH) whose best path is ``phonemes``."""
    lm_col = {"SIL": 1, **{p: i + 1 for p, i in PHONEME_TO_ID.items() if p not in ("BLANK", "SIL")}}
    path = []
    for p in phonemes.split():
        path += [lm_col[p.rstrip("012")], 0]
    x = rng.normal(0, 0.1, size=(len(path), N_CLASSES)).astype(np.float32)
    x[np.arange(len(path)), path] += 5
    return x


def copy_task_dict(as_arrays: bool) -> dict:
    rng = np.random.default_rng(0)
    d = {
        "cue_sentence": [t[2] for t in TRIALS],
        "cue_sentence_phonemes": [phoneme_lists(t[3], as_arrays) for t in TRIALS],
        "decoded_phonemes_raw": [phoneme_lists(t[4], as_arrays) for t in TRIALS],
        "decoded_sentence": [t[5] for t in TRIALS],
        "decoded_sentence_phonemes": [phoneme_lists(t[3], as_arrays) for t in TRIALS],
        "decoded_logits": [lm_order_logits(t[4], rng) for t in TRIALS],
        "post_implant_day": [t[0] for t in TRIALS],
        "vocab_size": [t[1] for t in TRIALS],
    }
    if as_arrays:  # numpy everywhere, ragged fields as object arrays
        for key in ("cue_sentence", "decoded_sentence"):
            d[key] = np.array(d[key])
        for key in ("post_implant_day", "vocab_size"):
            d[key] = np.array(d[key], dtype=np.int64)
        for key in ("cue_sentence_phonemes", "decoded_phonemes_raw", "decoded_sentence_phonemes", "decoded_logits"):
            arr = np.empty(len(TRIALS), dtype=object)
            arr[:] = d[key]
            d[key] = arr
    return d


RATINGS = [  # (day, rating, wpm)
    (30, "correct", 30.0), (30, "mostly correct", 20.0), (30, "one word wrong", float("nan")),
    (30, "incorrect", 10.0), (31, "response timeout", float("nan")), (31, "blank trial", float("nan")),
    (31, "no user rating", 40.0), (31, "correct", 50.0),
]


def personal_use_dict(as_frame: bool) -> dict:
    info = {"post_implant_day": [r[0] for r in RATINGS], "correctness_rating": [r[1] for r in RATINGS],
            "wpm": [r[2] for r in RATINGS]}
    if as_frame:
        info = pd.DataFrame(info)
    else:
        info = {k: np.array(v) for k, v in info.items()}
    return {"trialized_info": info,
            "total_use_time": {np.int64(30): 1800.0, 31: 5400, 32: 0},  # day 32: no use, skipped
            "total_trial_count": {30: 4, 31: 6, 32: 0}}


def write_pickle(path: Path, obj, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("as_arrays,protocol", [(False, 4), (True, 5), (True, 2)])
def test_copy_task_tables_match_hand_counts(tmp_path, as_arrays, protocol):
    data = read_copy_task(write_pickle(tmp_path / "copy.pkl", copy_task_dict(as_arrays), protocol))
    t = data.phoneme_trials
    assert t["edits"].tolist() == [0, 2, 0, 1, 0] and t["ref_len"].tolist() == [11, 10, 12, 11, 12]
    assert t["session"].tolist()[:1] == ["t15.2023.08.11"] and session_of_day(27) == "t15.2023.08.13"
    assert t["vocabulary"].tolist() == ["50 words", "50 words", "125,000 words", "125,000 words", "125,000 words"]
    assert t["decoded"].iloc[1] == "AY | AE N | K OW L |"
    w = data.word_trials
    assert w["word_edits"].tolist() == [0, 1, 0, 1, 1] and w["ref_words"].tolist() == [3, 3, 3, 3, 3]
    # logits come back in our model order: the argmax path of trial 1 spells its decoded phonemes
    best = data.logits[1].argmax(1)
    assert [int(b) for b in best if b != 0] == [PHONEME_TO_ID[p] for p in TRIALS[1][4].split()]
    assert np.array_equal(data.logits[0], from_lm_order(copy_task_dict(False)["decoded_logits"][0]))


def test_paper_figures_and_the_tables_behind_them(tmp_path):
    copy_pkl = write_pickle(tmp_path / "t15_copyTask.pkl", copy_task_dict(True))
    use_pkl = write_pickle(tmp_path / "t15_personalUse.pkl", personal_use_dict(False))
    out = tmp_path / "figs"
    paths = make_paper_figures(copy_pkl, use_pkl, out, seed=0, example_trial=1)
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "figure2.pdf", "figure2.png", "figure2_error_rates.csv", "copy_task_trials.csv", "copy_task_wer_trials.csv",
        "figure4.pdf", "figure4.png", "figure4_usage.csv", "figure4_ratings.csv", "figure4_pie.csv",
        "personal_use_trials.csv"])
    for name in ("figure2", "figure4"):
        pdf = (out / f"{name}.pdf").read_bytes()
        assert b"/FontFile2" in pdf and b"/Subtype /Type3" not in pdf  # TrueType fonts, not Type 3
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rates = pd.read_csv(out / "figure2_error_rates.csv")
    per = rates[rates["metric"] == "PER"].set_index(["post_implant_day", "vocabulary"])
    # aggregate, not the mean of trial rates: day 25, 50 words = (0 + 2) / (11 + 10)
    assert per.loc[(25, "50 words"), "rate"] == pytest.approx(2 / 21)
    assert per.loc[(27, "125,000 words"), "rate"] == pytest.approx(1 / 23)
    lo, hi = per.loc[(25, "50 words"), ["ci_low", "ci_high"]]
    assert 0 <= lo <= 2 / 21 <= hi <= 2 / 10
    wer = rates[rates["metric"] == "WER"].set_index(["post_implant_day", "vocabulary"])
    assert wer.loc[(27, "125,000 words"), "rate"] == pytest.approx(2 / 6)
    usage = pd.read_csv(out / "figure4_usage.csv")
    assert usage["post_implant_day"].tolist() == [30, 31]  # the day without use is skipped
    assert usage["cumulative_hours"].tolist() == [0.5, 2.0] and usage["cumulative_sentences"].tolist() == [4, 10]
    ratings = pd.read_csv(out / "figure4_ratings.csv").set_index("post_implant_day")
    assert ratings.loc[30, "pct_mostly correct"] == 50.0  # mostly correct + one word wrong, of 4
    assert ratings.loc[31, "pct_no rating"] == 50.0  # timeout + unrated, of 4
    assert ratings.loc[31, "pct_blank trial"] == 25.0
    assert ratings.loc[30, "mean_wpm"] == 20.0 and ratings.loc[31, "mean_wpm"] == 45.0  # NaNs ignored
    pie = pd.read_csv(out / "figure4_pie.csv").set_index("group")["n_trials"].to_dict()
    assert pie == {"100% correct": 2, "mostly correct": 2, "incorrect": 1}
    assert set(RATING_GROUPS) == {r[1] for r in RATINGS}  # every rating label was exercised


def test_personal_use_as_a_dataframe_and_unknown_labels(tmp_path):
    data = read_personal_use(write_pickle(tmp_path / "use.pkl", personal_use_dict(True)))
    assert len(data.trials) == len(RATINGS) and math.isnan(data.trials["wpm"].iloc[2])
    bad = personal_use_dict(False)
    bad["trialized_info"]["correctness_rating"][0] = "perfect"
    with pytest.raises(B2txtError, match=r"use2\.pkl: trialized_info trial 0: unknown correctness_rating 'perfect'"):
        read_personal_use(write_pickle(tmp_path / "use2.pkl", bad))


def test_missing_key_and_bad_logits_are_named(tmp_path):
    d = copy_task_dict(False)
    del d["vocab_size"]
    with pytest.raises(B2txtError, match=r"c\.pkl: key 'vocab_size' missing"):
        read_copy_task(write_pickle(tmp_path / "c.pkl", d))
    d = copy_task_dict(False)
    d["decoded_logits"][3] = np.zeros((5, 40))
    with pytest.raises(B2txtError, match=r"trial 3: decoded_logits: logits of shape \(5, 40\)"):
        read_copy_task(write_pickle(tmp_path / "d.pkl", d))


class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    evil = write_pickle(tmp_path / "t15_copyTask.pkl", {"cue_sentence": [RunsCode(marker)]})
    with pytest.raises(B2txtError, match=r"refused: the pickle asks for posix\.system, which is not a numpy, "
                                         r"pandas or builtin data type"):
        load_pickle(evil)
    with pytest.raises(B2txtError, match="posix.system"):
        make_paper_figures(evil, None, tmp_path / "out")
    assert not marker.exists()
    eval_pickle = tmp_path / "eval.pkl"  # builtins are data types only: eval is refused too
    eval_pickle.write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")
    with pytest.raises(B2txtError, match="builtins.eval"):
        load_pickle(eval_pickle)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(B2txtError, match="junk.pkl: not a readable pickle"):
        load_pickle(tmp_path / "junk.pkl")


def test_cli_pieces(tmp_path, capsys):
    p = argparse.ArgumentParser()
    figures_paper_arguments(p)
    copy_pkl = write_pickle(tmp_path / "copy.pkl", copy_task_dict(False))
    args = p.parse_args(["--copy-task", str(copy_pkl), "--out", str(tmp_path / "figs")])
    assert run_figures_paper(args) == 0 and (tmp_path / "figs" / "figure2.pdf").is_file()
    args = p.parse_args(["--copy-task", str(copy_pkl), "--out", str(tmp_path / "figs"), "--example-trial", "9"])
    with pytest.raises(B2txtError, match=r"example trial 9 out of range \(0\.\.4\)"):
        run_figures_paper(args)


def test_same_panels_from_our_run(tmp_path):
    """Our run's tables (score, decode, infer, calibrate outputs) go through the same figure-2 code."""
    from b2txt.data.logits import write_logits

    model, scores, out = tmp_path / "model", tmp_path / "scores", tmp_path / "figs"
    model.mkdir()
    scores.mkdir()
    pd.DataFrame({"step": [0, 100, 200], "train_loss": [5.0, 2.0, None], "val_PER": [None, 0.5, 0.3]}).to_csv(
        model / "metrics.csv", index=False)
    copy = read_copy_task(write_pickle(tmp_path / "copy.pkl", copy_task_dict(False)))
    trials = copy.phoneme_trials.drop(columns=["vocabulary"]).assign(
        corpus=["50-Word", "50-Word", "Fortunes", "Fortunes", "Random"])
    trials.to_csv(scores / "trials.csv", index=False)
    copy.word_trials.drop(columns=["vocabulary"]).assign(corpus=trials["corpus"]).to_csv(
        scores / "wer_trials.csv", index=False)
    rows = trials.assign(split="val", trial=[f"trial_{i:04d}" for i in range(len(trials))],
                         sentence=[t[2] for t in TRIALS])
    write_logits(tmp_path / "val.hdf5", rows, copy.logits, [None] * len(trials))
    pd.DataFrame({"session": ["t15.2023.08.13"] * 2, "n_sentences": [0, 10], "PER": [0.6, 0.3]}).to_csv(
        tmp_path / "calibration.csv", index=False)
    paths = make_pipeline_figures(model, scores, out, seed=0, logits=tmp_path / "val.hdf5",
                                  calibration=tmp_path / "calibration.csv", example_trial=1)
    assert sorted(p.name for p in paths) == sorted([
        "training_curve.pdf", "training_curve.png", "per_session_per.pdf", "per_session_per.png",
        "figure2.pdf", "figure2.png", "error_rates.csv", "calibration_curve.pdf", "calibration_curve.png"])
    rates = pd.read_csv(out / "error_rates.csv")
    per = rates[rates["metric"] == "PER"].set_index(["session", "vocabulary"])["rate"]
    assert per[("t15.2023.08.11", "50-Word corpus")] == pytest.approx(2 / 21)  # same numbers as the paper path
    assert set(rates["metric"]) == {"PER", "WER"}
    # without the optional inputs: the DAG's original outputs plus figure 2's error-rate panels
    (scores / "wer_trials.csv").unlink()
    paths = make_pipeline_figures(model, scores, tmp_path / "figs2")
    assert sorted(p.stem for p in paths) == sorted(["training_curve"] * 2 + ["per_session_per"] * 2
                                                   + ["figure2"] * 2 + ["error_rates"])
