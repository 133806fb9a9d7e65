import jiwer
import numpy as np
import pandas as pd
import pytest

from b2txt.data.logits import greedy_decode
from b2txt.evaluation.error_rates import aggregate, bootstrap_ci, edit_distance, word_table


@pytest.mark.parametrize("hyp,ref,d", [
    ("", "", 0), ("abc", "abc", 0), ("", "abc", 3), ("abc", "", 3), ("kitten", "sitting", 3),
    ("flaw", "lawn", 2), ("abcd", "acbd", 2),
])
def test_edit_distance_known_cases(hyp, ref, d):
    assert edit_distance(list(hyp), list(ref)) == d
    assert edit_distance(list(ref), list(hyp)) == d  # symmetric


def test_edit_distance_triangle_inequality():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b, c = (rng.integers(1, 4, size=rng.integers(0, 8)).tolist() for _ in range(3))
        assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)


def test_greedy_decode_merges_repeats_and_drops_blanks():
    path = [0, 5, 5, 0, 5, 7, 7, 0, 0, 40]
    logits = np.full((len(path), 41), -5.0)
    logits[np.arange(len(path)), path] = 5.0
    assert greedy_decode(logits) == [5, 5, 7, 40]


def test_aggregate_rate_is_total_edits_over_total_length():
    table = pd.DataFrame({"session": ["a", "a", "b"], "post_implant_day": [1, 1, 2],
                          "edits": [1, 3, 0], "ref_len": [10, 10, 5]})
    per = aggregate(table, "session").set_index("session")
    assert per.loc["a", "PER"] == pytest.approx(4 / 20)  # not the mean of 0.1 and 0.3
    assert per.loc["b", "PER"] == 0


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_trials():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 40, size=400)
    edits = rng.binomial(lengths, 0.2)
    lo, hi = bootstrap_ci(edits, lengths, seed=0)
    rate = edits.sum() / lengths.sum()
    assert lo < rate < hi
    lo_small, hi_small = bootstrap_ci(edits[:40], lengths[:40], seed=0)
    assert hi_small - lo_small > hi - lo
    assert bootstrap_ci(edits, lengths, seed=3) == bootstrap_ci(edits, lengths, seed=3)


def _decoded(rows):
    cols = ["session", "source_trial", "block_num", "trial_num", "corpus", "post_implant_day", "reference", "decoded"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


def test_word_error_rate_is_aggregate_and_matches_edit_distance(tmp_path):
    from b2txt.evaluation.reports import write_word_scores

    decoded = _decoded([
        ("s1", "trial_0000", 1, 0, "A", 5, "the cat sat", "the cat sat"),
        ("s1", "trial_0001", 1, 1, "A", 5, "open the door please", "open a door"),
        ("s2", "trial_0000", 2, 0, "B", 9, "we went home", ""),
        ("s2", "trial_0001", 2, 1, "B", 9, "", "unlabelled test trial"),
    ])
    m = write_word_scores(decoded, tmp_path, "val")
    edits = sum(edit_distance(h.split(), r.split()) for h, r in
                [("the cat sat", "the cat sat"), ("open a door", "open the door please"), ("", "we went home")])
    assert m["n_trials"] == 3 and m["n_words"] == 3 + 4 + 3
    assert m["WER"] == pytest.approx(edits / 10)
    assert m["per_session"]["s2"] == 1.0
    assert m["WER_ci95"][0] <= m["WER"] <= m["WER_ci95"][1]
    per = pd.read_csv(tmp_path / "wer_per_corpus.csv").set_index("corpus")
    assert per.loc["A", "WER"] == pytest.approx(2 / 7)
    assert {"wer.json", "wer_per_session.csv", "wer_trials.csv"} <= {p.name for p in tmp_path.iterdir()}


def test_submission_is_in_session_then_trial_order_with_normalised_text(tmp_path):
    from b2txt.evaluation.reports import write_submission

    decoded = _decoded([
        ("t15.2023.09.01", "trial_0001", 1, 1, "", 0, "", "Second, trial!"),
        ("t15.2023.08.13", "trial_0000", 1, 0, "", 0, "", "first"),
        ("t15.2023.09.01", "trial_0000", 1, 0, "", 0, "", "  THIRD  one "),
    ])
    n = write_submission(decoded, tmp_path / "sub.csv")
    out = pd.read_csv(tmp_path / "sub.csv", keep_default_na=False)
    assert n == 3 and list(out.columns) == ["id", "text"]
    assert out["id"].tolist() == [0, 1, 2]
    assert out["text"].tolist() == ["first", "third one", "second trial"]


def test_word_counts_equal_jiwers():
    """Our word edit counts (no jiwer at run time, so scoring needs only the core packages) against
    jiwer's on random sentences with substitutions, deletions, insertions and odd whitespace."""
    rng = np.random.default_rng(3)
    vocab = ["a", "the", "cat", "sat", "on", "mat", "i", "need", "water"]
    refs, hyps = [], []
    for _ in range(200):
        ref = list(rng.choice(vocab, size=rng.integers(1, 9)))
        hyp = [w for w in ref if rng.random() > 0.2]
        for _ in range(rng.integers(0, 3)):
            hyp.insert(int(rng.integers(0, len(hyp) + 1)), str(rng.choice(vocab)))
        refs.append("  ".join(ref) + " ")
        hyps.append(" ".join(hyp))
    table = word_table(pd.DataFrame({"reference": refs, "decoded": hyps}))
    for ref, hyp, edits, n in zip(refs, hyps, table["word_edits"], table["ref_words"]):
        out = jiwer.process_words(ref, hyp) if hyp.strip() else None
        if out is None:  # jiwer refuses an empty hypothesis only in some versions: all deletions
            assert (edits, n) == (len(ref.split()), len(ref.split()))
            continue
        assert edits == out.substitutions + out.deletions + out.insertions
        assert n == out.substitutions + out.deletions + out.hits
