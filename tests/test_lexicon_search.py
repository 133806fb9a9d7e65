"""Lexicon beam search (flashlight-text + KenLM) on a small trigram ARPA written by the tests,
with the real CMU lexicon and simulated phoneme logits (no mocks)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import pytest
from helpers.arpa import template_sentences, write_arpa
from helpers.synthetic import phoneme_logits

from b2txt.ground.config import DecodeConfig
from b2txt.ground.errors import B2txtError
from b2txt.ground.phonemes import LM_ORDER, PHONEME_TO_ID, SIL, SIL_ID, Lexicon, to_lm_order
from b2txt.lm.lexicon_search import MAX_HOMOPHONES, LexiconDecoder, LexiconHomophoneWarning, build_search
from b2txt.lm.nbest import DecodeInputError, NBest, frame_log_probs, scoring_string, total_score

#: Words put into the LM vocabulary without training counts: homophones of trained words.
HOMOPHONES = ("to", "too", "sea", "write", "tee")


def options(**changes) -> DecodeConfig:
    """The published decoding options (config/model/paper.yaml's acoustic scale 0.325, which these
    tests are sized for; the built-in default is the small simulated model's 1.5), with changes."""
    return DecodeConfig(**{"acoustic_scale": 0.325, **changes})


OPTS = options()


@pytest.fixture(scope="module")
def lm_sentences() -> list[str]:
    return template_sentences(300, seed=0)


@pytest.fixture(scope="module")
def arpa(tmp_path_factory, lm_sentences) -> Path:
    return write_arpa(tmp_path_factory.mktemp("lm") / "lm.arpa", lm_sentences, order=3, extra_words=HOMOPHONES)


@pytest.fixture(scope="module")
def decoder(arpa, lexicon) -> LexiconDecoder:
    return LexiconDecoder(arpa, OPTS, lexicon)


def lm_logits(lexicon: Lexicon, sentence: str, seed: int, **kwargs) -> np.ndarray:
    return to_lm_order(phoneme_logits(lexicon.sentence_ids(sentence), np.random.default_rng(seed), **kwargs))


def ids_logits(ids: list[int], seed: int = 0) -> np.ndarray:
    return to_lm_order(phoneme_logits(ids, np.random.default_rng(seed)))


def test_vocabulary_is_the_lexicon_restricted_to_the_lm(decoder, lm_sentences):
    expected = {w for s in lm_sentences for w in s.split()} | set(HOMOPHONES)
    assert set(decoder.vocabulary) == expected
    assert decoder.search.not_in_lm == len(Lexicon.from_cmudict()) - len(expected)
    assert decoder.dropped_homophones == ()


def test_trie_is_built_once_per_process(decoder, arpa, lexicon):
    other = LexiconDecoder(arpa, options(beam=10.0, nbest=5), lexicon)
    assert other.search is decoder.search


def test_recovers_clean_sentences(decoder, lexicon, lm_sentences):
    unseen = "the woman bring a cup of tea after lunch"
    assert unseen not in lm_sentences
    for i, sentence in enumerate([*lm_sentences[:15], unseen]):
        nbest = decoder.decode(lm_logits(lexicon, sentence, seed=i))
        assert nbest.best == sentence


def test_homophones_are_resolved_by_the_lm(decoder, lexicon):
    # "two", "to" and "too" share T UW; "see"/"sea" S IY; "right"/"write" R AY T
    for sentence in ("i want two tickets", "we see the blue door right now"):
        assert decoder.decode(lm_logits(lexicon, sentence, seed=3)).best == sentence
    # a second pronunciation variant (the as DH IY) is in the trie as well
    ids = [PHONEME_TO_ID[p] for p in ("DH", "IY", SIL, "R", "EH", "D", SIL, "K", "AA", "R", SIL)]
    assert decoder.decode(ids_logits(ids)).best == "the red car"


def test_nbest_is_distinct_sorted_and_deterministic(decoder, arpa, lexicon, lm_sentences):
    x = lm_logits(lexicon, lm_sentences[20], seed=7, confusion=0.15)
    nbest = decoder.decode(x)
    sentences = [c.sentence for c in nbest.candidates]
    assert 1 < len(nbest) <= OPTS.nbest
    assert len(set(sentences)) == len(sentences)
    keys = [(-c.total, c.sentence) for c in nbest.candidates]
    assert keys == sorted(keys)
    assert decoder.decode(x) == nbest
    assert LexiconDecoder(arpa, OPTS, lexicon).decode(x) == nbest
    assert LexiconDecoder(arpa, OPTS.model_copy(update={"nbest": 2}), lexicon).decode(x) == NBest(nbest.candidates[:2])


def test_nbest_is_the_same_in_a_fresh_process(decoder, arpa, lexicon, lm_sentences, tmp_path):
    x = lm_logits(lexicon, lm_sentences[21], seed=8, confusion=0.15)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np; sys.path.insert(0, 'tests');"
            "from b2txt.ground.config import DecodeConfig; from b2txt.lm.lexicon_search import LexiconDecoder;"
            "from b2txt.lm.nbest import scoring_string;"
            f"d = LexiconDecoder({str(arpa)!r}, DecodeConfig(acoustic_scale=0.325));"
            f"print(scoring_string(d.decode(np.load({str(tmp_path / 'x.npy')!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == scoring_string(decoder.decode(x))


def test_scores_follow_the_interface(arpa, lexicon, lm_sentences):
    import kenlm

    opts = options(acoustic_scale=0.5, blank_penalty=5.0, length_penalty=0.7)
    dec = LexiconDecoder(arpa, opts, lexicon)
    x = lm_logits(lexicon, lm_sentences[3], seed=11)
    nbest = dec.decode(x)
    logp = frame_log_probs(x, opts)
    best_path = float(logp.max(axis=1).astype(np.float64).sum())
    ref = kenlm.Model(str(arpa))
    for c in nbest.candidates:
        assert c.total == total_score(c.acoustic, c.ngram, c.n_words, opts)
        assert c.ngram == pytest.approx(ref.score(c.sentence, bos=True, eos=True) * math.log(10), abs=1e-3)
        assert c.acoustic <= best_path + 1e-3
        assert c.llm == 0.0
    # clean logits: the sentence's best alignment is the frame-wise best path
    assert nbest.best == lm_sentences[3]
    assert nbest.candidates[0].acoustic == pytest.approx(best_path, abs=1e-3)
    # flashlight's own search score (log10 LM × ln 10, word score) agrees with the recomputed total
    emissions = np.ascontiguousarray(opts.acoustic_scale * logp, dtype=np.float32)
    raw = dec._decoder.decode(emissions.ctypes.data, len(emissions), emissions.shape[1])
    assert max(r.score for r in raw) == pytest.approx(nbest.candidates[0].total, abs=1e-3)


def test_blank_skipping_drops_frames(arpa, lexicon, lm_sentences):
    opts = options(blank_skip_threshold=0.9)
    x = lm_logits(lexicon, lm_sentences[4], seed=12)
    assert len(frame_log_probs(x, opts)) < len(x)
    assert LexiconDecoder(arpa, opts, lexicon).decode(x).best == lm_sentences[4]


def test_negligible_lm_weight_follows_the_acoustics(arpa, lexicon):
    """With the LM weight effectively zero (huge acoustic scale), decoding is lexicon-constrained
    best-path decoding: word salad the LM dislikes still comes out (homophones aside, which tie
    acoustically and so are still the LM's choice)."""
    salad = "apple green a want i"
    x = lm_logits(lexicon, salad, seed=5)
    # blank penalty 1: the frame-wise best path is then a valid path of the sentence
    opts = options(acoustic_scale=1e4, beam=1e5, blank_penalty=1.0)
    no_lm = LexiconDecoder(arpa, opts, lexicon).decode(x)
    assert no_lm.best == salad
    best = no_lm.candidates[0]
    assert best.acoustic == pytest.approx(float(frame_log_probs(x, opts).max(axis=1).sum()), abs=1e-2)
    assert LexiconDecoder(arpa, OPTS, lexicon).decode(x).best != salad  # the LM does object to it


def _greedy_words(x: np.ndarray, by_pronunciation: dict[tuple[int, ...], str]) -> str:
    """Best path, collapsed, cut at SIL, each piece looked up in the lexicon ("?" if unknown)."""
    path = x.argmax(axis=1)
    tokens = [t for i, t in enumerate(path) if t != 0 and (i == 0 or t != path[i - 1])]
    words, piece = [], []
    for t in tokens:
        if t == 1:  # SIL in LM order
            if piece:
                words.append(by_pronunciation.get(tuple(piece), "?"))
            piece = []
        else:
            piece.append(int(t))
    if piece:
        words.append(by_pronunciation.get(tuple(piece), "?"))
    return " ".join(words)


def test_lm_fixes_confusions_better_than_greedy(decoder, lexicon, lm_sentences):
    lm_index = {c: i for i, c in enumerate(LM_ORDER)}
    by_pron = {tuple(lm_index[PHONEME_TO_ID[p]] for p in pron): w
               for w in decoder.vocabulary for pron in lexicon.pronunciations[w]}
    refs = lm_sentences[30:60]
    logits = [lm_logits(lexicon, s, seed=100 + i, confusion=0.12) for i, s in enumerate(refs)]
    greedy = [_greedy_words(x, by_pron) for x in logits]
    decoded = [decoder.decode(x).best for x in logits]
    wer_greedy, wer_lm = jiwer.wer(refs, greedy), jiwer.wer(refs, decoded)
    assert wer_lm < 0.5 * wer_greedy
    assert wer_lm < 0.15


@pytest.mark.parametrize("bad, message", [
    (np.zeros((10, 40), np.float32), "shape"),
    (np.zeros(41, np.float32), "shape"),
    (np.zeros((0, 41), np.float32), "no frames"),
    (np.zeros((10, 41), np.float64), "float32"),
    (np.full((10, 41), np.nan, np.float32), "non-finite"),
    ([[0.0] * 41], "numpy array"),
])
def test_bad_logits_are_rejected(decoder, bad, message):
    with pytest.raises(DecodeInputError, match=message):
        decoder.decode(bad)


def test_missing_or_broken_lm_is_a_clear_error(tmp_path, lexicon):
    missing = tmp_path / "lm.bin"
    with pytest.raises(B2txtError, match=f"{missing}: KenLM model not found"):
        LexiconDecoder(missing, OPTS, lexicon)
    broken = tmp_path / "lm.arpa"
    broken.write_text("this is not an ARPA file\n")
    with pytest.raises(B2txtError, match=f"{broken}: not a readable KenLM model"):
        LexiconDecoder(broken, OPTS, lexicon)


def test_words_restrict_the_vocabulary(arpa, lexicon):
    words = ["i", "want", "to", "tickets", "nonexistentword", "zebra"]  # zebra: not in the LM
    dec = LexiconDecoder(arpa, OPTS, lexicon, words=words)
    assert set(dec.vocabulary) == {"i", "want", "to", "tickets"}
    assert dec.search.not_in_lexicon == 1 and dec.search.not_in_lm == 1
    assert dec.decode(lm_logits(lexicon, "i want two tickets", seed=2)).best == "i want to tickets"
    with pytest.raises(B2txtError, match="none of the 1 lexicon words is in the LM vocabulary"):
        LexiconDecoder(arpa, OPTS, lexicon, words=["zebra"])


def test_more_than_six_homophones(tmp_path):
    """flashlight keeps 6 words per trie node: the likeliest 6 are kept, the rest reported."""
    names = [f"kat{k}" for k in range(8)]  # kat7 the most frequent, kat0 the least
    lexicon = Lexicon({**{w: [("K", "AE", "T")] for w in names},
                       "runs": [("R", "AH", "N", "Z")], "kat0": [("K", "AE", "T"), ("K", "AA", "T")]})
    sentences = [f"{w} runs" for k, w in enumerate(names) for _ in range(k + 1)]
    arpa = write_arpa(tmp_path / "homophones.arpa", sentences, order=2)
    with pytest.warns(LexiconHomophoneWarning, match=r"2 pronunciation\(s\).*1 word\(s\) cannot be decoded"):
        dec = LexiconDecoder(arpa, OPTS, lexicon)
    assert MAX_HOMOPHONES == 6
    assert sorted(dec.dropped_homophones) == [("kat0", ("K", "AE", "T")), ("kat1", ("K", "AE", "T"))]
    assert dec.search.lost_words == ("kat1",)  # kat0 keeps its other pronunciation
    assert set(dec.vocabulary) == set(names) - {"kat1"} | {"runs"}
    k, ae, t, aa = (PHONEME_TO_ID[p] for p in ("K", "AE", "T", "AA"))
    r, ah, n, z = (PHONEME_TO_ID[p] for p in ("R", "AH", "N", "Z"))
    nbest = dec.decode(ids_logits([k, ae, t, SIL_ID, r, ah, n, z, SIL_ID]))
    assert nbest.best == "kat7 runs"
    assert {c.sentence for c in nbest.candidates} <= {f"{w} runs" for w in names if w != "kat1"}
    assert dec.decode(ids_logits([k, aa, t, SIL_ID, r, ah, n, z, SIL_ID])).best == "kat0 runs"


def test_full_lexicon_build_and_speed(tmp_path, lexicon, lm_sentences):
    """The 125k-word CMU lexicon in the trie (~1.3 s, ~200 MB), built once per process."""
    arpa = write_arpa(tmp_path / "full.arpa", lm_sentences, order=3, extra_words=list(lexicon.pronunciations))
    t0 = time.perf_counter()
    with pytest.warns(LexiconHomophoneWarning):
        search = build_search(arpa, lexicon)
    assert time.perf_counter() - t0 < 20
    assert len(search.words) > 120_000 and search.n_pronunciations > 130_000
    assert 0 < len(search.dropped_homophones) < 300
    dec = LexiconDecoder(arpa, OPTS, lexicon)
    assert dec.search is search
    for i, sentence in enumerate(lm_sentences[:3]):
        assert dec.decode(lm_logits(lexicon, sentence, seed=i)).best == sentence


def _build_binary_tool() -> Path | None:
    import shutil

    found = shutil.which("build_binary")
    default = Path.home() / ".cache" / "b2txt" / "kenlm" / "bin" / "build_binary"
    return Path(found) if found else default if default.is_file() else None


def test_kenlm_binary_gives_the_same_nbest(arpa, decoder, lexicon, lm_sentences, tmp_path):
    tool = _build_binary_tool()
    if tool is None:
        pytest.skip("KenLM build_binary not built (scripts/build_kenlm.sh)")
    binary = tmp_path / "lm.bin"
    subprocess.run([str(tool), "-S", "10%", "-T", str(tmp_path), str(arpa), str(binary)],
                   check=True, capture_output=True)
    x = lm_logits(lexicon, lm_sentences[22], seed=9, confusion=0.15)
    expected = decoder.decode(x)
    got = LexiconDecoder(binary, OPTS, lexicon).decode(x)
    assert [c.sentence for c in got.candidates] == [c.sentence for c in expected.candidates]
    assert [c.total for c in got.candidates] == pytest.approx([c.total for c in expected.candidates], abs=1e-3)


def test_streaming_chunks_equal_one_pass(decoder, lexicon, lm_sentences):
    """decode_step per chunk (the LM server's partials) searches as one step over all frames;
    after the last chunk the best hypothesis is the decoded sentence; streams are independent."""
    for i, sentence in enumerate(lm_sentences[:4]):
        x = lm_logits(lexicon, sentence, seed=i)
        stream, other = decoder.stream(), decoder.stream()
        other.advance(x[:11])  # another trial in between must not disturb this one
        partials = [stream.advance(x[a:a + 9]) for a in range(0, len(x), 9)]
        assert partials[-1] == decoder.stream().advance(x) == decoder.decode(x).best == sentence
        assert partials[0] != partials[-1]
        assert other.advance(x[11:]) == sentence
