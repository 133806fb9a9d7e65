"""Large-language-model rescoring of an n-best list (REFERENCE §4).

Each candidate gets its log-probability under a causal LM (any ``transformers`` model, e.g.
OPT-6.7b, from a Hub name or a local directory) and the total becomes
``acoustic_scale · acoustic + (1 − α) · ngram + α · llm + length_penalty · words``
(:func:`b2txt.lm.nbest.total_score`); the list is re-ordered by :func:`~b2txt.lm.nbest.make_nbest`.

A sentence's score is the sum of the natural-log probabilities of its tokens given the
beginning-of-sequence token and the optional context string, without an end-of-sequence
token (the published scoring); an empty sentence scores 0. Sentences are scored in batches,
right-padded with an attention mask, so real tokens keep positions 0…n−1 and a sentence's
score does not depend on which other sentences share its batch (up to float rounding).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.errors import B2txtError
from .nbest import NBest, make_nbest, total_score


class RescoreError(B2txtError):
    """The rescoring model or its options cannot be used."""


def _torch_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise RescoreError(f"rescore.device = {name!r}: not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RescoreError(f"rescore.device = {name!r}: CUDA is not available on this machine")
    return device


def _torch_dtype(name: str, device: Any) -> Any:
    """Half precision on accelerators (fp16 as published, unless bf16 is asked), float32 on CPU.

    CPU half-precision kernels are slow and lose log-probability precision, so a half-precision
    request on the CPU falls back to float32 with a warning.
    """
    import torch

    if device.type == "cpu":
        if name in ("float16", "bfloat16"):
            warnings.warn(f"rescore.dtype = {name} ignored on the CPU: scoring in float32", stacklevel=3)
        return torch.float32
    return {"auto": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float32": torch.float32}[name]


def _check_model_location(model: str) -> None:
    """A path-like model name must exist: say so instead of a Hub look-up error."""
    if Path(model).expanduser().exists():
        return
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise RescoreError(f"rescore.model = {model!r}: no such local model directory")


def _from_pretrained(loader: Any, model: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained``, from the local cache first: no Hub round trips (and no
    retries on a machine without internet) for a model that is already downloaded."""
    try:
        return loader.from_pretrained(model, local_files_only=True, **kwargs)
    except OSError:
        if Path(model).expanduser().exists():
            raise
    return loader.from_pretrained(model, **kwargs)


