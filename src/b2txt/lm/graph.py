"""The WFST decoding graph ``TLG.fst`` (+ ``words.txt``, ``tokens.txt``, ``G.fst``) in the published layout.

A graph directory we build is interchangeable with the published ones
(``openwebtext_1gram_lm_sil``, the Dryad 3-/5-gram archives; built by the WeNet-style scripts of
``Neuroprosthetics-Lab/nejm-brain-to-text``), because it follows the same conventions:

- ``tokens.txt``: ``<eps> 0``, ``<blk> 1``, ``SIL 2``, ``AA 3`` … ``ZH 41``, then ``#0`` ``#1`` … —
  the graph's input label is the LM-order logit column + 1 (REFERENCE §2); the published
  directories may omit this file, it documents the labels;
- ``words.txt``: ``<eps> 0``, the lexicon's words in upper case (the published CMU-dict
  convention), then ``#0``, ``<s>``, ``</s>``. Decoders lower-case and normalise what they read, so
  either case works; ``<unk>`` is not a word of the graph (it cannot be pronounced);
- ``TLG.fst``: OpenFst binary, tropical ``vector`` FST = T ∘ det(L ∘ G), costs in natural logs;
- ``G.fst`` and ``G_no_prune.fst`` (the latter from an unpruned ARPA, when given): the grammar
  for n-best rescoring (``G.fst`` is the graph's own LM, whose cost rescoring subtracts).

Construction (FIELD-NOTES §WFST; Kaldi/WeNet recipes):

- T: the *corrected* CTC topology (a token repeated without a blank in between is one token;
  a blank separates two real repeats), with ``#k`` passed through (ε:#k) at every state;
- L: every pronunciation variant of a word (stress-free CMU dict), the word on the first phone;
  homophones and pronunciations that are prefixes of others get ``#1``, ``#2`` …; an optional
  ``SIL`` after every word and at the start. ``sil_prob=None`` (default) makes SIL free both
  ways, so a path's graph cost is exactly its n-gram cost (what :class:`~b2txt.lm.nbest.Candidate`
  calls ``ngram``); a probability ``p`` gives Kaldi's costs ``-ln p`` / ``-ln(1-p)`` instead;
  ``#0`` self-loops carry G's back-off disambiguation symbol through L;
- G: :func:`kaldilm.arpa2fst` with ``#0`` on back-off arcs, read against our own word table
  (without it kaldilm renumbers words);
- LG = arcsort(minimize_encoded(determinize_star(L ∘ G))); TLG = T ∘ LG, arcsorted on input.

ARPA words the lexicon cannot pronounce (``<unk>``, or words of a foreign ARPA) cannot be in the
graph: they are skipped and counted in ``graph.json``; more than half of the ARPA's words being
unpronounceable is an error listing some (a lexicon/ARPA mismatch, e.g. another language).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import kaldifst
import kaldilm

from ..ground.errors import B2txtError
from ..ground.fileio import atomic_dir
from ..ground.phonemes import LM_ORDER, N_CLASSES, PHONEMES, SIL, Lexicon
from .ngram import ngram_paths, read_arpa_counts

BLANK_TOKEN = "<blk>"
EPS = "<eps>"
#: Tokens 1..41 in LM column order: label = column + 1.
TOKENS: tuple[str, ...] = (BLANK_TOKEN, SIL, *PHONEMES)
assert len(TOKENS) == N_CLASSES and LM_ORDER[1] == N_CLASSES - 1
TOKEN_ID: dict[str, int] = {t: i + 1 for i, t in enumerate(TOKENS)}
SPECIAL_WORDS = ("#0", "<s>", "</s>")
ARPA_SPECIAL = frozenset({"<s>", "</s>", "<unk>", "<UNK>"})

TLG_FILE = "TLG.fst"
WORDS_FILE = "words.txt"
TOKENS_FILE = "tokens.txt"
G_FILE = "G.fst"
G_NO_PRUNE_FILE = "G_no_prune.fst"
INFO_FILE = "graph.json"
#: What a graph build writes; an LM directory's other files are the n-gram's.
GRAPH_FILES = frozenset({TLG_FILE, WORDS_FILE, TOKENS_FILE, G_FILE, G_NO_PRUNE_FILE, INFO_FILE})


class GraphError(B2txtError):
    """A decoding graph cannot be built or read."""


@dataclass
class GraphStats:
    """What :func:`build_graph` did (saved as ``graph.json`` in the graph directory)."""

    arpa: str = ""
    unpruned_arpa: str | None = None
    order: int = 0
    ngram_counts: dict[int, int] = field(default_factory=dict)
    lexicon_words: int = 0
    graph_words: int = 0  # words of the ARPA that the graph can output
    pronunciations: int = 0
    disambig_symbols: int = 0
    skipped_words: int = 0  # ARPA words without a pronunciation (<s>, </s> not counted)
    skipped_examples: list[str] = field(default_factory=list)
    sil_prob: float | None = None
    tlg_states: int = 0
    tlg_arcs: int = 0
    lg_states: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- symbol tables

def word_symbols(lexicon: Lexicon) -> list[str]:
    """words.txt symbols by id: ``<eps>``, upper-cased lexicon words (sorted), ``#0 <s> </s>``."""
    return [EPS, *sorted(w.upper() for w in lexicon.pronunciations), *SPECIAL_WORDS]


