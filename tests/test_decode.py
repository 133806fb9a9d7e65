"""`b2txt decode`: both decoders behind one factory, the process pool, files in and out.

A real 3-gram (KenLM lmplz) and its TLG graph over a few hundred sentences; logits are
simulated phoneme logits written into a real logits file.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers.data import SENTENCES
from helpers.synthetic import ids_to_words, phoneme_logits, trials_file

from b2txt.cli import main
from b2txt.data.decoded import read_decoded
from b2txt.data.logits import greedy_decode
from b2txt.evaluation.error_rates import edit_distance
from b2txt.ground.config import DecodeConfig
from b2txt.ground.phonemes import to_lm_order
from b2txt.lm.core import DecodingCore, make_decoder
from b2txt.lm.pool import decode_file, decode_many

#: Fast, deterministic options for tiny graphs (the meaning is the config's).
OPTS = DecodeConfig(acoustic_scale=1.5, nbest=10, augment_top=10, workers=1)


def test_both_decoders_recover_clean_sentences_and_agree(kenlm_graph, lexicon):
    wfst = make_decoder(OPTS, kenlm_graph)
    lex = make_decoder(OPTS.model_copy(update={"decoder": "lexicon"}), kenlm_graph)
    rng = np.random.default_rng(0)
    for sentence in SENTENCES[:8]:
        x = to_lm_order(phoneme_logits(lexicon.sentence_ids(sentence), rng, peak=14.0))
        a, b = wfst.decode(x), lex.decode(x)
        assert a.best == b.best == sentence
        # same sentence, same score definitions: the totals agree closely
        assert a.candidates[0].total == pytest.approx(b.candidates[0].total, abs=0.05)
        assert a.candidates[0].ngram == pytest.approx(b.candidates[0].ngram, abs=0.05)


def test_lm_beats_greedy_phonemes_through_the_lexicon_on_noisy_logits(kenlm_graph, lexicon):
    rng = np.random.default_rng(3)
    sentences = list(SENTENCES)
    # soft logits with uncertain errors: the true phoneme a close second where another wins
    logits = [phoneme_logits(lexicon.sentence_ids(s), rng, confusion=0.15, runner_up=2.0) for s in sentences]
    core = DecodingCore(kenlm_graph, OPTS.model_copy(update={"acoustic_scale": 0.5}))
    results = decode_many(core, [to_lm_order(x) for x in logits], workers=1, show_progress=False)

    def wer(hyps):
        return sum(edit_distance(h.split(), r.split()) for h, r in zip(hyps, sentences)) / sum(
            len(r.split()) for r in sentences)

    greedy = wer([ids_to_words(greedy_decode(x), lexicon) for x in logits])
    with_lm = wer([r.nbest.best for r in results])
    assert with_lm < greedy / 2, (with_lm, greedy)


def test_process_pool_gives_the_same_results_in_order(kenlm_graph, lexicon):
    rng = np.random.default_rng(5)
    logits = [to_lm_order(phoneme_logits(lexicon.sentence_ids(s), rng, confusion=0.1)) for s in SENTENCES]
    core = DecodingCore(kenlm_graph, OPTS)
    one = decode_many(core, logits, workers=1, show_progress=False)
    two = decode_many(core, logits, workers=2, show_progress=False)
    assert [r.index for r in two] == list(range(len(logits)))
    assert [r.nbest for r in one] == [r.nbest for r in two]


def test_decode_file_writes_sentences_and_nbest(kenlm_graph, lexicon, tmp_path):
    path, _ = trials_file(tmp_path / "val.hdf5", lexicon, SENTENCES[:6], peak=14.0)
    table = decode_file(path, kenlm_graph, tmp_path / "out", OPTS, log=lambda m: None)
    assert table["decoded"].tolist() == SENTENCES[:6]
    assert table["reference"].tolist() == SENTENCES[:6]
    again = read_decoded(tmp_path / "out" / "decoded.csv")
    assert again["decoded"].tolist() == SENTENCES[:6] and len(again) == 6
    lines = [json.loads(line) for line in (tmp_path / "out" / "nbest.jsonl").read_text().splitlines()]
    assert [x["trial"] for x in lines] == list(range(6))
    for x in lines:
        totals = [c[4] for c in x["candidates"]]
        assert totals == sorted(totals, reverse=True) and len({c[0] for c in x["candidates"]}) == len(totals)


def test_decode_file_with_a_loaded_core_decodes_as_without(kenlm_graph, lexicon, tmp_path):
    """One core reused over several files (benchmarks/ensemble.py) writes what a fresh one writes."""
    core = DecodingCore(kenlm_graph, OPTS).load()
    for i, sentences in enumerate((SENTENCES[:4], SENTENCES[4:9])):
        path, _ = trials_file(tmp_path / f"v{i}.hdf5", lexicon, sentences, seed=i, confusion=0.1)
        fresh = decode_file(path, kenlm_graph, tmp_path / f"fresh{i}", OPTS, log=lambda m: None)
        reused = decode_file(path, kenlm_graph, tmp_path / f"reused{i}", OPTS, log=lambda m: None, core=core)
        pd.testing.assert_frame_equal(fresh.drop(columns="decode_ms"), reused.drop(columns="decode_ms"))
        for name in ("decoded.csv", "nbest.jsonl"):
            assert (tmp_path / f"fresh{i}" / name).read_bytes() == (tmp_path / f"reused{i}" / name).read_bytes()
    with pytest.raises(ValueError, match="not one on"):
        decode_file(path, kenlm_graph, tmp_path / "other", OPTS.model_copy(update={"beam": 9.0}), core=core)
    assert not (tmp_path / "other").exists()


def test_cli_decode_then_score_words(kenlm_graph, lexicon, tmp_path, capsys):
    path, _ = trials_file(tmp_path / "val.hdf5", lexicon, SENTENCES[:5], peak=14.0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode: {acoustic_scale: 1.5, nbest: 5, workers: 2}\n")
    assert main(["decode", "--config", str(cfg), "--logits", str(path), "--lm", str(kenlm_graph),
                 "--out", str(tmp_path / "dec")]) == 0
    assert main(["score", "--decoded", str(tmp_path / "dec" / "decoded.csv"), "--out", str(tmp_path / "sc")]) == 0
    assert json.loads((tmp_path / "sc" / "wer.json").read_text())["WER"] == 0.0
    assert main(["decode", "--config", str(cfg), "--logits", str(path), "--lm", str(kenlm_graph),
                 "--out", str(tmp_path / "dec2"), "--decoder", "lexicon"]) == 0
    a = pd.read_csv(tmp_path / "dec" / "decoded.csv", keep_default_na=False)["decoded"]
    b = pd.read_csv(tmp_path / "dec2" / "decoded.csv", keep_default_na=False)["decoded"]
    assert a.tolist() == b.tolist()


def test_bad_inputs_are_one_clear_error_and_no_output(kenlm_graph, lexicon, tmp_path, capsys):
    import h5py

    path, _ = trials_file(tmp_path / "val.hdf5", lexicon, SENTENCES[:3])
    with h5py.File(path, "a") as f:  # a NaN in trial 1
        x = f["trial_00001/logits"][()]
        x[2, 3] = np.nan
        del f["trial_00001/logits"]
        f["trial_00001/logits"] = x
    out = tmp_path / "out"
    assert main(["decode", "--logits", str(path), "--lm", str(kenlm_graph), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trial_00001" in err and "NaN/Inf" in err and "Traceback" not in err  # the reader refuses it
    assert not out.exists()
    path, _ = trials_file(tmp_path / "clean.hdf5", lexicon, SENTENCES[:3])
    assert main(["decode", "--logits", str(path), "--lm", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "language-model directory not found" in capsys.readouterr().err
    empty = tmp_path / "empty_lm"
    empty.mkdir()
    assert main(["decode", "--logits", str(path), "--lm", str(empty), "--out", str(out), "--decoder", "lexicon"]) == 2
    assert "no KenLM model" in capsys.readouterr().err
    assert main(["score", "--decoded", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "decoded file not found" in capsys.readouterr().err
