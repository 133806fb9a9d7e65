"""Bring your own language model: an ARPA file made by any tool, checked and normalised (``b2txt lm import``).

The published language models were estimated with SRILM and spell their words in upper case
(REFERENCE §1, §4); a lab's own LM may come from SRILM, KenLM or another toolkit.
:func:`import_arpa` turns any of them into the two files of an LM directory of ours, ``lm.arpa``
and ``lm.bin`` (KenLM ``build_binary``), so that ``b2txt lm graph`` and both decoders take it like
an LM built here:

- the file is read once, streaming, and checked as it goes: the ``\\data\\`` header, the sections
  in order, every entry's fields (a log10 probability, N words, a back-off weight below the top
  order) and each section's size against the header. A foreign, truncated or damaged file is one
  :class:`ArpaError` naming the file and the line;
- words are lower-cased: the lexicon, the LM text and lmplz's ARPAs are lower case, and the lexicon
  decoder asks KenLM for lower-case words (an upper-case ``lm.bin`` would know none of them). The
  graph's ``words.txt`` is upper case either way, as published (:mod:`b2txt.lm.graph`). Two
  spellings that become one word (``US`` and ``us``) would make duplicate n-grams: an error
  naming both;
- ``.gz``, ``.bz2`` and ``.xz`` files are read decompressed; the text must be UTF-8. Numbers are
  copied as written (no rounding).

Both files are made in a temporary directory inside the output directory and moved into place
only when the binary is built too: a failure leaves the previous files (or none).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

from ..ground.errors import B2txtError
from ..ground.fileio import atomic_dir
from .ngram import DEFAULT_KENLM_DIR, ToolError, build_binary, find_tool, ngram_paths

_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_COUNT_RE = re.compile(r"ngram\s+(\d+)\s*=\s*(\d+)")


class ArpaError(B2txtError):
    """An ARPA file cannot be read or is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class ImportedLM:
    """What :func:`import_arpa` wrote."""

    source: Path
    arpa: Path
    binary: Path
    counts: dict[int, int]  # {order: n-grams}
    recased: int  # unigrams whose spelling lower-casing changed

    def summary(self) -> str:
        sizes = ", ".join(f"{c:,} {n}-grams" for n, c in self.counts.items())
        return f"{self.source} -> {self.arpa.name} + {self.binary.name}: {sizes}; {self.recased:,} words lower-cased"


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a plain or compressed file; read errors name the line reached."""
    opener = _OPENERS.get(path.suffix.lower(), open)
    n = 0
    try:
        with opener(path, "rb") as f:
            for raw in f:
                n += 1
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ArpaError(f"{path}: line {n}: not UTF-8 text (an ARPA file is text: a KenLM binary, or "
                                    f"another encoding?)") from None
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise ArpaError(f"{path}: line {n + 1}: cannot read on ({exc}); a damaged or truncated file?") from None


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


class _Normaliser:
    """The state of one pass over an ARPA file: the header's counts, the section being read."""

    def __init__(self, source: Path, out: TextIO) -> None:
        self.source, self.out = source, out
        self.counts: dict[int, int] = {}
        self.order = 0  # the section being read (0: the \data\ header)
        self.found = 0  # its entries so far
        self.spelling: dict[str, str] = {}  # lower-cased unigram -> its spelling in the file
        self.recased = 0

    def fail(self, n: int, what: str) -> NoReturn:
        raise ArpaError(f"{self.source}: line {n}: {what}")

    def boundary(self, n: int, line: str) -> bool:
        """A ``\\N-grams:`` or ``\\end\\`` line: close the current part. True at ``\\end\\``."""
        if self.order == 0:
            if not self.counts:
                self.fail(n, "the \\data\\ header declares no 'ngram N=COUNT' sizes")
            self.out.writelines(f"ngram {k}={c}\n" for k, c in self.counts.items())
        elif self.found != self.counts[self.order]:
            self.fail(n, f"the {self.order}-grams section ends after {self.found:,} entries; the header declares "
                         f"{self.counts[self.order]:,} (a truncated or edited file?)")
        top = max(self.counts)
        expected = "\\end\\" if self.order == top else f"\\{self.order + 1}-grams:"
        if line != expected:
            self.fail(n, f"expected {expected}, found {_shown(line)}")
        if self.order == top:
            self.out.write("\n\\end\\\n")
            return True
        self.order, self.found = self.order + 1, 0
        self.out.write(f"\n\\{self.order}-grams:\n")
        return False

    def count(self, n: int, line: str) -> None:
        """An ``ngram N=COUNT`` line of the header."""
        m = _COUNT_RE.fullmatch(line)
        if m is None:
            self.fail(n, f"expected 'ngram N=COUNT' in the \\data\\ header, found {_shown(line)}")
        order, size = int(m.group(1)), int(m.group(2))
        if order != len(self.counts) + 1:
            self.fail(n, f"'ngram {order}=' out of order: the header's sizes go 1, 2, 3, …")
        self.counts[order] = size

    def entry(self, n: int, line: str) -> None:
        """One n-gram: ``log10 prob``, the words, a back-off weight below the top order."""
        fields = line.split()
        order, top = self.order, max(self.counts)
        if len(fields) not in (order + 1, order + 2) or (len(fields) == order + 2 and order == top):
            backoff = " and perhaps a back-off weight" if order < top else ""
            self.fail(n, f"a {order}-gram entry is a log10 probability and {order} word(s){backoff}; "
                         f"found {_shown(line)}")
        try:
            for number in (fields[0], *fields[order + 1:]):
                float(number)
        except ValueError:
            self.fail(n, f"not a number in the {order}-gram entry {_shown(line)}")
        words = [w.lower() for w in fields[1:order + 1]]
        if order == 1:
            first = self.spelling.setdefault(words[0], fields[1])
            if first != fields[1]:
                self.fail(n, f"{first!r} and {fields[1]!r} are one word in lower case (the decoders' case): "
                             "their n-grams would clash; lower-case the LM's text and estimate it again")
            self.recased += fields[1] != words[0]
        self.found += 1
        if self.found > self.counts[order]:
            self.fail(n, f"more {order}-grams than the {self.counts[order]:,} the header declares")
        self.out.write("\t".join((fields[0], " ".join(words), *fields[order + 1:])) + "\n")