class LLMRescorer:
    """A causal LM and its tokenizer, loaded once, scoring sentences and n-best lists.

    ``cfg.model`` is a Hub name or a local directory written by ``save_pretrained`` (model and
    tokenizer); the model runs in eval mode without gradients on ``cfg.device`` in ``cfg.dtype``.
    """

    def __init__(self, cfg: RescoreConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = _torch_device(cfg.device)
        self.dtype = _torch_dtype(cfg.dtype, self.device)
        _check_model_location(cfg.model)
        t0 = time.perf_counter()
        try:
            self.tokenizer = _from_pretrained(AutoTokenizer, cfg.model)
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError, KeyError … depending on the files
            raise RescoreError(f"rescore.model = {cfg.model!r}: cannot load its tokenizer: {exc}") from exc
        try:
            model = _from_pretrained(AutoModelForCausalLM, cfg.model, dtype=self.dtype)
        except Exception as exc:  # noqa: BLE001
            raise RescoreError(f"rescore.model = {cfg.model!r}: cannot load it as a causal LM: {exc}") from exc
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - t0
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise RescoreError(f"rescore.model = {cfg.model!r}: the tokenizer has neither a BOS nor an EOS "
                               "token to condition the first word on")
        self.bos_id: int = int(bos)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id: int = int(pad) if pad is not None else 0  # masked out: any id will do

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _sentence_tokens(self, sentence: str, context: str, context_ids: list[int]) -> tuple[list[int], int]:
        """(context + sentence token ids, number of leading context tokens).

        The pair is tokenised together (joined by a space) so the sentence's first token has the
        form it has in running text; the context part is the longest prefix shared with the
        context tokenised alone (they differ only if a token straddles the join).
        """
        if not context:
            return self._encode(sentence), 0
        ids = self._encode(f"{context} {sentence}" if sentence else context)
        n = 0
        while n < min(len(ids), len(context_ids)) and ids[n] == context_ids[n]:
            n += 1
        return ids, n

    def log_probs(self, sentences: Sequence[str], context: str = "") -> list[float]:
        """Natural-log probability of each sentence given BOS + ``context`` (see the module notes)."""
        import torch

        context = context.strip()
        context_ids = self._encode(context)
        items: list[tuple[list[int], int]] = []
        for s in sentences:
            ids, n_ctx = self._sentence_tokens(s.strip(), context, context_ids)
            items.append(([self.bos_id, *ids], n_ctx + 1))  # score tokens from this position on
        scores = [0.0] * len(items)
        # longest first: batches of similar length waste little on padding
        order = sorted((i for i, (ids, first) in enumerate(items) if len(ids) > first),
                       key=lambda i: -len(items[i][0]))
        size = self.cfg.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), size):
                chunk = order[start:start + size]
                width = len(items[chunk[0]][0])
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                scored = torch.zeros((len(chunk), width), dtype=torch.bool)
                for row, i in enumerate(chunk):
                    ids, first = items[i]
                    input_ids[row, :len(ids)] = torch.tensor(ids)
                    attention[row, :len(ids)] = 1
                    scored[row, first:len(ids)] = True
                input_ids, attention, scored = (t.to(self.device) for t in (input_ids, attention, scored))
                logits = self.model(input_ids=input_ids, attention_mask=attention).logits
                # position p predicts token p + 1; float32 before the softmax whatever the model dtype
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
                sums = (token_logp * scored[:, 1:]).sum(dim=1).double().cpu().tolist()
                for i, value in zip(chunk, sums):
                    scores[i] = float(value)
        return scores

    def rescore(self, nbest: NBest, decode_options: DecodeConfig, cfg: RescoreConfig | None = None) -> NBest:
        """Fill in ``llm``, recompute totals with ``cfg.alpha`` and re-order the candidates.

        With ``cfg.unsure_margin`` set, a list comes back unchanged unless :func:`should_rescore`
        says otherwise (its n-gram margin is below the gate): the LLM, the costly part, only runs
        where the n-gram decision is close. An empty list comes back unchanged.
        """
        cfg = cfg if cfg is not None else self.cfg
        if not nbest.candidates or not should_rescore(nbest, decode_options, cfg.unsure_margin):
            return nbest
        llm = self.log_probs([c.sentence for c in nbest.candidates], cfg.context)
        rescored = [
            c._replace(llm=score, total=total_score(c.acoustic, c.ngram, c.n_words, decode_options,
                                                    llm=score, alpha=cfg.alpha))
            for c, score in zip(nbest.candidates, llm)
        ]
        return make_nbest(rescored)


def nbest_margin(nbest: NBest, decode_options: DecodeConfig) -> float:
    """How sure the n-gram decoder is: the best minus the second-best search score, in the
    decoder's units (``acoustic_scale · acoustic + ngram + length_penalty · words``, natural-log,
    without the LLM; augmented candidates count with their scores). +inf for a list of one
    candidate (nothing to re-order), NaN for an empty one."""
    if not nbest.candidates:
        return math.nan
    if len(nbest) < 2:
        return math.inf
    totals = sorted((total_score(c.acoustic, c.ngram, c.n_words, decode_options) for c in nbest.candidates),
                    reverse=True)
    return totals[0] - totals[1]


def should_rescore(nbest: NBest, decode_options: DecodeConfig, unsure_margin: float | None) -> bool:
    """The gate: rescore when no margin is set (``None``), when it is +inf (every non-empty list,
    as without a gate), else when the list's :func:`nbest_margin` is below it (0: never)."""
    if not nbest.candidates:
        return False
    if unsure_margin is None or unsure_margin == math.inf:
        return True
    return nbest_margin(nbest, decode_options) < unsure_margin


def is_unsure(nbest: NBest, decode_options: DecodeConfig, margin: float) -> bool:
    """True when the two best n-gram totals (without the LLM) differ by less than ``margin``."""
    return len(nbest) >= 2 and nbest_margin(nbest, decode_options) < margin
