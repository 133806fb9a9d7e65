"""The WFST decoder on a real 3-gram graph built here from a few hundred sentences.

Logits are simulated from lexicon labels (:func:`helpers.synthetic.phoneme_logits`), then put in LM
column order, exactly what the decoder receives from a phoneme model.
"""

from __future__ import annotations

import math
from pathlib import Path

import kenlm
import numpy as np
import pytest
from helpers.data import SENTENCES
from helpers.synthetic import phoneme_logits

from b2txt.evaluation.error_rates import edit_distance
from b2txt.ground.config import DecodeConfig
from b2txt.ground.phonemes import LM_ORDER, N_CLASSES, SIL_ID, Lexicon, to_lm_order
from b2txt.lm.graph import GraphError, build_graph
from b2txt.lm.nbest import DecodeInputError, frame_log_probs, total_score
from b2txt.lm.wfst import WfstDecoder, graph_files, load_graph

REPO = Path(__file__).resolve().parents[1]
#: Faster than the published beam 17 on soft simulated logits, same behaviour on clean ones.
FAST = dict(beam=12.0, max_active=2000)


def options(**changes) -> DecodeConfig:
    """The published decoding options (config/model/paper.yaml's acoustic scale 0.325, which these
    tests are sized for; the built-in default is the small simulated model's 1.5), with changes."""
    return DecodeConfig(**{"acoustic_scale": 0.325, **changes})


def logits_for(lexicon: Lexicon, sentence: str, seed: int, **kw) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return to_lm_order(phoneme_logits(lexicon.sentence_ids(sentence), rng, **kw))


def ctc_viterbi(logp: np.ndarray, labels: list[int]) -> float:
    """Best CTC alignment log-probability of ``labels`` (LM columns) over frame scores ``logp``."""
    ext = [0]
    for lab in labels:
        ext += [lab, 0]
    n = len(ext)
    score = np.full(n, -np.inf)
    score[0] = logp[0, ext[0]]
    score[1] = logp[0, ext[1]]
    for t in range(1, len(logp)):
        prev = score.copy()
        for s in range(n):
            best = prev[s]
            if s >= 1:
                best = max(best, prev[s - 1])
            if s >= 2 and ext[s] != 0 and ext[s] != ext[s - 2]:
                best = max(best, prev[s - 2])
            score[s] = best + logp[t, ext[s]]
    return float(max(score[-1], score[-2]))


def lm_columns(lexicon: Lexicon, sentence: str) -> list[int]:
    position = {model_id: col for col, model_id in enumerate(LM_ORDER)}
    return [position[i] for i in lexicon.sentence_ids(sentence)]


# ----------------------------------------------------------------------------- recognition

def test_recovers_known_sentences_from_clean_logits(kenlm_graph, lexicon, fortune_sentences):
    decoder = WfstDecoder(kenlm_graph, options())  # the published options: beam 17, nbest 100 -> 1
    decoder_1 = WfstDecoder(kenlm_graph, options(nbest=1))
    picks = fortune_sentences[::37][:8]
    for i, s in enumerate(picks):
        # peaky like a trained model's: with peak 8 and blank penalty 90, putting a phoneme on a
        # blank frame costs only ~3.5 nats, and the LM may rightly prefer a likelier word
        x = logits_for(lexicon, s, seed=i, peak=14.0)
        assert decoder_1.decode(x).best == s
        nb = decoder.decode(x)
        assert nb.best == s and 1 < len(nb) <= 100


