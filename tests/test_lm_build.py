"""Building the language models: LM text, KenLM tools, ARPA/binary n-grams, the TLG graph, and
bringing your own ARPA (``lm.source: arpa``) or SRILM's (``lm.tool: srilm``).

Everything runs for real on small data made here (fortune sentences, sentences written in the
test, a Dryad-layout directory written with the project's own writer). KenLM's tools are built
once into the default cache by ``scripts/build_kenlm.sh`` (about a minute the first time,
instant afterwards).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import kaldifst
import kenlm
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.arpa import HAND_ARPA, HAND_SENTENCES
from helpers.data import SENTENCES
from helpers.synthetic import phoneme_logits

from b2txt.cli import main
from b2txt.data.logits import write_logits
from b2txt.ground.config import load_config
from b2txt.ground.errors import B2txtError
from b2txt.ground.fileio import OWNER_MARK
from b2txt.ground.phonemes import N_CLASSES
from b2txt.lm import graph as graph_mod
from b2txt.lm.arpa import ArpaError, normalise_arpa
from b2txt.lm.graph import GraphError, build_graph, build_graph_from_arpa, read_fst, read_words
from b2txt.lm.ngram import (
    PLACEHOLDER,
    ToolError,
    build_binary,
    build_ngram,
    check_prune,
    estimate_arpa,
    find_tool,
    read_arpa_counts,
)
from b2txt.lm.text import UNK, build_lm_text, evaluation_sentences, prepare_text, read_stats
from b2txt.workflow import _fill, lm_dir, lm_stages

REPO = Path(__file__).resolve().parents[1]
FORTUNES = "/usr/share/games/fortunes"
MEM = "5%"  # lmplz -S: keep the tests light on a shared machine


@pytest.fixture(scope="module")
def ngram_dirs(tmp_path_factory, kenlm_dir, lexicon, fortune_sentences) -> Path:
    """text.txt + 1gram/ and 3gram/ (pruned, with its unpruned twin): lm.arpa, lm.bin."""
    out = tmp_path_factory.mktemp("lm")
    prepare_text(out / "text.txt", fortune_sentences, lexicon, add_lexicon_words=False)
    build_ngram(out / "text.txt", out / "1gram", 1, memory=MEM, kenlm_dir=kenlm_dir)
    build_ngram(out / "text.txt", out / "3gram", 3, prune=[0, 0, 1], memory=MEM, kenlm_dir=kenlm_dir)
    return out


# ----------------------------------------------------------------------------- LM text

def test_text_excludes_evaluation_sentences_and_maps_oov_to_unk(tmp_path, make_trial_file, lexicon):
    val = make_trial_file("val", n_trials=3, seed=0)  # labels SENTENCES[0..2]
    make_trial_file("test", n_trials=2, seed=5)  # no labels: nothing to exclude
    make_trial_file("train", n_trials=2, seed=7)  # train labels stay in the LM text
    data_root = val.parents[2]
    source = tmp_path / "user.txt"
    source.write_text(
        "The cat sat on the MAT!  I like green apples.\n"  # two eval sentences, other case/punct.
        "We went home early\n"  # eval sentence without final punctuation
        "The zzyzxq flew over the qwrtplk. The dog barks.\n"  # 2 OOV tokens
        "In 1984 it rained.\n"  # digits: dropped
        "the car is red\n" "the car is red\n")  # not an evaluation label; duplicates are kept
    out = tmp_path / "lm" / "text.txt"
    stats = build_lm_text(out, lexicon, text_file=source, data_dir=data_root,
                          exclude_splits=["val", "test"], add_lexicon_words=False)
    lines = out.read_text().splitlines()
    assert stats.eval_sentences == 3
    assert stats.excluded_sentences == 3 and stats.excluded_distinct == 3
    assert not {"the cat sat on the mat", "i like green apples", "we went home early"} & set(lines)
    assert f"the {UNK} flew over the {UNK}" in lines and "the dog barks" in lines
    assert lines.count("the car is red") == 2
    assert stats.dropped_digits == 1
    assert stats.sentences == len(lines) == 4
    assert stats.oov_tokens == 2 and stats.oov_types == 2
    assert stats.tokens == sum(len(ln.split()) for ln in lines)
    assert math.isclose(stats.oov_rate, 2 / stats.tokens)
    saved = json.loads((out.parent / "text.json").read_text())
    assert saved["excluded_sentences"] == 3 and read_stats(out.parent / "text.json") == stats


def test_evaluation_sentences_reads_labels_of_the_given_splits(tmp_path, make_trial_file):
    val = make_trial_file("val", n_trials=2, seed=3)
    make_trial_file("train", n_trials=2, seed=10)
    root = val.parents[2]
    assert evaluation_sentences(root, ["val"]) == {SENTENCES[3], SENTENCES[4]}
    assert evaluation_sentences(root, ["test"]) == set()
    assert evaluation_sentences(root, ["train", "val"]) >= {SENTENCES[10], SENTENCES[11]}


def test_text_from_fortunes_appends_every_lexicon_word(tmp_path, lexicon):
    stats = build_lm_text(tmp_path / "t.txt", lexicon, source_dir=FORTUNES, source_files=["fortunes"],
                          exclude_splits=[], add_lexicon_words=True)
    lines = (tmp_path / "t.txt").read_text().splitlines()
    assert stats.sentences > 400 and stats.lexicon_words_added == len(lexicon)
    assert len(lines) == stats.sentences + len(lexicon)
    assert set(lines[stats.sentences:]) == set(lexicon.pronunciations)
    assert all(w == UNK or w in lexicon for ln in lines[:stats.sentences] for w in ln.split())


def test_text_errors_name_the_file_and_leave_nothing(tmp_path, lexicon):
    with pytest.raises(B2txtError, match="missing.txt: LM text file not found"):
        build_lm_text(tmp_path / "o.txt", lexicon, text_file=tmp_path / "missing.txt", exclude_splits=[])
    src = tmp_path / "s.txt"
    src.write_text("hello there\n")
    with pytest.raises(B2txtError, match="nowhere.*exclude_splits"):
        build_lm_text(tmp_path / "o.txt", lexicon, text_file=src, data_dir=tmp_path / "nowhere")
    only_digits = tmp_path / "d.txt"
    only_digits.write_text("42 is 6 times 7\n")
    with pytest.raises(B2txtError, match="no sentences left"):
        build_lm_text(tmp_path / "o.txt", lexicon, text_file=only_digits, exclude_splits=[])
    assert not (tmp_path / "o.txt").exists() and not list(tmp_path.glob(".o.txt*"))


# ----------------------------------------------------------------------------- KenLM tools

def test_build_kenlm_script_is_idempotent_and_tools_run(kenlm_dir):
    lmplz, bb = kenlm_dir / "bin" / "lmplz", kenlm_dir / "bin" / "build_binary"
    before = (lmplz.stat().st_mtime_ns, bb.stat().st_mtime_ns)
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(REPO / "scripts/build_kenlm.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and time.perf_counter() - t0 < 5
    assert (lmplz.stat().st_mtime_ns, bb.stat().st_mtime_ns) == before
    assert find_tool("lmplz", kenlm_dir) == lmplz and find_tool("build_binary", kenlm_dir) == bb
    usage = subprocess.run([str(bb)], capture_output=True, text=True)
    assert "usage" in (usage.stdout + usage.stderr).lower()


def test_missing_tools_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(ToolError, match=r"lmplz.*scripts/build_kenlm.sh"):
        find_tool("lmplz", tmp_path / "no-kenlm")
    text = tmp_path / "t.txt"
    text.write_text("a b c\n")
    with pytest.raises(ToolError, match="build_kenlm.sh"):
        estimate_arpa(text, tmp_path / "o.arpa", 2, kenlm_dir=tmp_path / "no-kenlm")
    with pytest.raises(ToolError, match="ngram-count.*not on PATH"):
        estimate_arpa(text, tmp_path / "o.arpa", 2, tool="srilm")
    assert not (tmp_path / "o.arpa").exists()


def test_prune_thresholds_are_checked():
    assert check_prune(3, [0, 0, 0]) is None and check_prune(3, [0, 1, 1]) == [0, 1, 1]
    with pytest.raises(B2txtError, match="unigrams cannot be pruned"):
        check_prune(2, [1, 1])
    with pytest.raises(B2txtError, match="must not decrease"):
        check_prune(3, [0, 2, 1])
    with pytest.raises(B2txtError, match="needs 3 thresholds"):
        check_prune(3, [0, 1])


def test_lmplz_failure_shows_its_stderr_and_leaves_no_arpa(tmp_path, kenlm_dir):
    bad = tmp_path / "bad.txt"
    bad.write_text("<s> is not allowed in lmplz text\n")
    with pytest.raises(ToolError, match=r"(?s)lmplz failed on .*bad.txt.*<s>"):
        estimate_arpa(bad, tmp_path / "bad.arpa", 2, memory=MEM, kenlm_dir=kenlm_dir)
    assert not (tmp_path / "bad.arpa").exists() and not list(tmp_path.glob(".bad.arpa*"))


# ----------------------------------------------------------------------------- n-grams

def test_arpa_orders_pruning_and_unk(ngram_dirs):
    c1 = read_arpa_counts(ngram_dirs / "1gram/lm.arpa")
    c3 = read_arpa_counts(ngram_dirs / "3gram/lm.arpa")
    full = read_arpa_counts(ngram_dirs / "3gram/lm.unpruned.arpa")
    assert list(c1) == [1] and list(c3) == [1, 2, 3]
    assert c3[1] == full[1] == c1[1] and c3[3] < full[3]  # pruning removed singleton trigrams
    for name in ("1gram/lm.arpa", "3gram/lm.arpa"):
        text = (ngram_dirs / name).read_text()
        assert PLACEHOLDER not in text
        unigrams = text.split("\\1-grams:")[1].split("\\")[0].split("\n")
        assert sum(1 for ln in unigrams if ln.split("\t")[1:2] == [UNK]) == 1
    assert not (ngram_dirs / "1gram/lm.unpruned.arpa").exists()


def test_text_with_unk_estimates_and_keeps_its_mass(tmp_path, kenlm_dir):
    text = tmp_path / "t.txt"
    text.write_text("the <unk> sat\n" * 5 + "the cat sat\n")
    arpa = estimate_arpa(text, tmp_path / "u.arpa", 2, memory=MEM, kenlm_dir=kenlm_dir)
    model = kenlm.Model(str(arpa))
    # <unk> was seen 5 times: an unknown word is far likelier than lmplz's default <unk> mass
    assert model.score("the qwzx sat", bos=True, eos=True) > model.score("the cat sat", bos=True, eos=True) - 2


def test_binaries_load_and_score_like_their_arpa(ngram_dirs):
    three_arpa = kenlm.Model(str(ngram_dirs / "3gram/lm.arpa"))
    three_bin = kenlm.Model(str(ngram_dirs / "3gram/lm.bin"))
    # KenLM cannot load a unigram ARPA ("assumes at least a bigram model"): its .bin is an
    # equivalent bigram model without bigrams, so it scores the sum of the unigram log-probs
    unigram = {}
    for line in (ngram_dirs / "1gram/lm.arpa").read_text().split("\\1-grams:")[1].split("\\")[0].splitlines():
        if line.strip():
            prob, word = line.split("\t")[:2]
            unigram[word] = float(prob)
    one_bin = kenlm.Model(str(ngram_dirs / "1gram/lm.bin"))
    for s in SENTENCES[:5]:
        assert three_bin.score(s) == pytest.approx(three_arpa.score(s), abs=1e-4)
        expected = sum(unigram[w] for w in s.split()) + unigram["</s>"]
        assert one_bin.score(s) == pytest.approx(expected, abs=1e-4)


def test_bad_arpa_is_a_clear_error(tmp_path, lexicon, kenlm_dir):
    bad = tmp_path / "bad.arpa"
    bad.write_text("this is not a language model\n")
    with pytest.raises(B2txtError, match="bad.arpa: not an ARPA"):
        read_arpa_counts(bad)
    with pytest.raises(B2txtError, match="bad.arpa: not an ARPA"):
        build_graph(bad, tmp_path / "g", lexicon)
    with pytest.raises(B2txtError, match="bad.arpa: not an ARPA"):
        build_binary(bad, tmp_path / "bad.bin", kenlm_dir=kenlm_dir)
    with pytest.raises(B2txtError, match="missing.arpa: ARPA file not found"):
        read_arpa_counts(tmp_path / "missing.arpa")
    assert not (tmp_path / "g").exists()


# ----------------------------------------------------------------------------- graphs

@pytest.fixture(scope="module")
def graph3(ngram_dirs, lexicon) -> Path:
    out = ngram_dirs / "3gram"
    build_graph_from_arpa(out / "lm.arpa", out, lexicon)  # beside lm.arpa, lm.unpruned.arpa, lm.bin
    return out


def test_graph_directory_follows_the_published_layout(graph3, lexicon):
    assert {p.name for p in graph3.iterdir()} == {"TLG.fst", "words.txt", "tokens.txt", "G.fst",
                                                  "G_no_prune.fst", "graph.json", "lm.arpa", "lm.bin",
                                                  "lm.unpruned.arpa", OWNER_MARK}
    words = read_words(graph3 / "words.txt")
    assert words[0] == "<eps>" and words[-3:] == ["#0", "<s>", "</s>"]
    assert len(words) == len(lexicon) + 4 and words[1:-3] == sorted(words[1:-3])
    assert "CAT" in words and all(w == w.upper() for w in words[1:-3])
    tokens = dict(line.split() for line in (graph3 / "tokens.txt").read_text().splitlines())
    assert (tokens["<eps>"], tokens["<blk>"], tokens["SIL"], tokens["AA"], tokens["ZH"], tokens["#0"]) ==\
        ("0", "1", "2", "3", "41", "42")
    info = json.loads((graph3 / "graph.json").read_text())
    assert info["skipped_words"] == 1 and info["skipped_examples"] == [UNK]
    assert info["graph_words"] == read_arpa_counts(graph3 / "lm.arpa")[1] - 3  # <s> </s> <unk>


def test_tlg_labels_and_openfst_round_trip(graph3, tmp_path):
    tlg = read_fst(graph3 / "TLG.fst")
    n_words = len(read_words(graph3 / "words.txt"))
    ilabels, olabels, n_arcs = set(), set(), 0
    for s in kaldifst.StateIterator(tlg):
        for arc in kaldifst.ArcIterator(tlg, s):
            ilabels.add(arc.ilabel)
            olabels.add(arc.olabel)
            n_arcs += 1
    assert ilabels <= set(range(N_CLASSES + 1)) and 1 in ilabels  # LM column + 1; blank = 1
    assert max(olabels) < n_words - 3  # words only: no #0, <s>, </s>
    assert tlg.write(str(tmp_path / "copy.fst"))
    again = read_fst(tmp_path / "copy.fst")
    assert again.num_states == tlg.num_states and again.to_str() == tlg.to_str()
    assert n_arcs == json.loads((graph3 / "graph.json").read_text())["tlg_arcs"]


def test_unreadable_graph_files_are_clear_errors(tmp_path):
    (tmp_path / "TLG.fst").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(GraphError, match="TLG.fst: cannot read"):
        read_fst(tmp_path / "TLG.fst")
    with pytest.raises(GraphError, match="nothere.fst: FST not found"):
        read_fst(tmp_path / "nothere.fst")
    (tmp_path / "words.txt").write_text("hello\n")
    with pytest.raises(GraphError, match="words.txt: not a word table"):
        read_words(tmp_path / "words.txt")


def test_unpronounceable_arpa_words_are_skipped_or_refused(tmp_path, lexicon):
    def arpa(words: list[str]) -> Path:
        path = tmp_path / f"{len(words)}.arpa"
        lines = ["\\data\\", f"ngram 1={len(words) + 3}", "", "\\1-grams:", "-1.0\t<unk>", "-99\t<s>",
                 "-1.0\t</s>", *(f"-1.5\t{w}" for w in words), "", "\\end\\", ""]
        path.write_text("\n".join(lines))
        return path

    stats = build_graph(arpa(["cat", "dog", "Sat", "qqxyz"]), tmp_path / "g1", lexicon)
    assert stats.graph_words == 3 and stats.skipped_words == 2 and "qqxyz" in stats.skipped_examples
    with pytest.raises(GraphError, match=r"3 of 4 words have no pronunciation.*qqxyz"):
        build_graph(arpa(["cat", "qqxyz", "zzqrt", "xxkcd"]), tmp_path / "g2", lexicon)
    assert not (tmp_path / "g2").exists()


def test_one_gram_graph_and_free_silence_costs(ngram_dirs, lexicon):
    stats = build_graph_from_arpa(ngram_dirs / "1gram" / "lm.arpa", ngram_dirs / "1gram", lexicon)
    assert stats.order == 1 and stats.tlg_states > 0 and stats.sil_prob is None
    assert not (ngram_dirs / "1gram" / "G_no_prune.fst").exists() and (ngram_dirs / "1gram" / "lm.bin").exists()
    with pytest.raises(GraphError, match="sil_prob"):
        graph_mod.lexicon_fst([(1, ("K", "AE", "T"))], [0], 0, 2, sil_prob=1.0)


def test_disambiguation_marks_homophones_and_prefixes():
    prons = [("to", ("T", "UW")), ("two", ("T", "UW")), ("tool", ("T", "UW", "L")), ("cat", ("K", "AE", "T"))]
    marks, top = graph_mod.disambiguate(prons)
    assert marks == [1, 2, 0, 0] and top == 2


# ----------------------------------------------------------------------------- your own ARPA, SRILM

def _line(text: str, marker: str) -> int:
    """The line number of the first line of ``text`` holding ``marker``."""
    return text[:text.index(marker)].count("\n") + 1


def test_imported_arpa_is_lower_case_and_otherwise_as_written(tmp_path):
    (tmp_path / "published.arpa").write_text(HAND_ARPA)
    (tmp_path / "published.arpa.gz").write_bytes(gzip.compress(HAND_ARPA.encode()))
    plain, packed = io.StringIO(), io.StringIO()
    assert normalise_arpa(tmp_path / "published.arpa", plain) == ({1: 12, 2: 17}, 9)
    assert normalise_arpa(tmp_path / "published.arpa.gz", packed) == ({1: 12, 2: 17}, 9)
    text = plain.getvalue()
    assert text == packed.getvalue() and text == text.lower()
    assert "-1.0\ti\t-0.30103\n" in text and "-0.1\ttoday </s>\n" in text and "-99\t<s>\t-0.30103\n" in text
    assert text.startswith("\\data\\\nngram 1=12\nngram 2=17\n\n\\1-grams:\n") and text.endswith("\n\\end\\\n")


#: Broken ARPA files: (the file's bytes, the error's text after "<file>: line <n>: ", the marker of that line).
BAD_ARPAS = {
    "not-arpa": (b"this is not a language model\n", "not an ARPA language model: expected the \\data\\ header",
                 "this is"),
    "no-data-header": (HAND_ARPA.replace("\\data\\\n", "").encode(),
                       "not an ARPA language model: expected the \\data\\ header, found 'ngram 1=12'", "ngram 1="),
    "truncated": (HAND_ARPA[:HAND_ARPA.index("-0.5\tTHE DOG")].encode(), "the file ends inside the 2-grams section",
                  "THE CAT"),
    "short-section": (HAND_ARPA.replace("-0.6\tCAT TODAY\n", "").encode(),
                      "the 2-grams section ends after 16 entries; the header declares 17", "\\end\\"),
    "bad-number": (HAND_ARPA.replace("-1.2\tDOG", "-1.2e\tDOG").encode(), "not a number", "DOG\t"),
    "missing-word": (HAND_ARPA.replace("-0.5\tTHE DOG", "-0.5\tDOG").encode(), "a 2-gram entry is a log10 probability",
                     "-0.5\tDOG"),
    "case-clash": (HAND_ARPA.replace("ngram 1=12", "ngram 1=13").replace("-1.4\tTODAY\t-0.30103\n",
                                                                       "-1.4\tTODAY\t-0.30103\n-1.5\tToday\t0\n").encode(),
                   "'TODAY' and 'Today' are one word in lower case", "Today"),
    "not-utf8": (b"\\data\\\nngram 1=1\n\n\\1-grams:\n-1\tcaf\xe9\n", "not UTF-8 text", "-1\t"),
}


@pytest.mark.parametrize("name", list(BAD_ARPAS))
def test_a_bad_arpa_is_one_error_naming_file_and_line(tmp_path, name):
    content, message, marker = BAD_ARPAS[name]
    path = tmp_path / f"{name}.arpa"
    path.write_bytes(content)
    line = content[:content.index(marker.encode())].count(b"\n") + 1
    with pytest.raises(ArpaError) as err:
        normalise_arpa(path, io.StringIO())
    assert str(err.value).startswith(f"{path}: line {line}: {message}"), str(err.value)


def test_empty_and_damaged_compressed_arpas_are_clear_errors(tmp_path):
    (tmp_path / "empty.arpa").write_text("")
    with pytest.raises(ArpaError, match=r"empty.arpa: not an ARPA language model: the file is empty"):
        normalise_arpa(tmp_path / "empty.arpa", io.StringIO())
    packed = gzip.compress(HAND_ARPA.encode())
    (tmp_path / "cut.arpa.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ArpaError, match=r"cut.arpa.gz: line \d+: cannot read on .*damaged or truncated"):
        normalise_arpa(tmp_path / "cut.arpa.gz", io.StringIO())


def _run_stage(stage, config: Path, value: str | None = None) -> list[Path]:
    """Run one stage of the table as Snakemake and DVC would (its command line, in the working
    directory); returns its declared outputs."""
    cmd = _fill(" ".join(stage.argv(["--config", str(config)])), stage, {}).replace("${item}", value or "")
    if stage.program == "b2txt":
        assert main(shlex.split(cmd)[1:]) == 0, cmd
    else:  # bash scripts/build_kenlm.sh, through a shell as both tools run it (~ in lm.kenlm_dir)
        subprocess.run(cmd.replace("scripts/", f"{REPO}/scripts/"), shell=True, check=True, timeout=1800)
    return [Path(_fill(o.path, stage, {}).replace("${item}", value or "")) for o in stage.outputs.values()]


def _trials(path: Path, lexicon, sentences) -> Path:
    """A logits file (as `b2txt infer` writes it) of clean simulated trials of ``sentences``."""
    rng = np.random.default_rng(0)
    ids = [lexicon.sentence_ids(s) for s in sentences]
    rows = pd.DataFrame({"session": "t15.2023.08.11", "split": "val", "trial": range(len(sentences)), "block_num": 1,
                         "trial_num": range(len(sentences)), "corpus": "Fortunes", "post_implant_day": 25,
                         "sentence": list(sentences)})
    write_logits(path, rows, [phoneme_logits(i, rng, peak=14.0) for i in ids], ids)
    return path


def test_own_upper_case_arpa_becomes_binary_and_graph_and_decodes(tmp_path, monkeypatch, kenlm_dir, lexicon):
    """lm.source arpa: the table's LM stages (kenlm_tools, lm_import, lm_graph) run through the CLI
    on a published-style ARPA make every output they declare, and both decoders read the result."""
    monkeypatch.chdir(tmp_path)
    Path("published.arpa").write_text(HAND_ARPA)
    config = tmp_path / "byo.yaml"
    config.write_text(yaml.safe_dump({"run": "byo", "lm": {"source": "arpa", "arpa": "published.arpa", "memory": MEM,
                                                           "kenlm_dir": str(kenlm_dir)}}))
    cfg = load_config(config)
    table = lm_stages(cfg)
    assert [s.name for s in table] == ["kenlm_tools", "lm_import", "lm_graph"]
    for stage in table:
        assert all(p.is_file() for p in _run_stage(stage, config)), stage.name
    lm = Path(lm_dir(cfg))
    assert lm == Path("results/byo/lm/imported")
    manifest = json.loads(Path("results/byo/lm/kenlm_tools.json").read_text())
    assert set(manifest["sha256"]) == {"lmplz", "build_binary"} and Path(manifest["bin"]) == kenlm_dir / "bin"

    words = read_words(lm / "words.txt")  # the published convention: upper case
    assert {"I", "SEE", "THE", "CAT", "TODAY"} <= set(words) and "cat" not in words
    arpa = (lm / "lm.arpa").read_text()
    assert arpa == arpa.lower() and read_arpa_counts(lm / "lm.arpa") == {1: 12, 2: 17}
    model = kenlm.Model(str(lm / "lm.bin"))  # what the lexicon decoder loads: lower-case words
    assert "cat" in model and "CAT" not in model
    assert model.score("i see the cat") == pytest.approx(-0.35 - 0.3 - 0.1 - 0.5 - 0.2, abs=1e-5)
    assert json.loads((lm / "graph.json").read_text())["graph_words"] == 9

    trials = _trials(tmp_path / "val.hdf5", lexicon, HAND_SENTENCES)
    for decoder in ("wfst", "lexicon"):
        assert main(["decode", "--config", str(config), "--logits", str(trials), "--lm", str(lm),
                     "--out", f"dec-{decoder}", "--decoder", decoder, "--workers", "1"]) == 0
        decoded = pd.read_csv(f"dec-{decoder}/decoded.csv", keep_default_na=False)
        assert decoded["decoded"].tolist() == list(HAND_SENTENCES), decoder


def test_bad_or_missing_arpa_through_the_cli_names_it_and_writes_nothing(tmp_path, kenlm_dir, capsys):
    bad = tmp_path / "lab.arpa"
    bad.write_text(HAND_ARPA[:HAND_ARPA.index("-0.5\tTHE DOG")])  # truncated
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"lm": {"source": "arpa", "arpa": str(bad), "kenlm_dir": str(kenlm_dir)}}))
    out = tmp_path / "imported"
    assert main(["lm", "import", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = _line(HAND_ARPA, "THE CAT")
    assert f"{bad}: line {line}: the file ends inside the 2-grams section" in err and "Traceback" not in err
    assert not out.exists()  # no lm.arpa, no lm.bin, no directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".imported.")]  # nor a temporary one
    assert main(["lm", "import", "--config", str(config), "--arpa", str(tmp_path / "none.arpa"), "--out",
                 str(out)]) == 2
    assert f"{tmp_path / 'none.arpa'}: --arpa: ARPA file not found" in capsys.readouterr().err


#: A stand-in for SRILM's `ngram-count` (SRILM is in no package index: neither PyPI nor Debian has
#: it): it records its arguments and writes, at `-lm FILE`, the hand-made ARPA in lower case.
FAKE_NGRAM_COUNT = """#!{python}
import sys
from pathlib import Path
args = sys.argv[1:]
Path({log!r}).write_text(" ".join(args))
Path(args[args.index("-lm") + 1]).write_text({arpa!r})
"""


def test_srilm_mode_makes_the_outputs_it_declares(tmp_path, monkeypatch, kenlm_dir, capsys):
    """lm.tool srilm: ngram-count writes the ARPA, KenLM's build_binary the binary the stage
    declares; without build_binary the stage stops before estimating and writes nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "ngram-count.args"
    fake = bin_dir / "ngram-count"
    fake.write_text(FAKE_NGRAM_COUNT.format(python=sys.executable, log=str(log), arpa=HAND_ARPA.lower()))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "srilm.yaml"
    lm = {"tool": "srilm", "orders": [2], "decode_order": 2, "memory": MEM, "kenlm_dir": str(kenlm_dir)}
    config.write_text(yaml.safe_dump({"run": "srilm", "lm": lm}))
    table = {s.name: s for s in lm_stages(load_config(config))}
    assert list(table) == ["kenlm_tools", "lm_text", "lm_ngram", "lm_graph"]
    Path("results/srilm/lm").mkdir(parents=True)
    Path("results/srilm/lm/text.txt").write_text("\n".join(HAND_SENTENCES) + "\n")  # what lm_text writes
    for name in ("kenlm_tools", "lm_ngram", "lm_graph"):
        outputs = _run_stage(table[name], config, "2")
        assert outputs and all(p.is_file() for p in outputs), name
    args = log.read_text().split()
    assert args[:4] == ["-order", "2", "-text", "results/srilm/lm/text.txt"] and args[-3:] == ["-unk", "-map-unk", "<unk>"]
    assert kenlm.Model("results/srilm/lm/2gram/lm.bin").score("we like the book today") == pytest.approx(
        -0.35 - 0.3 - 0.1 - 0.5 - 0.4 - 0.1, abs=1e-5)

    log.unlink()
    config.write_text(yaml.safe_dump({"run": "srilm", "lm": {**lm, "kenlm_dir": str(tmp_path / "no-kenlm")}}))
    assert main(["lm", "ngram", "--config", str(config), "--text", "results/srilm/lm/text.txt", "--order", "2",
                 "--out", "elsewhere"]) == 2
    assert "`build_binary` not found" in capsys.readouterr().err
    assert not log.exists() and not Path("elsewhere").exists()
