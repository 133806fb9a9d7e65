"""Lexicon beam search: flashlight-text's CTC lexicon decoder on a KenLM n-gram model.

The low-memory alternative to the WFST decoder: no composed graph, only a pronunciation trie
(every variant of every word, a word's path being its phonemes then ``SIL``) and a KenLM model
(ARPA or KenLM binary) queried on the fly. Tokens are the 41 columns in language-model order
(blank 0, ``SIL`` 1, phonemes 2..40), so the decoder takes the logits the LM server receives.

How :class:`~b2txt.ground.config.DecodeConfig` maps onto flashlight's options (the search score is
then exactly the interface's ``acoustic_scale · acoustic + ngram + length_penalty · words`` in
natural logs):

- emissions = ``acoustic_scale ·`` :func:`~b2txt.lm.nbest.frame_log_probs` (blank penalty and
  blank skipping included);
- ``lm_weight`` = ln 10, because KenLM returns log10;
- ``beam`` → beam threshold, ``max_active`` → beam size, ``beam_size_token`` → tokens tried per
  frame, ``length_penalty`` → word score; ``min_active`` and ``lattice_beam`` have no
  counterpart here;
- the unknown-word score is −∞, and words the LM does not know are left out of the trie: the
  search never emits a word without an n-gram probability of its own.

Flashlight pitfalls handled here (measured, see FIELD-NOTES): a trie node holds at most
:data:`MAX_HOMOPHONES` words and silently drops the rest, so homophones are ranked by unigram
probability and the excess is reported (:attr:`LexiconDecoder.dropped_homophones` and a
warning); its n-best list is short and repeats sentences with different alignments, and ties
come back in any order, so the candidates are re-scored from the text and the alignment,
de-duplicated and sorted by :func:`~b2txt.lm.nbest.make_nbest`.

The trie of the 125k-word CMU lexicon takes a few seconds to build; it is built once per
process (:func:`build_search` caches it) and shared by every decoder on the same files.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..ground.config import DecodeConfig
from ..ground.errors import B2txtError
from ..ground.phonemes import CLASSES, LM_ORDER, N_CLASSES, SIL, Lexicon
from .nbest import Candidate, NBest, check_logits, frame_log_probs, make_nbest, total_score

#: flashlight's trie keeps at most this many words on one node (kTrieMaxLabel); more are dropped.
MAX_HOMOPHONES = 6
#: Token index (LM column order) of every phoneme name, blank and SIL included.
TOKEN_INDEX: dict[str, int] = {CLASSES[c]: i for i, c in enumerate(LM_ORDER)}
BLANK_TOKEN = 0
SIL_TOKEN = TOKEN_INDEX[SIL]
#: Word-dictionary entry 0: flashlight needs an unknown word; it is never emitted (score −∞).
UNK = "<unk>"
LN10 = math.log(10.0)

assert SIL_TOKEN == 1 and TOKEN_INDEX["AA"] == 2


class LexiconHomophoneWarning(UserWarning):
    """Words left out of the trie because a pronunciation has more than 6 words."""


@dataclass(frozen=True)
class LexiconSearch:
    """What the search needs besides its options; built once per process by :func:`build_search`.

    ``words[i]`` is the word with flashlight word index ``i`` (``words[0]`` is ``<unk>``).
    """

    lm_path: Path
    trie: object  # flashlight Trie
    lm: object  # flashlight KenLM
    word_dict: object  # flashlight Dictionary (kept alive beside the LM that maps it)
    words: tuple[str, ...]
    n_pronunciations: int
    #: (word, phonemes) pairs not in the trie: the node already held MAX_HOMOPHONES likelier words
    dropped_homophones: tuple[tuple[str, tuple[str, ...]], ...]
    #: words none of whose pronunciations made it into the trie: never emitted
    lost_words: tuple[str, ...]
    #: lexicon words (of those requested) that the LM does not know: never decodable
    not_in_lm: int
    #: requested words without a pronunciation in the lexicon
    not_in_lexicon: int
    build_seconds: float
    index: dict[str, int] = field(repr=False, default_factory=dict)

    def ngram_score(self, sentence: str) -> float:
        """Natural-log n-gram probability of a sentence (begin and end of sentence included)."""
        lm = self.lm
        state = lm.start(False)
        total = 0.0
        for word in sentence.split():
            state, score = lm.score(state, self.index.get(word, 0))
            total += score
        _, score = lm.finish(state)
        return (total + score) * LN10


def _load_lm(lm_path: Path, word_dict: object) -> object:
    from flashlight.lib.text.decoder.kenlm import KenLM

    try:
        return KenLM(str(lm_path), word_dict)
    except Exception as exc:  # noqa: BLE001 - the C++ loader raises assorted types
        raise B2txtError(f"{lm_path}: cannot load the KenLM model for the lexicon decoder: {exc}") from exc


def _lm_vocabulary_filter(lm_path: Path) -> object:
    """A KenLM model (python module) used only for ``word in model`` while the trie is built.

    Lazy loading maps a binary model instead of reading it, so the pages are shared with the
    decoder's own copy; an ARPA file is parsed twice, but ARPA files are small test models.
    """
    import kenlm

    config = kenlm.Config()
    config.load_method = kenlm.LoadMethod.LAZY
    config.show_progress = False
    config.arpa_complain = kenlm.ARPALoadComplain.NONE
    try:
        return kenlm.Model(str(lm_path), config)
    except Exception as exc:  # noqa: BLE001 - kenlm raises OSError or RuntimeError subclasses
        raise B2txtError(f"{lm_path}: not a readable KenLM model (ARPA or binary): {exc}") from exc


def build_search(lm_path: str | os.PathLike[str], lexicon: Lexicon | None = None,
                 words: Iterable[str] | None = None) -> LexiconSearch:
    """The trie, the LM and the word list for ``lm_path``, built once per process.

    Cached on the LM file (path, size, modification time), the lexicon object and the word set,
    so every decoder of a process (and forked workers) shares one copy.
    """
    path = Path(lm_path)
    if not path.is_file():
        raise B2txtError(f"{path}: KenLM model not found (decode.decoder = lexicon needs lm.bin or lm.arpa)")
    stat = path.stat()
    lexicon = lexicon if lexicon is not None else Lexicon.from_cmudict()
    wanted = None if words is None else tuple(dict.fromkeys(words))
    return _build_search_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, lexicon, wanted)


@functools.lru_cache(maxsize=2)
def _build_search_cached(path_str: str, _size: int, _mtime_ns: int, lexicon: Lexicon,
                         wanted: tuple[str, ...] | None) -> LexiconSearch:
    from flashlight.lib.text.decoder import SmearingMode, Trie
    from flashlight.lib.text.dictionary import Dictionary

    t0 = time.perf_counter()
    path = Path(path_str)
    candidates: Sequence[str] = wanted if wanted is not None else tuple(lexicon.pronunciations)
    not_in_lexicon = sum(1 for w in candidates if w not in lexicon)
    vocab_filter = _lm_vocabulary_filter(path)
    in_lexicon = [w for w in candidates if w in lexicon and w != UNK]
    kept = [w for w in in_lexicon if w in vocab_filter]  # type: ignore[operator]
    not_in_lm = len(in_lexicon) - len(kept)
    del vocab_filter
    if not kept:
        raise B2txtError(f"{path}: none of the {len(in_lexicon)} lexicon words is in the LM vocabulary; "
                         "was the LM built on this lexicon's words?")

    word_list = (UNK, *kept)
    word_dict = Dictionary(list(word_list))
    lm = _load_lm(path, word_dict)
    index = {w: i for i, w in enumerate(word_list)}

    # Unigram log10 probabilities: the smearing look-ahead and the homophone ranking.
    null = lm.start(True)
    unigram = {w: lm.score(null, index[w])[1] for w in kept}

    by_tokens: dict[tuple[int, ...], list[str]] = defaultdict(list)
    phones_of: dict[tuple[int, ...], tuple[str, ...]] = {}
    for w in kept:
        for phones in lexicon.pronunciations[w]:
            tokens = (*(TOKEN_INDEX[p] for p in phones), SIL_TOKEN)
            by_tokens[tokens].append(w)
            phones_of[tokens] = phones

    trie = Trie(N_CLASSES, SIL_TOKEN)
    dropped: list[tuple[str, tuple[str, ...]]] = []
    in_trie: set[str] = set()
    n_prons = 0
    for tokens, homophones in by_tokens.items():
        # most probable first; the stable sort keeps the given order among equals
        ranked = sorted(homophones, key=lambda w: -unigram[w])
        for w in ranked[:MAX_HOMOPHONES]:
            trie.insert(list(tokens), index[w], unigram[w])
            in_trie.add(w)
            n_prons += 1
        dropped.extend((w, phones_of[tokens]) for w in ranked[MAX_HOMOPHONES:])
    trie.smear(SmearingMode.MAX)

    lost = sorted({w for w, _ in dropped} - in_trie)
    if dropped:
        warnings.warn(
            f"{path}: {len(dropped)} pronunciation(s) left out of the lexicon trie: more than "
            f"{MAX_HOMOPHONES} words share them and flashlight keeps only {MAX_HOMOPHONES} per node "
            f"(the likeliest by unigram probability were kept); {len(lost)} word(s) cannot be decoded at all"
            + (f", e.g. {', '.join(lost[:5])}" if lost else ""),
            LexiconHomophoneWarning, stacklevel=3)
    return LexiconSearch(
        lm_path=path, trie=trie, lm=lm, word_dict=word_dict, words=word_list, n_pronunciations=n_prons,
        dropped_homophones=tuple(dropped), lost_words=tuple(lost), not_in_lm=not_in_lm, not_in_lexicon=not_in_lexicon,
        build_seconds=time.perf_counter() - t0, index=index)


class LexiconDecoder:
    """CTC beam search over a pronunciation trie with a KenLM n-gram (see the module notes).

    ``words`` restricts the vocabulary (e.g. to a task's word list); by default every lexicon
    word the LM knows. Not thread-safe (one search state per decoder); decoding holds the GIL,
    so parallelise with processes.
    """

    def __init__(self, lm_path: str | os.PathLike[str], options: DecodeConfig, lexicon: Lexicon | None = None,
                 words: Iterable[str] | None = None):
        from flashlight.lib.text.decoder import CriterionType, LexiconDecoderOptions

        self.options = options
        self.search = build_search(lm_path, lexicon, words)
        fl_options = LexiconDecoderOptions(
            beam_size=options.max_active,
            beam_size_token=min(options.beam_size_token, N_CLASSES),
            beam_threshold=options.beam,
            lm_weight=LN10,
            word_score=options.length_penalty,
            unk_score=float("-inf"),
            sil_score=0.0,
            log_add=False,  # Viterbi: a hypothesis scores its best alignment, as the acoustic score says
            criterion_type=CriterionType.CTC,
        )
        self._fl_options = fl_options
        self._decoder = self._new_search()

    def _new_search(self) -> object:
        from flashlight.lib.text.decoder import LexiconDecoder as _FlashlightDecoder

        return _FlashlightDecoder(self._fl_options, self.search.trie, self.search.lm, SIL_TOKEN, BLANK_TOKEN, 0,
                                  [], False)

    def stream(self) -> "LexiconStream":
        return LexiconStream(self)

    @property
    def dropped_homophones(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(word, phonemes) pairs the trie could not hold (more than 6 words on one pronunciation)."""
        return self.search.dropped_homophones

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """The words this decoder can emit (those with at least one pronunciation in the trie)."""
        lost = set(self.search.lost_words)
        return tuple(w for w in self.search.words[1:] if w not in lost)

    def decode(self, logits: np.ndarray) -> NBest:
        """Decode LM-order logits ``[T, 41]`` into distinct candidates, best first.

        Each candidate's scores are recomputed from its text (n-gram) and its alignment
        (acoustic), so they follow :mod:`b2txt.lm.nbest` exactly whatever flashlight's internal
        bookkeeping (look-ahead smearing, partial words at the end) did.
        """
        x = check_logits(logits)
        logp = frame_log_probs(x, self.options)
        emissions = np.ascontiguousarray(self.options.acoustic_scale * logp, dtype=np.float32)
        n_frames = emissions.shape[0]
        results = self._decoder.decode(emissions.ctypes.data, n_frames, N_CLASSES)
        frames = np.arange(n_frames)
        words = self.search.words
        ngram_cache: dict[str, float] = {}
        candidates: list[Candidate] = []
        for r in results:
            sentence = " ".join(words[i] for i in r.words if i > 0)
            # tokens[0] is the start state; tokens[1 + t] is the token of frame t
            path = np.asarray(r.tokens[1:n_frames + 1], dtype=np.int64)
            acoustic = float(logp[frames, path].astype(np.float64).sum())
            if sentence not in ngram_cache:
                ngram_cache[sentence] = self.search.ngram_score(sentence)
            ngram = ngram_cache[sentence]
            total = total_score(acoustic, ngram, len(sentence.split()), self.options)
            candidates.append(Candidate(sentence, acoustic, ngram, 0.0, total))
        return make_nbest(candidates, limit=self.options.nbest)


class LexiconStream:
    """A streaming trial on the lexicon search: a flashlight decoder of its own (sharing the trie
    and the KenLM model) fed chunk by chunk with ``decode_step``; its best hypothesis so far is the
    partial result."""

    def __init__(self, decoder: LexiconDecoder):
        self.decoder = decoder
        self.search = decoder._new_search()
        self.search.decode_begin()

    def advance(self, logits: np.ndarray) -> str:
        o = self.decoder.options
        x = check_logits(logits)
        emissions = np.ascontiguousarray(o.acoustic_scale * frame_log_probs(x, o), dtype=np.float32)
        self.search.decode_step(emissions.ctypes.data, emissions.shape[0], N_CLASSES)
        words = self.decoder.search.words
        return " ".join(words[i] for i in self.search.get_best_hypothesis().words if i > 0)