def normalise_arpa(source: str | Path, out: TextIO) -> tuple[dict[int, int], int]:
    """Check the ARPA ``source`` and write it to ``out`` with lower-case words, tab-separated.

    Returns the header's sizes ``{order: n-grams}`` and how many unigram spellings changed. Only
    blank lines may come before ``\\data\\`` (as SRILM and KenLM write it); what follows
    ``\\end\\`` is ignored.
    """
    source = Path(source)
    state = _Normaliser(source, out)
    started = ended = False
    n = 0
    for n, text in _read_lines(source):
        line = text.strip().lstrip("\ufeff") if n == 1 else text.strip()
        if not line:
            continue
        if not started:
            if line != "\\data\\":
                state.fail(n, f"not an ARPA language model: expected the \\data\\ header, found {_shown(line)}")
            out.write("\\data\\\n")
            started = True
        elif line.startswith("\\"):
            if state.boundary(n, line):
                ended = True
                break
        elif state.order == 0:
            state.count(n, line)
        else:
            state.entry(n, line)
    if not started:
        where = "the file is empty" if n == 0 else f"line {n}: only blank lines"
        raise ArpaError(f"{source}: not an ARPA language model: {where}, no \\data\\ header")
    if not ended:
        inside = f"the {state.order}-grams section" if state.order else "the \\data\\ header"
        raise ArpaError(f"{source}: line {n}: the file ends inside {inside}, without \\end\\ (truncated?)")
    return state.counts, state.recased


def import_arpa(source: str | Path, out_dir: str | Path, *, memory: str = "20%",
                kenlm_dir: str | Path | None = DEFAULT_KENLM_DIR) -> ImportedLM:
    """``out_dir/lm.arpa`` (checked, lower-cased) and ``out_dir/lm.bin`` from the ARPA ``source``.

    ``out_dir`` is built beside its old self and replaced whole: nothing of an earlier LM stays
    (a stale ``lm.unpruned.arpa`` would make ``b2txt lm graph`` build ``G_no_prune.fst`` from
    another LM, a stale TLG.fst would decode with it), and a bad ARPA leaves no ``out_dir``.
    """
    source, out_dir = Path(source), Path(out_dir)
    arpa, binary = ngram_paths(out_dir)[:2]
    if not source.is_file():
        raise ArpaError(f"{source}: ARPA file not found")
    if arpa.exists() and source.resolve() == arpa.resolve():
        raise ArpaError(f"{source}: this is the import's own output; give the original ARPA file")
    find_tool("build_binary", kenlm_dir)  # before the long read, not after it
    with atomic_dir(out_dir) as tmp:  # swapped in whole: no old graph stays beside the new LM
        tmp_arpa, tmp_binary = ngram_paths(tmp)[:2]
        with tmp_arpa.open("w", encoding="utf-8") as f:
            counts, recased = normalise_arpa(source, f)
        try:
            build_binary(tmp_arpa, tmp_binary, memory=memory, kenlm_dir=kenlm_dir)
        except ToolError as exc:
            raise ToolError(f"{source}: KenLM's build_binary refused the checked ARPA: {exc}") from None
    return ImportedLM(source, arpa, binary, counts, recased)
