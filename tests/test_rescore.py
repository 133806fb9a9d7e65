"""LLM rescoring with a real (tiny) causal LM: an OPT of a few thousand parameters and a
word-level tokenizer, built and trained here, saved with ``save_pretrained`` and loaded back
through :class:`LLMRescorer`'s ``from_pretrained`` path."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.synthetic import trials_file
from helpers.tiny_llm import build_tiny_opt

from b2txt.ground.config import DecodeConfig, RescoreConfig
from b2txt.ground.errors import B2txtError
from b2txt.lm.nbest import Candidate, NBest, make_nbest, total_score
from b2txt.lm.rescore import LLMRescorer, is_unsure, nbest_margin, should_rescore

TARGET = "the cat sat on the mat"
DISTRACTORS = ["the cat sat on the hat", "the bat sat on the mat", "a cat sat in the mat",
               "the cat sat on a mat", "the hat sat on the cat"]
#: Training text: the target many times, plus a context-dependent pair.
TRAIN = [TARGET] * 6 + ["where is the dog ? the dog is at home", "the bird can sing", "my dog runs fast"]
OPTS = DecodeConfig(acoustic_scale=0.5)


def _build_tiny_opt(out: Path) -> Path:
    model = build_tiny_opt(out, TRAIN, [*DISTRACTORS, "context words here"])
    from transformers import OPTForCausalLM

    assert sum(p.numel() for p in OPTForCausalLM.from_pretrained(model).parameters()) < 10_000
    return model


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return _build_tiny_opt(tmp_path_factory.mktemp("tiny_opt"))


@pytest.fixture(scope="module")
def rescorer(tiny_llm) -> LLMRescorer:
    return LLMRescorer(RescoreConfig(model=str(tiny_llm), batch_size=4, device="cpu"))


def _nbest(sentences: list[str], ngram: list[float], acoustic: float = -20.0) -> NBest:
    return make_nbest(Candidate(s, acoustic, g, 0.0, total_score(acoustic, g, len(s.split()), OPTS))
                      for s, g in zip(sentences, ngram))


def test_loads_through_from_pretrained(rescorer, tiny_llm):
    assert rescorer.device.type == "cpu" and rescorer.dtype == torch.float32
    assert not rescorer.model.training
    assert (tiny_llm / "config.json").is_file() and (tiny_llm / "tokenizer.json").is_file()


def test_log_probs_match_a_direct_forward_pass(rescorer):
    """The batched sum equals the chain rule computed by hand on one unpadded sequence."""
    tok = rescorer.tokenizer
    ids = [tok.bos_token_id, *tok(TARGET, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logp = torch.log_softmax(rescorer.model(torch.tensor([ids])).logits[0].float(), -1)
    expected = sum(logp[p, ids[p + 1]].item() for p in range(len(ids) - 1))
    got = rescorer.log_probs([TARGET, *DISTRACTORS])
    assert got[0] == pytest.approx(expected, abs=1e-4)
    assert all(x < 0 for x in got)
    assert got[0] > max(got[1:])  # training made the target the likeliest
    assert rescorer.log_probs([""]) == [0.0]


def test_log_probs_do_not_depend_on_batch_composition(tiny_llm, rescorer):
    sentences = [TARGET, *DISTRACTORS, "the cat", "sat", "the dog is at home"]
    reference = rescorer.log_probs(sentences)
    for batch_size in (1, 3, 16):
        other = LLMRescorer(RescoreConfig(model=str(tiny_llm), batch_size=batch_size, device="cpu"))
        assert other.log_probs(sentences) == pytest.approx(reference, abs=1e-4)
    # alone or in a reversed list: the same score
    assert rescorer.log_probs([sentences[-1]])[0] == pytest.approx(reference[-1], abs=1e-4)
    assert rescorer.log_probs(sentences[::-1]) == pytest.approx(reference[::-1], abs=1e-4)


def test_context_changes_scores(rescorer):
    plain = rescorer.log_probs(["the dog is at home", TARGET])
    with_context = rescorer.log_probs(["the dog is at home", TARGET], context="where is the dog ?")
    assert with_context != pytest.approx(plain, abs=1e-3)
    # the context is conditioned on, not scored: one token's worth, not the context's sum
    context_alone = rescorer.log_probs(["where is the dog ?"])[0]
    assert with_context[0] > plain[0] + context_alone


def test_rescoring_moves_the_llm_favourite_up(rescorer):
    nbest = _nbest([DISTRACTORS[0], TARGET, DISTRACTORS[1]], [-10.0, -11.0, -11.5])
    assert nbest.best == DISTRACTORS[0]
    out = rescorer.rescore(nbest, OPTS, RescoreConfig(model="unused", alpha=0.55))
    assert out.best == TARGET
    assert {c.sentence for c in out.candidates} == {c.sentence for c in nbest.candidates}
    llm = dict(zip([c.sentence for c in nbest.candidates], rescorer.log_probs([c.sentence for c in nbest.candidates])))
    for c in out.candidates:
        assert c.llm == pytest.approx(llm[c.sentence])
        assert c.total == pytest.approx(total_score(c.acoustic, c.ngram, c.n_words, OPTS, llm=c.llm, alpha=0.55))
    assert [c.total for c in out.candidates] == sorted((c.total for c in out.candidates), reverse=True)


def test_alpha_zero_keeps_the_ngram_order(rescorer):
    nbest = _nbest([DISTRACTORS[0], TARGET, DISTRACTORS[1], DISTRACTORS[2]], [-10.0, -11.0, -11.5, -12.0])
    out = rescorer.rescore(nbest, OPTS, RescoreConfig(model="unused", alpha=0.0))
    assert [c.sentence for c in out.candidates] == [c.sentence for c in nbest.candidates]
    assert [c.total for c in out.candidates] == pytest.approx([c.total for c in nbest.candidates])
    assert all(c.llm < 0 for c in out.candidates)  # filled in all the same


def test_unsure_margin_skips_confident_lists(rescorer):
    close = _nbest([DISTRACTORS[0], TARGET], [-10.0, -10.5])
    confident = _nbest([DISTRACTORS[0], TARGET], [-10.0, -30.0])
    cfg = RescoreConfig(model="unused", alpha=0.55, unsure_margin=2.0)
    assert is_unsure(close, OPTS, 2.0) and not is_unsure(confident, OPTS, 2.0)
    assert rescorer.rescore(confident, OPTS, cfg) == confident
    assert rescorer.rescore(close, OPTS, cfg).best == TARGET
    single = _nbest([DISTRACTORS[0]], [-10.0])
    assert rescorer.rescore(single, OPTS, cfg) == single


def test_empty_nbest_is_unchanged(rescorer):
    assert rescorer.rescore(NBest(()), OPTS) == NBest(())


def test_scoring_time_is_small(rescorer):
    sentences = [TARGET, *DISTRACTORS] * 16  # an n-best list of ~100
    t0 = time.perf_counter()
    scores = rescorer.log_probs(sentences)
    assert len(scores) == len(sentences) and all(math.isfinite(s) for s in scores)
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "./no/such/dir/here"])
def test_missing_local_model_is_a_clear_error(model):
    with pytest.raises(B2txtError, match="rescore.model.*no such local model directory"):
        LLMRescorer(RescoreConfig(model=model, device="cpu"))


def test_directory_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(B2txtError, match=rf"rescore.model = '{tmp_path}'.*cannot load"):
        LLMRescorer(RescoreConfig(model=str(tmp_path), device="cpu"))


def test_tokenizer_without_model_is_a_clear_error(tiny_llm, tmp_path):
    import shutil

    for name in tiny_llm.iterdir():
        if "token" in name.name or name.name == "special_tokens_map.json":
            shutil.copy(name, tmp_path / name.name)
    with pytest.raises(B2txtError, match="cannot load it as a causal LM"):
        LLMRescorer(RescoreConfig(model=str(tmp_path), device="cpu"))


# ----------------------------------------------------------------------------- gated rescoring

def test_nbest_margin_is_the_gap_between_the_two_best_search_scores():
    nb = _nbest([DISTRACTORS[0], TARGET, DISTRACTORS[1]], [-10.0, -10.75, -12.0])
    assert nbest_margin(nb, OPTS) == pytest.approx(0.75)
    assert nbest_margin(_nbest([TARGET], [-3.0]), OPTS) == math.inf
    assert math.isnan(nbest_margin(NBest(()), OPTS))
    assert should_rescore(nb, OPTS, None) and should_rescore(nb, OPTS, math.inf) and should_rescore(nb, OPTS, 0.8)
    assert not should_rescore(nb, OPTS, 0.75) and not should_rescore(nb, OPTS, 0.0)
    assert should_rescore(_nbest([TARGET], [-3.0]), OPTS, math.inf)  # +inf: every list, as without a gate
    assert not should_rescore(NBest(()), OPTS, None)


def _lists() -> list[NBest]:
    return [_nbest([DISTRACTORS[0], TARGET, DISTRACTORS[1]], [-10.0, -10.5, -11.0]),
            _nbest([DISTRACTORS[2], TARGET], [-10.0, -25.0]),
            _nbest([TARGET], [-8.0]), NBest(()),
            _nbest([DISTRACTORS[3], DISTRACTORS[4], TARGET], [-9.0, -9.0, -9.5])]  # a tie


def test_infinite_margin_is_rescoring_everything_and_zero_is_none(rescorer):
    lists = _lists()
    always = [rescorer.rescore(nb, OPTS, RescoreConfig(model="unused")) for nb in lists]
    inf = [rescorer.rescore(nb, OPTS, RescoreConfig(model="unused", unsure_margin=math.inf)) for nb in lists]
    zero = [rescorer.rescore(nb, OPTS, RescoreConfig(model="unused", unsure_margin=0.0)) for nb in lists]
    assert inf == always and zero == lists
    assert always[0].best == TARGET != lists[0].best  # rescoring does change something here


def test_decode_reports_the_fraction_rescored_and_the_gate_bounds(kenlm_graph, lexicon, tiny_llm, tmp_path):
    """End to end through `b2txt decode`'s decode_file: the gate's fraction in timing.json; +inf
    decodes as rescoring everything, 0 as no rescoring, a margin between picks per trial."""
    import json

    import numpy as np
    from helpers.data import SENTENCES

    from b2txt.lm.pool import decode_file

    path, _ = trials_file(tmp_path / "val.hdf5", lexicon, SENTENCES[:10], seed=3, confusion=0.15, runner_up=2.0)
    opts = DecodeConfig(acoustic_scale=0.5, nbest=10, augment_top=10, workers=1)
    llm = RescoreConfig(enabled=True, model=str(tiny_llm), device="cpu", batch_size=8)

    def run(name, margin=None, enabled=True):
        table = decode_file(path, kenlm_graph, tmp_path / name, opts,
                            llm.model_copy(update={"unsure_margin": margin, "enabled": enabled}), log=lambda m: None)
        timing = json.loads((tmp_path / name / "timing.json").read_text())
        return table["decoded"].tolist(), timing.get("rescore")

    plain, none_gate = run("plain", enabled=False)
    assert none_gate is None
    everything, all_gate = run("all")
    inf, inf_gate = run("inf", math.inf)
    zero, zero_gate = run("zero", 0.0)
    assert all_gate["fraction_rescored"] == inf_gate["fraction_rescored"] == 1.0 and inf == everything
    assert zero_gate["rescored"] == 0 and zero_gate["fraction_rescored"] == 0.0 and zero == plain
    nbests = [json.loads(line) for line in (tmp_path / "plain" / "nbest.jsonl").read_text().splitlines()]
    margins = np.array([c[0][4] - c[1][4] if len(c) > 1 else math.inf for c in (x["candidates"] for x in nbests)])
    cut = float(np.median(margins[np.isfinite(margins)]))
    some, some_gate = run("some", cut)
    assert some_gate["rescored"] == int((margins < cut).sum()) and some_gate["lists"] == len(nbests)
    assert 0 < some_gate["fraction_rescored"] < 1
    assert some == [e if m < cut else p for e, p, m in zip(everything, plain, margins)]
    # the LM server path (`b2txt evaluate`) gates alike and reports the same fraction
    from b2txt.server.evaluate import evaluate
    from b2txt.server.evaluate_common import EvalSettings

    summary = evaluate(EvalSettings(logits=path, lm_dir=kenlm_graph, out=tmp_path / "server", options=opts,
                                    rescore=llm.model_copy(update={"unsure_margin": cut}), alpha=llm.alpha,
                                    workers=1), log=lambda m: None)
    served = pd.read_csv(tmp_path / "server" / "decoded.csv", keep_default_na=False)["decoded"].tolist()
    assert served == some
    assert {k: summary["rescore"][k] for k in ("lists", "rescored", "fraction_rescored")} == \
        {k: some_gate[k] for k in ("lists", "rescored", "fraction_rescored")}
