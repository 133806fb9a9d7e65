"""WFST decoding of LM-order logits on a ``TLG.fst`` graph (ours or a published one) with kaldi-decoder.

Scores follow :mod:`b2txt.lm.nbest` exactly. The search runs on
``acoustic_scale · frame_log_probs(logits)`` (kaldi-decoder's ``DecodableCtc`` has no scale
argument and reads column ``label − 1`` without any bounds check, hence :func:`check_logits`
first), so a path's cost is ``−(acoustic_scale · acoustic + ngram)``: its lattice weight splits
into the graph cost (``−ngram``, natural log) and the scaled acoustic cost.

- ``nbest == 1`` (no rescoring, no length penalty): ``FasterDecoder`` — the fast path, honours
  beam, max_active and min_active.
- otherwise: ``LatticeSimpleDecoder`` with lattice_beam. It has no max_active/min_active and its
  time grows steeply with the beam on big graphs, so it searches with ``min(beam, nbest_beam)``
  (``options.nbest_beam``; None: ``beam``).
  Then an exact, distinct n-best from the raw lattice:
  pruning (2, 4, … up to lattice_beam, until n sentences) → word-level projection → ε-removal →
  determinization (each sentence keeps its best path) → n shortest; each sentence is then
  re-aligned in the pruned lattice (composition with its word string, arc identities as input
  labels) for its exact acoustic and graph costs. kaldifst's ``lattice_to_nbest`` on a raw
  lattice returns alignments of one sentence, not distinct sentences, and determinizing the
  unpruned word lattice blew up to >12 GB on a 126k-word unigram graph.
- ``length_penalty`` and rescoring re-rank the lattice's candidates (``max(nbest, 100)`` of them):
  exact within lattice_beam.
- ``rescore_unpruned`` with ``G.fst`` and ``G_no_prune.fst`` in the graph directory: each
  candidate's n-gram score becomes ``ngram − G(sentence) + G_no_prune(sentence)`` (the published
  decoder's lattice rescoring, applied to the n-best).

A graph is loaded once per process and path (module cache keyed by file identity), so a
worker process can create decoders freely. The decoders hold the GIL: parallelise with processes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import kaldi_decoder
import kaldifst
import numpy as np
from kaldifst.lib._kaldifst import _ArcIteratorLattice  # kaldifst.ArcIterator rejects Lattice

from ..ground.config import DecodeConfig
from ..ground.phonemes import N_CLASSES, normalize_text
from .graph import G_FILE, G_NO_PRUNE_FILE, TLG_FILE, WORDS_FILE, GraphError, read_fst, read_words
from .nbest import Candidate, NBest, check_logits, frame_log_probs, make_nbest, total_score

#: Candidates taken from the lattice when a length penalty or rescoring may re-rank them.
RERANK_DEPTH = 100

@dataclass
class Graph:
    """A loaded graph directory: TLG, word texts by id, and optional grammars for rescoring."""

    path: Path
    tlg: kaldifst.StdVectorFst
    words: list[str]  # normalised text per word id ('' for <eps>, #0, <s>, </s>)
    unlisted: frozenset[int] = frozenset()  # ids below len(words) that words.txt does not list
    g: kaldifst.StdVectorFst | None = None
    g_no_prune: kaldifst.StdVectorFst | None = None


_CACHE: dict[tuple, Graph] = {}
_LOCK = threading.Lock()


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def load_graph(graph_dir: str | Path, with_rescoring: bool = False) -> Graph:
    """Load (once per process) ``TLG.fst`` + ``words.txt`` [+ ``G.fst``/``G_no_prune.fst``]."""
    graph_dir = Path(graph_dir)
    tlg_path = graph_dir / TLG_FILE
    if not graph_dir.is_dir():
        raise GraphError(f"{graph_dir}: graph directory not found (build one with the LM graph stage)")
    if not tlg_path.is_file():
        raise GraphError(f"{tlg_path}: decoding graph not found (a graph directory holds TLG.fst and words.txt)")
    key = (_identity(tlg_path), _identity(graph_dir / WORDS_FILE) if (graph_dir / WORDS_FILE).exists() else None)
    with _LOCK:
        graph = _CACHE.get(key)
        if graph is None:
            for old in [k for k, g in _CACHE.items() if g.path.resolve() == graph_dir.resolve()]:
                del _CACHE[old]  # the graph was rebuilt under the same path: drop the stale one
            symbols = read_words(graph_dir / WORDS_FILE)
            words = [_word_text(w) for w in symbols]
            unlisted = frozenset(i for i, w in enumerate(symbols) if not w)
            tlg = read_fst(tlg_path, "decoding graph TLG.fst")
            if tlg.start < 0 or tlg.num_states == 0:
                raise GraphError(f"{tlg_path}: the decoding graph is empty")
            graph = Graph(graph_dir, tlg, words, unlisted=unlisted)
            _CACHE[key] = graph
        if with_rescoring and graph.g is None:
            g_path, g_full_path = graph_dir / G_FILE, graph_dir / G_NO_PRUNE_FILE
            if g_path.is_file() and g_full_path.is_file():
                graph.g = _output_sorted(read_fst(g_path, "grammar G.fst"))
                graph.g_no_prune = _output_sorted(read_fst(g_full_path, "grammar G_no_prune.fst"))
    return graph


def clear_cache() -> None:
    """Forget loaded graphs (tests; a process that rebuilt a graph under the same path)."""
    with _LOCK:
        _CACHE.clear()


def _word_text(symbol: str) -> str:
    if not symbol or symbol in ("<eps>", "<s>", "</s>") or symbol.startswith("#"):
        return ""
    return normalize_text(symbol)


def _output_sorted(fst: kaldifst.StdVectorFst) -> kaldifst.StdVectorFst:
    kaldifst.arcsort(fst, sort_type="olabel")
    return fst


class WfstDecoder:
    """Decode LM-order logits ``[T, 41]`` on a graph directory into an :class:`NBest`."""

    def __init__(self, graph_dir: str | Path, options: DecodeConfig | None = None):
        self.options = options if options is not None else DecodeConfig()
        self.graph = load_graph(graph_dir, with_rescoring=self.options.rescore_unpruned)
        self._make_searchers()

    @property
    def rescoring(self) -> bool:
        return self.options.rescore_unpruned and self.graph.g is not None

    def _make_searchers(self) -> None:
        o = self.options
        self._faster = self._one_best_search()
        # LatticeSimpleDecoder has no max_active: on big graphs its time grows steeply with the
        # beam (3-gram, 126k words, soft logits: 50 s/trial at beam 17, 2.5 s at 12), so its search
        # beam is min(beam, nbest_beam) (None: beam)
        cap = o.nbest_beam
        lattice_search_beam = o.beam if cap is None else min(o.beam, cap)
        self._lattice_config = kaldi_decoder.LatticeSimpleDecoderConfig(
            beam=lattice_search_beam, lattice_beam=o.lattice_beam)

    # ------------------------------------------------------------------ decoding

    def decode(self, logits: np.ndarray) -> NBest:
        o = self.options
        x = check_logits(logits)
        scaled = np.ascontiguousarray(frame_log_probs(x, o) * np.float32(o.acoustic_scale), dtype=np.float32)
        decodable = kaldi_decoder.DecodableCtc(scaled)
        if o.nbest == 1 and o.length_penalty == 0 and not self.rescoring:
            return self._one_best(decodable)
        return self._n_best(decodable)

    def _one_best_search(self) -> kaldi_decoder.FasterDecoder:
        o = self.options
        return kaldi_decoder.FasterDecoder(self.graph.tlg, kaldi_decoder.FasterDecoderOptions(
            beam=o.beam, max_active=o.max_active, min_active=o.min_active))

    def _partial_search(self) -> kaldi_decoder.FasterDecoder:
        # No min_active: forcing 200 tokens alive costs 10x the search itself on the 3-gram graph
        # (benchmarks/server.py), and a partial is only a preview of the final n-best
        o = self.options
        return kaldi_decoder.FasterDecoder(self.graph.tlg, kaldi_decoder.FasterDecoderOptions(
            beam=o.partial_beam, max_active=o.partial_max_active, min_active=0))

    def stream(self) -> "WfstStream":
        return WfstStream(self)

    def _sentence(self, word_ids: list[int]) -> str:
        words = self.graph.words
        missing = sorted({i for i in word_ids if i >= len(words) or i in self.graph.unlisted})
        if missing:  # dropping them would turn sentences into fragments or '' without a word said
            raise GraphError(f"{self.graph.path / WORDS_FILE}: the decoding graph {TLG_FILE} outputs word id(s) "
                             f"{missing[:5]} that this words.txt ({len(words)} ids) does not list: it is not the word "
                             f"table the graph was built with; rebuild the graph (`b2txt lm graph`) or restore its "
                             "words.txt")
        return " ".join(w for w in (words[i] for i in word_ids) if w)

    def _candidate(self, word_ids: list[int], graph_cost: float, acoustic_cost: float) -> Candidate:
        o = self.options
        sentence = self._sentence(word_ids)
        acoustic = -acoustic_cost / o.acoustic_scale
        ngram = -graph_cost
        return Candidate(sentence, acoustic, ngram, 0.0, total_score(acoustic, ngram, len(sentence.split()), o))

    def _one_best(self, decodable: kaldi_decoder.DecodableCtc) -> NBest:
        self._faster.decode(decodable)
        ok, lat = self._faster.get_best_path()
        if not ok or lat.num_states == 0:
            return NBest(())
        ok, _, olabels, weight = kaldifst.get_linear_symbol_sequence(lat)
        if not ok:
            return NBest(())
        return make_nbest([self._candidate([w for w in olabels if w], weight.value1, weight.value2)])

    def _n_best(self, decodable: kaldi_decoder.DecodableCtc) -> NBest:
        o = self.options
        # A lattice search of its own per trial (~3 µs to make): a reused LatticeSimpleDecoder keeps
        # state between trials, and on the 126k-word 3-gram the n-best of a trial then depended on
        # which trials the decoder had seen before (1 of the default run's 140 val lists).
        search = kaldi_decoder.LatticeSimpleDecoder(self.graph.tlg, self._lattice_config)
        search.decode(decodable)
        ok, lat = search.get_raw_lattice()
        if not ok or lat.num_states == 0 or lat.start < 0:
            return NBest(())
        depth = max(o.nbest, RERANK_DEPTH) if (o.length_penalty != 0 or self.rescoring) else o.nbest
        arcs = _LatticeArcs(lat)
        candidates = []
        for word_ids in arcs.distinct_word_sequences(depth, o.lattice_beam):
            graph_cost, acoustic_cost = arcs.best_split(word_ids)
            if self.rescoring:
                graph_cost += self._g_delta(word_ids)
            candidates.append(self._candidate(word_ids, graph_cost, acoustic_cost))
        return make_nbest(candidates, limit=o.nbest)

    def _g_delta(self, word_ids: list[int]) -> float:
        """Graph-cost change from the pruned to the unpruned grammar for one word sequence."""
        assert self.graph.g is not None and self.graph.g_no_prune is not None
        old = _sequence_cost(self.graph.g, word_ids)
        new = _sequence_cost(self.graph.g_no_prune, word_ids)
        if old is None or new is None:
            return 0.0
        return new - old


def _sequence_cost(g: kaldifst.StdVectorFst, word_ids: list[int]) -> float | None:
    """Best cost of a word sequence in a grammar (its output side; back-off arcs are ε there)."""
    path = kaldifst.shortest_path(kaldifst.compose(g, kaldifst.make_linear_acceptor(word_ids)), 1)
    if path.num_states == 0:
        return None
    ok, _, _, weight = kaldifst.get_linear_symbol_sequence(path)
    return float(weight.value) if ok else None


class _LatticeArcs:
    """A raw lattice as arrays, pruned on demand, with the two views the exact n-best needs.

    Every lattice arc (and final weight) gets an identity ``k ≥ 1``; ``acceptor`` is the lattice
    with labels ``k:k`` and total costs. Because those labels are unique, OpenFst's pruned
    determinization of it *is* pruning (in C++): what survives a threshold ``w`` are the arcs on
    paths within ``w`` of the best. From the survivors, a word acceptor (for distinct sentences)
    and an identity→word transducer (for each sentence's best path and its exact cost split)
    are built; both are far smaller than the raw lattice, which keeps ε-removal, determinization
    and re-alignment cheap on big graphs.
    """

    def __init__(self, lat: kaldifst.Lattice):
        graph, acoustic, words = [0.0], [0.0], [0]  # index 0 unused (label 0 is epsilon)
        acc = kaldifst.StdVectorFst()
        n = lat.num_states
        for _ in range(n + 1):
            acc.add_state()
        super_final = n
        acc.set_final(super_final, 0.0)
        acc.start = lat.start
        for s in range(n):
            it = _ArcIteratorLattice(lat, s)
            while not it.done:
                arc = it.value
                it.next()
                w = arc.weight
                k = len(graph)
                graph.append(w.value1)
                acoustic.append(w.value2)
                words.append(arc.olabel)
                acc.add_arc(s, kaldifst.StdArc(k, k, w.value1 + w.value2, arc.nextstate))
            final = lat.final(s)
            if final != kaldifst.LatticeWeight.zero:
                k = len(graph)
                graph.append(final.value1)
                acoustic.append(final.value2)
                words.append(0)
                acc.add_arc(s, kaldifst.StdArc(k, k, final.value1 + final.value2, super_final))
        self.acceptor = acc
        self.graph_costs = np.asarray(graph, dtype=np.float64)
        self.acoustic_costs = np.asarray(acoustic, dtype=np.float64)
        self.word_of = words
        self.index: kaldifst.StdVectorFst | None = None

    def _pruned_views(self, threshold: float) -> tuple[kaldifst.StdVectorFst, kaldifst.StdVectorFst]:
        pruned = kaldifst.determinize(self.acceptor, weight=f"{threshold:.6g}")
        words = kaldifst.StdVectorFst()
        index = kaldifst.StdVectorFst()
        for _ in range(pruned.num_states):
            words.add_state()
            index.add_state()
        words.start = index.start = pruned.start
        for s in range(pruned.num_states):
            for arc in kaldifst.ArcIterator(pruned, s):
                word = self.word_of[arc.ilabel]
                words.add_arc(s, kaldifst.StdArc(word, word, arc.weight, arc.nextstate))
                index.add_arc(s, kaldifst.StdArc(arc.ilabel, word, arc.weight, arc.nextstate))
            final = pruned.final(s)
            if final != kaldifst.TropicalWeight.zero:
                words.set_final(s, final)
                index.set_final(s, final)
        kaldifst.arcsort(index, sort_type="olabel")
        return words, index

    def distinct_word_sequences(self, n: int, max_threshold: float) -> list[list[int]]:
        """The ``n`` best distinct word sequences within ``max_threshold`` of the best path.

        Thresholds grow (2, 4, 8, … up to ``max_threshold`` = lattice_beam) until ``n``
        sentences are found: the cost of determinization grows steeply with the threshold.
        """
        threshold = min(2.0, max_threshold)
        while True:
            words, index = self._pruned_views(threshold)
            kaldifst.rmepsilon(words)
            det = kaldifst.determinize(words, weight=f"{threshold:.6g}")
            out = []
            for path in kaldifst.convert_nbest_to_vector(kaldifst.shortest_path(det, n)):
                ok, labels, _, _ = kaldifst.get_linear_symbol_sequence(path)
                if ok:
                    out.append([w for w in labels if w])
            if len(out) >= n or threshold >= max_threshold:
                self.index = index
                return out
            threshold = min(2 * threshold, max_threshold)

    def best_split(self, word_ids: list[int]) -> tuple[float, float]:
        """(graph cost, scaled acoustic cost) of the best lattice path that outputs ``word_ids``."""
        assert self.index is not None, "call distinct_word_sequences first"
        path = kaldifst.shortest_path(kaldifst.compose(self.index, kaldifst.make_linear_acceptor(word_ids)), 1)
        ok, arc_ids, _, _ = kaldifst.get_linear_symbol_sequence(path)
        if not ok or path.num_states == 0:
            raise GraphError("internal: a sentence of the lattice's n-best has no path in the lattice")
        idx = np.asarray([a for a in arc_ids if a], dtype=np.int64)
        return float(self.graph_costs[idx].sum()), float(self.acoustic_costs[idx].sum())


def graph_files(graph_dir: str | Path) -> list[Path]:
    """The files of a graph directory a decode stage depends on (for Snakemake/DVC inputs)."""
    graph_dir = Path(graph_dir)
    optional = [graph_dir / G_FILE, graph_dir / G_NO_PRUNE_FILE]
    return [graph_dir / TLG_FILE, graph_dir / WORDS_FILE, *(p for p in optional if p.exists())]


__all__ = ["Graph", "WfstDecoder", "clear_cache", "graph_files", "load_graph"]


class WfstStream:
    """A streaming trial on the WFST: a FasterDecoder of its own over the shared TLG graph,
    advanced chunk by chunk (kaldi's ``AdvanceDecoding``) with the cheaper partial options
    (``partial_beam``, ``partial_max_active``); its best path is the partial result."""

    def __init__(self, decoder: WfstDecoder):
        self.decoder = decoder
        self.search = decoder._partial_search()
        self.search.init_decoding()
        self.frames = np.zeros((0, N_CLASSES), dtype=np.float32)

    def advance(self, logits: np.ndarray) -> str:
        o = self.decoder.options
        x = check_logits(logits)
        scaled = (frame_log_probs(x, o) * np.float32(o.acoustic_scale)).astype(np.float32)
        # DecodableCtc reads a fixed matrix: hand it every frame so far; the search resumes at
        # the first frame it has not decoded
        self.frames = np.ascontiguousarray(np.concatenate([self.frames, scaled]))
        self.search.advance_decoding(kaldi_decoder.DecodableCtc(self.frames))
        ok, lat = self.search.get_best_path(use_final_probs=False)
        if not ok or lat.num_states == 0:
            return ""
        ok, _, olabels, _ = kaldifst.get_linear_symbol_sequence(lat)
        return self.decoder._sentence([w for w in olabels if w]) if ok else ""