def test_nbest_is_distinct_sorted_deterministic_and_consistent(kenlm_graph, lexicon):
    opts = options(nbest=20, length_penalty=0.5, **FAST)
    decoder = WfstDecoder(kenlm_graph, opts)
    x = logits_for(lexicon, SENTENCES[3], seed=3, noise_sd=1.5)
    nb = decoder.decode(x)
    assert 5 <= len(nb) <= 20
    sentences = [c.sentence for c in nb.candidates]
    assert len(set(sentences)) == len(sentences)
    totals = [c.total for c in nb.candidates]
    assert totals == sorted(totals, reverse=True)
    assert decoder.decode(x) == nb  # deterministic
    arpa = kenlm.Model(str(kenlm_graph / "lm.arpa"))
    for c in nb.candidates:
        assert c.llm == 0.0
        assert c.total == pytest.approx(opts.acoustic_scale * c.acoustic + c.ngram + 0.5 * c.n_words, abs=1e-6)
        assert c.total == pytest.approx(total_score(c.acoustic, c.ngram, c.n_words, opts), abs=1e-6)
        # free optional SIL: the graph cost is exactly the n-gram cost (natural log)
        assert c.ngram == pytest.approx(arpa.score(c.sentence) * math.log(10), abs=0.01)
    # the 1-best search agrees with the top of the n-best list
    one = WfstDecoder(kenlm_graph, options(nbest=1, **FAST)).decode(x).candidates[0]
    top = WfstDecoder(kenlm_graph, options(nbest=20, **FAST)).decode(x).candidates[0]
    assert one.sentence == top.sentence
    assert one.acoustic == pytest.approx(top.acoustic, abs=1e-2) and one.ngram == pytest.approx(top.ngram, abs=1e-3)


def test_acoustic_score_is_the_best_alignment_of_the_sentence(kenlm_graph, lexicon, fortune_sentences):
    opts = options(nbest=1, **FAST)
    decoder = WfstDecoder(kenlm_graph, opts)
    single = [s for s in fortune_sentences if all(len(lexicon.pronunciations[w]) == 1 for w in s.split())]
    checked = 0
    for i, s in enumerate(fortune_sentences[5:40:7] + single[:5]):
        x = logits_for(lexicon, s, seed=100 + i)
        best = decoder.decode(x).candidates[0]
        assert best.sentence == s
        logp = frame_log_probs(x, opts).astype(np.float64)
        labels = lm_columns(lexicon, s)
        # L allows an optional SIL before the first word too (noise can make frame 0 look like SIL)
        viterbi = max(ctc_viterbi(logp, labels), ctc_viterbi(logp, [LM_ORDER.index(SIL_ID), *labels]))
        assert best.acoustic >= viterbi - 1e-2  # the decoder may pick another variant/SIL choice
        if all(len(lexicon.pronunciations[w]) == 1 for w in s.split()):
            assert best.acoustic == pytest.approx(viterbi, abs=1e-2)
            checked += 1
    assert checked >= 5


def test_lm_fixes_confused_logits_better_than_greedy(kenlm_graph, lexicon, fortune_sentences):
    decoder = WfstDecoder(kenlm_graph, options(nbest=1, **FAST))
    by_phones = {}
    for w, prons in lexicon.pronunciations.items():
        by_phones.setdefault(prons[0], w)
    sil_col = LM_ORDER.index(SIL_ID)
    greedy_err = lm_err = ref_len = 0
    for i, s in enumerate(fortune_sentences[1:200:10]):
        x = logits_for(lexicon, s, seed=200 + i, confusion=0.15)
        best = np.argmax(x, axis=1)
        tokens = [int(t) for j, t in enumerate(best) if t != 0 and (j == 0 or t != best[j - 1])]
        words, current = [], []
        for t in tokens:
            if t == sil_col:
                words.append(by_phones.get(tuple(_phone(c) for c in current), "<?>"))
                current = []
            else:
                current.append(t)
        ref = s.split()
        greedy_err += edit_distance(words, ref)
        lm_err += edit_distance(decoder.decode(x).best.split(), ref)
        ref_len += len(ref)
    assert lm_err < greedy_err
    assert lm_err / ref_len < 0.5 * greedy_err / ref_len


def _phone(col: int) -> str:
    from b2txt.ground.phonemes import CLASSES
    return CLASSES[LM_ORDER[col]]


# ----------------------------------------------------------------------------- options

def test_bad_inputs_raise_decode_input_error(kenlm_graph):
    decoder = WfstDecoder(kenlm_graph, options(nbest=1))
    good = np.zeros((10, N_CLASSES), dtype=np.float32)
    nan = good.copy()
    nan[3, 7] = np.nan
    for bad, match in [(np.zeros((10, 30), np.float32), r"shape \[T, 41\]"), (nan, "non-finite.*frame 3"),
                       (np.zeros((0, N_CLASSES), np.float32), "no frames"), (good.astype(np.float64), "float32"),
                       (np.zeros(N_CLASSES, np.float32), "shape"), (good.tolist(), "numpy array")]:
        with pytest.raises(DecodeInputError, match=match):
            decoder.decode(bad)