def write_symbols(path: Path, symbols: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, s in enumerate(symbols):
            f.write(f"{s} {i}\n")


def read_words(path: str | Path) -> list[str]:
    """``words.txt`` as a list indexed by id (gaps are ``''``); clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: word table not found (a graph directory holds TLG.fst and words.txt)")
    table: dict[int, str] = {}
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"line {n}: expected 'word id', got {line!r}")
            table[int(parts[1])] = parts[0]
    except (ValueError, UnicodeDecodeError) as exc:
        raise GraphError(f"{path}: not a word table ({exc})") from None
    if not table or table.get(0) != EPS:
        raise GraphError(f"{path}: not a word table (id 0 must be {EPS})")
    out = [""] * (max(table) + 1)
    for i, w in table.items():
        out[i] = w
    return out


def token_symbols(n_disambig: int) -> list[str]:
    return [EPS, *TOKENS, *(f"#{k}" for k in range(n_disambig + 1))]


# ----------------------------------------------------------------------------- FST pieces

def read_fst(path: str | Path, what: str = "FST") -> kaldifst.StdVectorFst:
    """Read an OpenFst file; kaldifst returns None (and prints) on failure: raise instead."""
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"{path}: {what} not found")
    fst = kaldifst.StdVectorFst.read(str(path))
    if fst is None:
        raise GraphError(f"{path}: cannot read {what} (not an OpenFst vector FST with tropical "
                         f"weights, or truncated)")
    return fst


def write_fst(fst: kaldifst.StdVectorFst, path: Path) -> None:
    if not fst.write(str(path)):
        raise GraphError(f"{path}: cannot write FST")


def ctc_topology(n_disambig: int) -> kaldifst.StdVectorFst:
    """T: CTC tokens (input) -> phones (output), the corrected topology.

    State 0: nothing emitted yet or after a blank; state k: just emitted token k. A token
    repeated without a blank stays one token; ``#0…#n`` pass through as ε:#k everywhere.
    Input labels are token ids (LM column + 1); output labels are the same ids (L's input).
    """
    t = kaldifst.StdVectorFst()
    states = [t.add_state() for _ in range(len(TOKENS))]  # 0 = blank state, k-1 = after token k
    t.start = states[0]
    blank = TOKEN_ID[BLANK_TOKEN]
    real = [TOKEN_ID[x] for x in TOKENS[1:]]
    disambig = [len(TOKENS) + 1 + k for k in range(n_disambig + 1)]
    for s in states:
        t.set_final(s, 0.0)
    t.add_arc(states[0], kaldifst.StdArc(blank, 0, 0.0, states[0]))
    for k in real:
        sk = states[k - 1]
        t.add_arc(states[0], kaldifst.StdArc(k, k, 0.0, sk))
        t.add_arc(sk, kaldifst.StdArc(k, 0, 0.0, sk))  # the same token again: no new phone
        t.add_arc(sk, kaldifst.StdArc(blank, 0, 0.0, states[0]))
        for j in real:
            if j != k:
                t.add_arc(sk, kaldifst.StdArc(j, j, 0.0, states[j - 1]))
    for s in states:
        for d in disambig:
            t.add_arc(s, kaldifst.StdArc(0, d, 0.0, s))
    kaldifst.arcsort(t, sort_type="olabel")
    return t


def disambiguate(prons: Sequence[tuple[str, tuple[str, ...]]]) -> tuple[list[int], int]:
    """Kaldi's lexicon disambiguation: ``#k`` (k ≥ 1; 0 = none) per entry, and the largest k.

    An entry needs one when its pronunciation is shared (homophones: #1, #2, …) or is a proper
    prefix of another pronunciation; otherwise L ∘ G is not determinizable.
    """
    count = Counter(p for _, p in prons)
    prefixes: set[tuple[str, ...]] = set()
    for p in count:
        for n in range(1, len(p)):
            prefixes.add(p[:n])
    used: Counter[tuple[str, ...]] = Counter()
    out = []
    for _, p in prons:
        if count[p] > 1 or p in prefixes:
            used[p] += 1
            out.append(used[p])
        else:
            out.append(0)
    return out, max(out, default=0)


def lexicon_fst(prons: Sequence[tuple[int, tuple[str, ...]]], disambig: Sequence[int], n_disambig: int,
                word_disambig: int, sil_prob: float | None) -> kaldifst.StdVectorFst:
    """L: phones (token ids) -> words, optional SIL after every word and at the start.

    ``prons``: (word id, phones) pairs; ``disambig``: #k per entry (0 = none).
    """
    if sil_prob is None:
        sil_cost = nosil_cost = 0.0
    else:
        if not 0.0 < sil_prob < 1.0:
            raise GraphError(f"sil_prob must be in (0, 1) or None (free), got {sil_prob}")
        sil_cost, nosil_cost = -math.log(sil_prob), -math.log(1.0 - sil_prob)
    sil = TOKEN_ID[SIL]
    first_disambig = len(TOKENS) + 1  # token id of #0
    lex = kaldifst.StdVectorFst()
    start, loop, sil_state = lex.add_state(), lex.add_state(), lex.add_state()
    lex.start = start
    lex.set_final(loop, 0.0)
    lex.add_arc(start, kaldifst.StdArc(0, 0, nosil_cost, loop))
    lex.add_arc(start, kaldifst.StdArc(sil, 0, sil_cost, loop))
    lex.add_arc(sil_state, kaldifst.StdArc(sil, 0, 0.0, loop))
    for (word, phones), k in zip(prons, disambig):
        labels = [TOKEN_ID[p] for p in phones]
        if k:
            labels.append(first_disambig + k)
        src = loop
        for i, label in enumerate(labels[:-1]):
            nxt = lex.add_state()
            lex.add_arc(src, kaldifst.StdArc(label, word if i == 0 else 0, 0.0, nxt))
            src = nxt
        out = word if len(labels) == 1 else 0
        lex.add_arc(src, kaldifst.StdArc(labels[-1], out, nosil_cost, loop))
        lex.add_arc(src, kaldifst.StdArc(labels[-1], out, sil_cost, sil_state))
    # G's back-off symbol #0 must pass through L (token #0 : word #0)
    kaldifst.add_self_loops(lex, [first_disambig], [word_disambig])
    kaldifst.arcsort(lex, sort_type="olabel")
    return lex


def arpa_words(arpa: Path) -> list[str]:
    """The words of an ARPA's unigram section (in file order)."""
    words = []
    with arpa.open(encoding="utf-8") as f:
        inside = False
        for line in f:
            if line.startswith("\\1-grams:"):
                inside = True
                continue
            if inside:
                if line.startswith("\\"):
                    break
                cols = line.split()
                if len(cols) >= 2:
                    words.append(cols[1])
    return words


def grammar_fst(arpa: Path, symbols_in_arpa_case: Path, out: Path) -> None:
    """G.fst with ``#0`` on back-off arcs, word ids from our table; n-grams with OOV words skipped."""
    try:
        kaldilm.arpa2fst(str(arpa), output_fst=str(out), disambig_symbol="#0",
                         read_symbol_table=str(symbols_in_arpa_case), max_arpa_warnings=0)
    except Exception as exc:  # kaldilm raises RuntimeError with Kaldi's message
        raise GraphError(f"{arpa}: cannot convert the ARPA to an FST: {exc}") from None
    if not out.is_file():
        raise GraphError(f"{arpa}: kaldilm.arpa2fst wrote no FST")


# ----------------------------------------------------------------------------- the build

def build_graph(arpa: str | Path, out_dir: str | Path, lexicon: Lexicon, *,
                unpruned_arpa: str | Path | None = None, sil_prob: float | None = None,
                max_unpronounceable: float = 0.5) -> GraphStats:
    """Build a graph directory (TLG.fst, words.txt, tokens.txt, G.fst [, G_no_prune.fst], graph.json).

    Built in a temporary directory beside ``out_dir`` that replaces it whole
    (:func:`~b2txt.ground.fileio.atomic_dir`): a failed or killed build leaves the previous
    directory as it was, never half a graph nor a graph beside another LM; the other files of
    ``out_dir`` (``lm.arpa``, ``lm.bin``) are carried over, an earlier graph's are not. ``max_unpronounceable``:
    the share of ARPA words without a pronunciation above which the build stops (mismatch).
    """
    arpa, out_dir = Path(arpa), Path(out_dir)
    counts = read_arpa_counts(arpa)
    if unpruned_arpa is not None:
        read_arpa_counts(unpruned_arpa)
    stats = GraphStats(arpa=str(arpa), unpruned_arpa=str(unpruned_arpa) if unpruned_arpa else None,
                       order=max(counts), ngram_counts=counts, lexicon_words=len(lexicon),
                       sil_prob=sil_prob)
    clock = time.perf_counter()

    symbols = word_symbols(lexicon)
    word_id = {w: i for i, w in enumerate(symbols)}
    # ARPA words -> lexicon entries, case-insensitively (ours are lower case, the published upper)
    in_arpa: dict[str, str] = {}  # lexicon word -> spelling in the ARPA
    skipped: list[str] = []
    words_seen = 0
    for w in arpa_words(arpa):
        if w in ARPA_SPECIAL:
            if w.lower() == "<unk>":
                skipped.append(w)
            continue
        words_seen += 1
        key = w.lower()
        if key in lexicon and key not in in_arpa:
            in_arpa[key] = w
        else:
            skipped.append(w)
    stats.skipped_words, stats.skipped_examples = len(skipped), skipped[:20]
    stats.graph_words = len(in_arpa)
    if not in_arpa or (words_seen and len(in_arpa) < (1 - max_unpronounceable) * words_seen):
        foreign = [w for w in skipped if w not in ARPA_SPECIAL]
        raise GraphError(f"{arpa}: {len(foreign)} of {words_seen} words have no pronunciation in the "
                         f"lexicon (e.g. {', '.join(foreign[:15])}); is this ARPA from another "
                         f"vocabulary or language?")

    prons = [(word_id[key.upper()], p) for key in sorted(in_arpa) for p in lexicon.pronunciations[key]]
    disambig, n_disambig = disambiguate([(str(w), p) for w, p in prons])
    stats.pronunciations, stats.disambig_symbols = len(prons), n_disambig + 1

    with atomic_dir(out_dir, keep=lambda name: name not in GRAPH_FILES) as tmp:
        write_symbols(tmp / WORDS_FILE, symbols)
        write_symbols(tmp / TOKENS_FILE, token_symbols(n_disambig))
        # arpa2fst matches words exactly: give it our ids under the ARPA's spelling
        arpa_table = tmp / ".words.arpa-case.txt"
        write_symbols_map(arpa_table, {EPS: 0, **{spelled: word_id[key.upper()] for key, spelled in in_arpa.items()},
                                       **{s: word_id[s] for s in SPECIAL_WORDS}})
        grammar_fst(arpa, arpa_table, tmp / G_FILE)
        if unpruned_arpa is not None:
            grammar_fst(Path(unpruned_arpa), arpa_table, tmp / G_NO_PRUNE_FILE)
        arpa_table.unlink()
        stats.seconds["G"] = round(time.perf_counter() - clock, 3)

        g = read_fst(tmp / G_FILE, "grammar G.fst")
        kaldifst.arcsort(g, sort_type="ilabel")
        lex = lexicon_fst(prons, disambig, n_disambig, word_id["#0"], sil_prob)
        stats.seconds["L"] = round(time.perf_counter() - clock - sum(stats.seconds.values()), 3)

        lg = kaldifst.compose(lex, g)
        del lex, g
        if kaldifst.determinize_star(lg, use_log=True):
            raise GraphError(f"{arpa}: determinization of L∘G stopped early")
        kaldifst.minimize_encoded(lg)
        kaldifst.arcsort(lg, sort_type="ilabel")
        stats.lg_states = lg.num_states
        stats.seconds["LG"] = round(time.perf_counter() - clock - sum(stats.seconds.values()), 3)

        tlg = kaldifst.compose(ctc_topology(n_disambig), lg)
        del lg
        kaldifst.arcsort(tlg, sort_type="ilabel")
        stats.tlg_states = tlg.num_states
        stats.tlg_arcs = sum(tlg.num_arcs(s) for s in range(tlg.num_states))
        if stats.tlg_states == 0:
            raise GraphError(f"{arpa}: the decoding graph is empty (no ARPA word can be pronounced?)")
        write_fst(tlg, tmp / TLG_FILE)
        del tlg
        stats.seconds["TLG"] = round(time.perf_counter() - clock - sum(stats.seconds.values()), 3)
        stats.seconds["total"] = round(time.perf_counter() - clock, 3)
        (tmp / INFO_FILE).write_text(json.dumps(asdict(stats), indent=2) + "\n")
    return stats


def build_graph_from_arpa(arpa: str | Path, out_dir: str | Path, lexicon: Lexicon, *,
                          sil_prob: float | None = None) -> GraphStats:
    """The graph of an ARPA LM into ``out_dir``, with ``G_no_prune.fst`` when the unpruned ARPA
    (``lm.unpruned.arpa``, from ``b2txt lm ngram`` with pruning) lies beside it."""
    arpa = Path(arpa)
    unpruned = arpa.with_name(ngram_paths(arpa.parent)[2].name)
    return build_graph(arpa, out_dir, lexicon, unpruned_arpa=unpruned if unpruned.is_file() else None,
                       sil_prob=sil_prob)


def write_symbols_map(path: Path, table: dict[str, int]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for s, i in sorted(table.items(), key=lambda kv: kv[1]):
            f.write(f"{s} {i}\n")
