"""The 41-class inventory, language-model column order, text normalisation and the lexicon."""

from __future__ import annotations

import re

import numpy as np
import pytest

from b2txt.ground import phonemes as ph
from b2txt.ground.errors import B2txtError, UnknownWordsError
from b2txt.ground.phonemes import Lexicon, normalize_text

# REFERENCE §2, verbatim order of classes 1..39.
REFERENCE_PHONEMES = (
    "AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M "
    "N NG OW OY P R S SH T TH UH UW V W Y Z ZH"
).split()


# ----------------------------------------------------------------------------- inventory

def test_inventory_has_41_classes_blank_first_sil_last():
    assert ph.N_CLASSES == 41 == len(ph.CLASSES)
    assert ph.BLANK_ID == 0 and ph.CLASSES[0] == ph.BLANK
    assert ph.SIL_ID == 40 and ph.CLASSES[40] == "SIL" == ph.SIL


def test_phoneme_order_matches_reference():
    assert len(REFERENCE_PHONEMES) == 39
    assert list(ph.PHONEMES) == REFERENCE_PHONEMES
    assert list(ph.CLASSES[1:40]) == REFERENCE_PHONEMES
    assert len(set(ph.CLASSES)) == 41  # no duplicates


def test_phoneme_to_id_is_the_inverse_of_classes():
    assert len(ph.PHONEME_TO_ID) == 41
    for i, name in enumerate(ph.CLASSES):
        assert ph.PHONEME_TO_ID[name] == i
    assert ph.PHONEME_TO_ID["AA"] == 1 and ph.PHONEME_TO_ID["ZH"] == 39 and ph.PHONEME_TO_ID["SIL"] == 40


def test_class_names_and_display_string():
    ids = [ph.PHONEME_TO_ID[p] for p in ("HH", "AH", "L", "OW", "SIL")]
    assert [ph.CLASSES[i] for i in ids] == ["HH", "AH", "L", "OW", "SIL"]
    assert ph.ids_to_string([0, *ids, 0, 0]) == "HH AH L OW |"  # blanks are skipped, SIL shows as |
    assert ph.ids_to_string([]) == ""


# ----------------------------------------------------------------------------- LM order

def test_lm_order_moves_sil_column_to_position_1():
    x = np.tile(np.arange(41, dtype=np.float32), (5, 1))  # column value == model class id
    y = ph.to_lm_order(x)
    assert y.shape == (5, 41)
    assert (y[:, 0] == 0).all()  # blank stays first
    assert (y[:, 1] == 40).all()  # SIL moved to position 1
    assert (y[:, 2:] == np.arange(1, 40)).all()  # AA..ZH shifted right by one, order kept
    assert list(ph.LM_ORDER) == [0, 40, *range(1, 40)]


def test_lm_order_round_trip_and_leading_dims():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 41)).astype(np.float32)
    x_copy = x.copy()
    y = ph.to_lm_order(x)
    assert y.shape == x.shape
    np.testing.assert_array_equal(ph.from_lm_order(y), x)
    np.testing.assert_array_equal(ph.to_lm_order(ph.from_lm_order(x)), x)
    np.testing.assert_array_equal(x, x_copy)  # input untouched
    np.testing.assert_array_equal(y[..., 1], x[..., 40])
    np.testing.assert_array_equal(y[..., 2:], x[..., 1:40])


def test_from_lm_order_moves_position_1_back_to_last():
    lm = np.arange(41)  # position in LM order
    model = ph.from_lm_order(lm)
    assert model[40] == 1 and model[0] == 0 and list(model[1:40]) == list(range(2, 41))


@pytest.mark.parametrize("fn", [ph.to_lm_order, ph.from_lm_order])
@pytest.mark.parametrize("width", [40, 42])
def test_lm_order_rejects_wrong_width(fn, width):
    with pytest.raises(ValueError, match="41"):
        fn(np.zeros((3, width)))


# ----------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw, expected", [
    ("Hello World", "hello world"),
    ("Hello, world! How are you?", "hello world how are you"),
    ('He said: "stop; now."', "he said stop now"),
    ("U.S.", "us"),  # punctuation is deleted, not turned into a space
    ("Don't stop", "don't stop"),  # apostrophes kept
    ("the dog's bone", "the dog's bone"),
    ("rock'n'roll", "rock'n'roll"),
    ("a well-known x-ray", "a well-known x-ray"),  # hyphens inside words kept
    ("-start end-", "start end"),  # edge hyphens dropped
    ("--hello-- world-", "hello world"),
    ("wait--what", "wait what"),  # -- is a word break
    ("well -- maybe", "well maybe"),  # a lone -- token disappears
    ("a - b", "a b"),  # a lone hyphen disappears
    ("  many   spaces\tand\ttabs\nand newlines  ", "many spaces and tabs and newlines"),
    ("MiXeD CaSe", "mixed case"),
    ("3 cats and 42 dogs", "cats and dogs"),  # digits are not letters
    ("", ""),
    ("...!?", ""),
    ("''", ""),  # a token of apostrophes only is not a word
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_text_is_idempotent_and_has_only_allowed_characters():
    samples = ["Hello, World!", "It's -- a well-known fact.", " Tabs\tand\nlines ", "A-B-C -x- y--z"]
    for s in samples:
        once = normalize_text(s)
        assert normalize_text(once) == once
        assert re.fullmatch(r"[a-z'\- ]*", once), once
        assert "  " not in once and once == once.strip()
        for word in once.split():
            assert not word.startswith("-") and not word.endswith("-")


