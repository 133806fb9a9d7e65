"""The decoding core: one trial's logits to its final n-best list, the same in every runtime.

``b2txt decode`` (a process pool), the LM server's workers and the consumer-group
``lm-worker`` processes all decode through a :class:`DecodingCore`. It owns the decoders of one
language-model directory (one per set of search options, built on first use, the least
recently used dropped beyond ``max_decoders``) and does, for one trial:

    decode (WFST or lexicon search) -> augment the n-best (REFERENCE §4)    :meth:`DecodingCore.nbest`
    -> LLM rescoring (optional)                                              :meth:`DecodingCore.rescore`

The LLM is optional and separate: a core built without a rescorer never loads one, and a
core that only rescores (the LM server's LLM process) never loads a graph.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.logits import LogitsTrial
from ..ground.config import DecodeConfig, RescoreConfig
from ..ground.errors import B2txtError
from ..ground.phonemes import Lexicon, to_lm_order
from .nbest import Decoder, NBest, PartialDecoder, augment_nbest, check_logits

if TYPE_CHECKING:
    from .rescore import LLMRescorer

#: KenLM model files the lexicon decoder looks for in an LM directory, in order of preference.
KENLM_NAMES = ("lm.bin", "lm.arpa")


def find_kenlm_model(lm_dir: Path) -> Path:
    for name in KENLM_NAMES:
        if (lm_dir / name).is_file():
            return lm_dir / name
    raise B2txtError(f"{lm_dir}: no KenLM model ({' or '.join(KENLM_NAMES)}) for the lexicon decoder; "
                     "build one with `b2txt lm ngram`")


def make_decoder(options: DecodeConfig, lm_dir: str | Path) -> Decoder:
    """The decoder ``options.decoder`` names, on the LM directory ``lm_dir``.

    ``wfst`` reads ``TLG.fst`` + ``words.txt`` (ours or a published graph directory);
    ``lexicon`` reads a KenLM model (``lm.bin`` / ``lm.arpa``) and decodes with the CMU-dict
    lexicon restricted to the LM's vocabulary.
    """
    lm_dir = Path(lm_dir)
    if not lm_dir.is_dir():
        raise B2txtError(f"{lm_dir}: language-model directory not found")
    if options.decoder == "wfst":
        from .wfst import WfstDecoder

        return WfstDecoder(lm_dir, options)
    from .lexicon_search import LexiconDecoder

    return LexiconDecoder(find_kenlm_model(lm_dir), options, lexicon=Lexicon.from_cmudict())


def trial_logits(trials: list[LogitsTrial], path: str | Path) -> dict[int, np.ndarray]:
    """LM-order, checked logits of every trial; a trial without frames is an error (it would decode
    to an empty sentence that nobody asked for)."""
    out = {}
    for i, t in enumerate(trials):
        x = check_logits(np.asarray(t.logits), f"{path}: trial {i} ({t.attrs.get('session', '?')})")
        out[i] = np.ascontiguousarray(to_lm_order(x))
    return out


def search_key(options: DecodeConfig) -> str:
    """The options that change the search itself; n-best augmentation and process counts do not."""
    return json.dumps(options.model_dump(mode="json", exclude={"augment_top", "augment_penalty", "workers"}),
                      sort_keys=True)


class DecodingCore:
    """Decoders of one LM directory and the decode -> augment -> rescore steps of one trial."""

    def __init__(self, lm_dir: str | Path, options: DecodeConfig, rescorer: LLMRescorer | None = None,
                 max_decoders: int = 3):
        self.lm_dir = Path(lm_dir)
        self.options = options  # used when a call gives no options of its own
        self.rescorer = rescorer
        self.max_decoders = max(1, max_decoders)
        self._decoders: OrderedDict[str, Decoder] = OrderedDict()

    def decoder(self, options: DecodeConfig | None = None) -> Decoder:
        """The decoder for these options (default: the core's), built on first use."""
        options = options or self.options
        key = search_key(options)
        if key not in self._decoders:
            self._decoders[key] = make_decoder(options, self.lm_dir)
            while len(self._decoders) > self.max_decoders:
                self._decoders.popitem(last=False)
        self._decoders.move_to_end(key)
        return self._decoders[key]

    def load(self) -> DecodingCore:
        """Build the default decoder now (before forking workers, so that they share it)."""
        self.decoder()
        return self

    def nbest(self, logits: np.ndarray, options: DecodeConfig | None = None) -> NBest:
        """Decode one trial (LM-order logits ``[T, 41]``) and augment its n-best list."""
        options = options or self.options
        nbest = self.decoder(options).decode(logits)
        if options.nbest > 1 and options.augment_top > 1:
            nbest = augment_nbest(nbest, options.augment_top, options.augment_penalty)
        return nbest

    def rescore(self, nbest: NBest, llm: RescoreConfig, options: DecodeConfig | None = None) -> NBest:
        """LLM rescoring of an n-best list with ``llm``'s alpha and context."""
        if self.rescorer is None:
            raise B2txtError("LLM rescoring asked for, but no LLM is loaded here (start with --do_opt or --llm)")
        if not nbest.candidates:
            return nbest
        return self.rescorer.rescore(nbest, options or self.options, llm)

    def stream(self, options: DecodeConfig | None = None) -> PartialDecoder:
        """A search of its own for one streaming trial; partial results as chunks arrive."""
        return self.decoder(options).stream()


def load_rescorer(cfg: RescoreConfig | None) -> LLMRescorer | None:
    """The LLM of ``cfg`` (None: no LLM). transformers is imported only here."""
    if cfg is None:
        return None
    from .rescore import LLMRescorer

    return LLMRescorer(cfg)