def test_blank_penalty_lowers_blanks_so_more_words_come_out(kenlm_graph, lexicon):
    s = SENTENCES[0]
    x = logits_for(lexicon, s, seed=7, noise_sd=0.3)
    x[:, 0] = np.maximum(x[:, 0], x.max(axis=1) + 2.0)  # blank beats every phoneme frame (p ≈ 0.88)
    words = {}
    for bp in (1.0, 1000.0):
        words[bp] = WfstDecoder(kenlm_graph, options(nbest=1, blank_penalty=bp, **FAST)).decode(x).best
    assert len(words[1.0].split()) < len(words[1000.0].split())
    assert words[1000.0] == s


def test_acoustic_scale_trades_lm_score_for_acoustic_score(kenlm_graph, lexicon):
    odd = "the cat sat on the tree"  # every word in the graph, the sentence unlikely under the LM
    x = logits_for(lexicon, odd, seed=11)
    low = WfstDecoder(kenlm_graph, options(nbest=1, acoustic_scale=0.02, **FAST)).decode(x).candidates[0]
    high = WfstDecoder(kenlm_graph, options(nbest=1, acoustic_scale=3.0, **FAST)).decode(x).candidates[0]
    assert high.sentence == odd
    assert low.sentence != odd
    assert low.ngram > high.ngram and low.acoustic < high.acoustic


def test_length_penalty_favours_longer_sentences(kenlm_graph, lexicon):
    x = logits_for(lexicon, SENTENCES[9], seed=12, noise_sd=1.5, confusion=0.2)
    n = [len(WfstDecoder(kenlm_graph, options(nbest=5, length_penalty=lp, **FAST)).decode(x).best.split())
         for lp in (-20.0, 0.0, 20.0)]
    assert n[0] <= n[1] <= n[2] and n[0] < n[2]


def test_blank_skip_threshold_still_decodes(kenlm_graph, lexicon):
    s = SENTENCES[5]
    x = logits_for(lexicon, s, seed=13)
    decoder = WfstDecoder(kenlm_graph, options(nbest=1, blank_skip_threshold=0.99, **FAST))
    assert decoder.decode(x).best == s


def test_rescoring_with_the_unpruned_grammar(kenlm_graph, lexicon):
    x = logits_for(lexicon, SENTENCES[2], seed=14, noise_sd=1.5)
    plain = WfstDecoder(kenlm_graph, options(nbest=10, **FAST)).decode(x)
    rescored = WfstDecoder(kenlm_graph, options(nbest=10, rescore_unpruned=True, **FAST)).decode(x)
    pruned, full = kenlm.Model(str(kenlm_graph / "lm.arpa")), kenlm.Model(str(kenlm_graph / "lm.unpruned.arpa"))
    ln10 = math.log(10)
    for c in plain.candidates:
        assert c.ngram == pytest.approx(pruned.score(c.sentence) * ln10, abs=0.01)
    for c in rescored.candidates:
        assert c.ngram == pytest.approx(full.score(c.sentence) * ln10, abs=0.01)
    assert any(abs(pruned.score(c.sentence) - full.score(c.sentence)) > 1e-3 for c in rescored.candidates)


def test_a_trials_nbest_does_not_depend_on_the_trials_before_it(kenlm_graph, lexicon):
    """One decoder serves many trials in any order (the LM server's workers interleave sessions):
    each n-best list is the same in either order (a reused kaldi lattice search once kept state)."""
    decoder = WfstDecoder(kenlm_graph, options(nbest=30, **FAST))
    xs = [logits_for(lexicon, s, seed=i, confusion=0.3, runner_up=1.0, noise_sd=1.5) for i, s in enumerate(SENTENCES)]
    forward = [decoder.decode(x) for x in xs]
    backward = [decoder.decode(x) for x in reversed(xs)][::-1]
    assert forward == backward and any(len(nb) > 5 for nb in forward)