# ----------------------------------------------------------------------------- lexicon

def test_strip_stress():
    assert ph.strip_stress("AH0") == "AH"
    assert ph.strip_stress("AW1") == "AW"
    assert ph.strip_stress("ER2") == "ER"
    assert ph.strip_stress("B") == "B"


def test_cmudict_lexicon_has_no_stress_digits_and_only_known_phonemes(lexicon):
    assert len(lexicon) > 100_000
    valid = set(ph.PHONEMES)
    for word, variants in lexicon.pronunciations.items():
        assert variants, word
        assert len(set(variants)) == len(variants), f"{word}: duplicate variants {variants}"
        for variant in variants:
            assert variant and set(variant) <= valid, (word, variant)


def test_cmudict_lexicon_examples(lexicon):
    assert lexicon.pronounce("about") == ("AH", "B", "AW", "T")  # cmudict: AH0 B AW1 T
    assert lexicon.pronounce("hello") == ("HH", "AH", "L", "OW")
    # "the" is DH AH0 / DH AH1 / DH IY0 in cmudict: the first two merge once stress is removed.
    assert lexicon.pronunciations["the"] == [("DH", "AH"), ("DH", "IY")]
    assert "don't" in lexicon and "hello" in lexicon and "zzqxv" not in lexicon


def test_lexicon_from_cmudict_is_cached(lexicon):
    assert Lexicon.from_cmudict() is lexicon


def test_sentence_phonemes_puts_sil_after_every_word(lexicon):
    sentence = "the cat sat on the mat"
    out = lexicon.sentence_phonemes(sentence)
    assert out[-1] == "SIL"
    assert out.count("SIL") == len(sentence.split())
    expected = []
    for word in sentence.split():
        expected += [*lexicon.pronounce(word), "SIL"]
    assert out == expected


def test_sentence_phonemes_normalises_the_text(lexicon):
    assert lexicon.sentence_phonemes("Hello,  WORLD!") == lexicon.sentence_phonemes("hello world")
    assert lexicon.sentence_phonemes("Don't") == ["D", "OW", "N", "T", "SIL"]
    assert lexicon.sentence_phonemes("") == []


def test_sentence_ids_are_class_ids_1_to_40(lexicon):
    ids = lexicon.sentence_ids("we went home early")
    assert all(1 <= i <= 40 for i in ids)
    assert ids[-1] == ph.SIL_ID
    assert [ph.CLASSES[i] for i in ids] == lexicon.sentence_phonemes("we went home early")
    assert ids.count(ph.SIL_ID) == 4


def test_small_lexicon_uses_first_pronunciation():
    lex = Lexicon({"go": [("G", "OW")], "read": [("R", "IY", "D"), ("R", "EH", "D")]})
    assert lex.sentence_phonemes("read go") == ["R", "IY", "D", "SIL", "G", "OW", "SIL"]
    assert lex.sentence_ids("go") == [ph.PHONEME_TO_ID["G"], ph.PHONEME_TO_ID["OW"], 40]
    assert len(lex) == 2 and "go" in lex and "went" not in lex


def test_unknown_words_error_lists_all_unknown_words_sorted_and_deduplicated(lexicon):
    with pytest.raises(UnknownWordsError) as exc:
        lexicon.sentence_phonemes("Zzqxv the blorfle zzqxv cat aaqqz blorfle", context="corpus line 7")
    err = exc.value
    assert err.words == ["aaqqz", "blorfle", "zzqxv"]
    msg = str(err)
    assert "3 word(s)" in msg and "corpus line 7" in msg
    assert msg.index("aaqqz") < msg.index("blorfle") < msg.index("zzqxv")
    assert msg.count("zzqxv") == 1 and msg.count("blorfle") == 1
    assert isinstance(err, B2txtError)  # the CLI turns it into a clean message


def test_unknown_words_helpers(lexicon):
    assert lexicon.unknown_words(["the", "zzqxv", "zzqxv", "aaqqz"]) == ["aaqqz", "zzqxv"]
    assert lexicon.unknown_words(["the", "cat"]) == []
    with pytest.raises(UnknownWordsError) as exc:
        lexicon.pronounce("zzqxv")
    assert exc.value.words == ["zzqxv"]
    with pytest.raises(UnknownWordsError):
        lexicon.sentence_ids("the zzqxv")


def test_unknown_words_error_message_is_capped():
    err = UnknownWordsError([f"w{i:03d}" for i in range(45)] + ["w000"])
    assert len(err.words) == 45
    msg = str(err)
    assert msg.startswith("45 word(s)") and "w039" in msg and "w040" not in msg and msg.endswith(" ...")
