"""English sentences for the simulator and the language models, from text on this machine.

The default source is Debian's ``fortunes`` package (BSD licence; quotations, proverbs and
jokes in modern English), installed by the bootstrap. Any plain-text file (one or more
sentences per line, or ``%``-separated records as in fortune files) can be used instead.
Sentences are normalised (:func:`b2txt.ground.phonemes.normalize_text`) and kept only when every
word is in the pronunciation lexicon and the length is within limits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..ground.errors import B2txtError
from ..ground.fileio import atomic_file
from ..ground.phonemes import Lexicon, normalize_text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|[.!?]+$|\n\s*\n")
_ATTRIBUTION = re.compile(r"^\s*(--|—)")


def records(text: str) -> Iterator[str]:
    """Split fortune-style text on lines holding a single ``%``; plain text is one record."""
    yield from re.split(r"^%\s*$", text, flags=re.MULTILINE)


def sentences_in(record: str) -> Iterator[str]:
    """Raw sentences of one record, without attribution lines (``-- Author``)."""
    lines = [ln for ln in record.splitlines() if not _ATTRIBUTION.match(ln)]
    body = "\n".join(lines)
    for part in _SENTENCE_END.split(body):
        part = " ".join(part.split())
        if part:
            yield part


@dataclass
class CorpusStats:
    candidates: int = 0
    kept: int = 0
    dropped_digits: int = 0
    dropped_length: int = 0
    dropped_oov: int = 0
    duplicates: int = 0

    def summary(self) -> str:
        return (f"{self.kept} sentences kept of {self.candidates} candidates "
                f"(dropped: {self.dropped_oov} with out-of-lexicon words, {self.dropped_length} "
                f"outside the length limits, {self.dropped_digits} with digits, "
                f"{self.duplicates} duplicates)")


def extract_sentences(texts: Iterable[str], lexicon: Lexicon, min_words: int, max_words: int,
                      stats: CorpusStats | None = None) -> list[str]:
    """Normalised, pronounceable, de-duplicated sentences in order of first appearance."""
    stats = stats if stats is not None else CorpusStats()
    seen: set[str] = set()
    out: list[str] = []
    for text in texts:
        for record in records(text):
            for raw in sentences_in(record):
                stats.candidates += 1
                if any(ch.isdigit() for ch in raw):  # "1984" would lose its meaning
                    stats.dropped_digits += 1
                    continue
                sentence = normalize_text(raw)
                n = len(sentence.split())
                if not min_words <= n <= max_words:
                    stats.dropped_length += 1
                    continue
                if lexicon.unknown_words(sentence.split()):
                    stats.dropped_oov += 1
                    continue
                if sentence in seen:
                    stats.duplicates += 1
                    continue
                seen.add(sentence)
                out.append(sentence)
    stats.kept = len(out)
    return out


def read_sources(source_dir: str | Path | None, files: list[str]) -> list[str]:
    """Read the corpus source files (names relative to ``source_dir``) with clear errors."""
    texts = []
    missing = []
    for name in files:
        path = Path(source_dir) / name if source_dir else Path(name)
        if not path.is_file():
            missing.append(str(path))
            continue
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    if missing:
        hint = ""
        if any("/usr/share/games/fortunes" in m for m in missing):
            hint = " (install the Debian package `fortunes`: `apt-get install fortunes`, or run `make bootstrap`)"
        raise B2txtError(f"corpus source file(s) not found: {', '.join(missing)}{hint}")
    return texts


def write_sentences(path: str | Path, sentences: list[str]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(s + "\n" for s in sentences))


def read_sentences(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise B2txtError(f"{path}: sentence file not found (run `b2txt corpus` first)")
    sentences = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not sentences:
        raise B2txtError(f"{path}: no sentences")
    return sentences