def test_graph_is_loaded_once_per_process(kenlm_graph):
    a = WfstDecoder(kenlm_graph, options(nbest=1))
    b = WfstDecoder(kenlm_graph, options(nbest=5))
    assert a.graph is b.graph and a.graph.tlg is load_graph(kenlm_graph).tlg
    assert WfstDecoder(kenlm_graph, options(nbest=3, beam=10.0)).graph is a.graph  # other options, same graph
    assert [p.name for p in graph_files(kenlm_graph)] == ["TLG.fst", "words.txt", "G.fst", "G_no_prune.fst"]


def test_unreadable_or_missing_graph_is_a_clear_error(tmp_path, kenlm_graph):
    with pytest.raises(GraphError, match="graph directory not found"):
        WfstDecoder(tmp_path / "nope")
    (tmp_path / "TLG.fst").write_bytes(b"not an fst" * 5)
    (tmp_path / "words.txt").write_text((kenlm_graph / "words.txt").read_text())
    with pytest.raises(GraphError, match=r"TLG.fst: cannot read decoding graph"):
        WfstDecoder(tmp_path)
    (tmp_path / "TLG.fst").write_bytes((kenlm_graph / "TLG.fst").read_bytes())
    (tmp_path / "words.txt").unlink()
    with pytest.raises(GraphError, match="words.txt: word table not found"):
        WfstDecoder(tmp_path)


def test_published_style_graph_upper_case_words_decodes_to_normalised_text(tmp_path, kenlm_graph, lexicon):
    """A graph from an upper-case ARPA (the published CMU-dict convention) is interchangeable."""
    upper = tmp_path / "upper.arpa"
    special = {"<s>", "</s>", "<unk>"}
    lines = []
    for line in (kenlm_graph / "lm.arpa").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 2:
            cols[1] = " ".join(w if w in special else w.upper() for w in cols[1].split())
        lines.append("\t".join(cols))
    upper.write_text("\n".join(lines) + "\n")
    build_graph(upper, tmp_path / "g", lexicon)
    s = SENTENCES[1]
    x = logits_for(lexicon, s, seed=15)
    ours = WfstDecoder(kenlm_graph, options(nbest=1, **FAST)).decode(x).candidates[0]
    theirs = WfstDecoder(tmp_path / "g", options(nbest=1, **FAST)).decode(x).candidates[0]
    assert theirs.sentence == ours.sentence == s
    assert theirs.ngram == pytest.approx(ours.ngram, abs=1e-3)


def test_streaming_chunks_equal_one_pass_and_end_on_the_decoded_sentence(kenlm_graph, lexicon, fortune_sentences):
    """A trial fed in chunks (the LM server's partials) searches as one pass does: the chunked
    stream's best sentence after each chunk equals a fresh one-chunk stream over the same frames,
    and after the last chunk it is the sentence decode() finds on clean logits."""
    decoder = WfstDecoder(kenlm_graph, options(nbest=1))
    for i, s in enumerate(fortune_sentences[::41][:4]):
        x = logits_for(lexicon, s, seed=i, peak=14.0)
        stream = decoder.stream()
        partials = [stream.advance(x[a:a + 7]) for a in range(0, len(x), 7)]
        assert partials[-1] == decoder.decode(x).best == s
        for k, a in enumerate(range(0, len(x), 7)):
            if k % 3 == 0:  # spot checks: the prefix searched in one go
                assert decoder.stream().advance(x[:a + 7]) == partials[k]
        assert len(set(partials)) > 1  # words appear as frames arrive
        # streams are independent: interleaving two trials changes neither
        a, b = decoder.stream(), decoder.stream()
        a.advance(x[:20]), b.advance(x[:35])
        assert a.advance(x[20:]) == s


def test_partials_search_as_the_one_best_decode_with_the_same_options(kenlm_graph, lexicon, fortune_sentences):
    """Streaming partials use their own, cheaper options (partial_beam, partial_max_active, no
    min_active); given the one-best search's options they find what it finds, chunk by chunk."""
    o = options(nbest=1, min_active=0)
    o = o.model_copy(update={"partial_beam": o.beam, "partial_max_active": o.max_active})
    decoder = WfstDecoder(kenlm_graph, o)
    for i, s in enumerate(fortune_sentences[::53][:4]):
        x = logits_for(lexicon, s, seed=40 + i, peak=6.0)
        stream = decoder.stream()
        for a in range(0, len(x), 9):
            partial = stream.advance(x[a:a + 9])
        assert partial == decoder.decode(x).best
