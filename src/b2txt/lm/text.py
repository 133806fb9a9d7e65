"""LM training text: normalised sentences, lexicon words only (``<unk>`` for the rest).

The n-gram LM decides which word sequences the decoder can output, so its text must look like
the decoder's output: normalised exactly as labels and scoring are
(:func:`b2txt.ground.phonemes.normalize_text`), one sentence per line. Three rules keep it honest:

- no evaluation leakage: sentences whose normalised text equals a sentence label of the
  excluded splits (val/test by default) of a Dryad-layout data directory are dropped, and counted;
- every word the lexicon cannot pronounce becomes ``<unk>`` (the decoding graph cannot spell it;
  REFERENCE §4: the published LM maps unknown words the same way), and the OOV rate is reported;
- optionally every lexicon word is appended once as its own line, so the LM — and the decoding
  vocabulary — covers the whole ~125k-word lexicon as the paper's does (KenLM, unlike SRILM's
  ``-vocab``, gives no probability to words it never saw).

Sentences with digits are dropped (their spoken form is unknown: "1984" is not "nineteen
eighty-four" after normalisation), as in :mod:`b2txt.data.corpus`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import h5py

from ..data.corpus import read_sources, records, sentences_in
from ..data.dryad import LOST_LINK, TRIAL_RE, discover
from ..ground.errors import B2txtError, DataError
from ..ground.fileio import atomic_file, write_text_atomic
from ..ground.phonemes import Lexicon, normalize_text

if TYPE_CHECKING:
    from ..ground.config import PipelineConfig

UNK = "<unk>"
#: Words lmplz/SRILM reserve; a literal one in the text would break estimation.
RESERVED = frozenset({"<s>", "</s>", UNK})


@dataclass
class TextStats:
    """What :func:`prepare_text` wrote (also saved as JSON beside the text)."""

    sentences: int = 0  # lines written from the sources (lexicon word lines not included)
    tokens: int = 0
    oov_tokens: int = 0
    oov_rate: float = 0.0
    oov_types: int = 0
    top_oov: list[tuple[str, int]] = field(default_factory=list)
    candidates: int = 0  # raw sentences seen in the sources
    dropped_digits: int = 0
    dropped_empty: int = 0
    excluded_sentences: int = 0  # source sentences dropped because they are evaluation labels
    excluded_distinct: int = 0  # distinct evaluation sentences that occurred in the sources
    eval_sentences: int = 0  # distinct normalised labels of the excluded splits
    excluded_splits: list[str] = field(default_factory=list)
    lexicon_words_added: int = 0
    sources: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.sentences} sentences, {self.tokens} tokens, OOV {self.oov_tokens} "
                f"({100 * self.oov_rate:.2f} %, {self.oov_types} types) -> {UNK}; "
                f"excluded {self.excluded_sentences} sentences matching {self.eval_sentences} "
                f"evaluation labels ({', '.join(self.excluded_splits) or 'none'}); "
                f"dropped {self.dropped_digits} with digits; "
                f"{self.lexicon_words_added} lexicon words appended")


def source_sentences(texts: Iterable[str], fortune_style: bool = True) -> Iterator[str]:
    """Raw sentences of source texts.

    ``fortune_style``: ``%``-separated records whose sentences may span lines (fortune files);
    otherwise every line holds one or more whole sentences (a user's text file), so a line
    without final punctuation never runs into the next one.
    """
    for text in texts:
        if fortune_style:
            for record in records(text):
                yield from sentences_in(record)
        else:
            for line in text.splitlines():
                yield from sentences_in(line)


def evaluation_sentences(data_dir: str | Path, splits: Sequence[str]) -> set[str]:
    """Normalised ``sentence_label`` of every trial in ``splits`` of a Dryad-layout directory.

    Reads only the attributes (never the features), so it is fast on the full data set. Test
    files carry no labels and contribute nothing. A damaged file is an error naming it: silently
    skipping it would let its sentences leak into the LM.
    """
    files, problems = discover(data_dir)
    lost = [p for p in problems if LOST_LINK in p]  # a split behind a dead link: its sentences would leak
    if lost or (problems and not files):
        raise DataError(f"{data_dir}: cannot read the evaluation sentences to exclude "
                        f"(set lm.exclude_splits: [] to build without exclusion)", lost or problems)
    wanted = set(splits)
    out: set[str] = set()
    for df in files:
        if df.split not in wanted:
            continue
        try:
            with h5py.File(df.path, "r") as f:
                for name in f.keys():
                    if not TRIAL_RE.match(name):
                        continue
                    label = f[name].attrs.get("sentence_label")
                    if label is None:
                        continue
                    if isinstance(label, bytes):
                        label = label.decode("utf-8", errors="replace")
                    sentence = normalize_text(str(label))
                    if sentence:
                        out.add(sentence)
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise DataError(f"{df.path}: cannot read sentence labels to exclude from the LM text "
                            f"(damaged file?): {exc}") from None
    return out


def prepare_text(out: str | Path, raw_sentences: Iterable[str], lexicon: Lexicon, *,
                 exclude: set[str] | frozenset[str] = frozenset(), add_lexicon_words: bool = True,
                 stats_path: str | Path | None = None, sources: Sequence[str] = (),
                 excluded_splits: Sequence[str] = ()) -> TextStats:
    """Write the LM training text (one normalised sentence per line) and return its statistics.

    ``exclude``: normalised sentences that must not be in the text (evaluation labels).
    ``stats_path``: where the statistics go as JSON (default: ``<out>`` with suffix ``.json``).
    Both files are written atomically.
    """
    out = Path(out)
    stats = TextStats(eval_sentences=len(exclude), excluded_splits=list(excluded_splits),
                      sources=[str(s) for s in sources])
    oov: Counter[str] = Counter()
    excluded_seen: set[str] = set()
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for raw in raw_sentences:
            stats.candidates += 1
            if any(ch.isdigit() for ch in raw):
                stats.dropped_digits += 1
                continue
            sentence = normalize_text(raw)
            if not sentence:
                stats.dropped_empty += 1
                continue
            if sentence in exclude:
                stats.excluded_sentences += 1
                excluded_seen.add(sentence)
                continue
            words = sentence.split()
            for i, w in enumerate(words):
                if w not in lexicon or w in RESERVED:
                    oov[w] += 1
                    words[i] = UNK
            stats.sentences += 1
            stats.tokens += len(words)
            fh.write(" ".join(words) + "\n")
        if stats.sentences == 0:  # raised inside: atomic_file then removes the partial file
            raise B2txtError(f"{out}: no sentences left for the LM text (sources: "
                             f"{', '.join(stats.sources) or 'given'}; {stats.candidates} candidates, "
                             f"{stats.excluded_sentences} excluded, {stats.dropped_digits} with digits)")
        if add_lexicon_words:
            for word in sorted(lexicon.pronunciations):
                if word not in RESERVED:
                    fh.write(word + "\n")
                    stats.lexicon_words_added += 1
    stats.oov_tokens = sum(oov.values())
    stats.oov_types = len(oov)
    stats.oov_rate = stats.oov_tokens / stats.tokens if stats.tokens else 0.0
    stats.top_oov = oov.most_common(20)
    stats.excluded_distinct = len(excluded_seen)
    write_text_atomic(stats_path or out.with_suffix(".json"),
                      json.dumps(asdict(stats), indent=2) + "\n")
    return stats


def build_lm_text(out: str | Path, lexicon: Lexicon, *, stats_path: str | Path | None = None,
                  text_file: str | Path | None = None,
                  source_dir: str | Path | None = None, source_files: Sequence[str] = (),
                  data_dir: str | Path | None = None, exclude_splits: Sequence[str] = ("val", "test"),
                  add_lexicon_words: bool = True) -> TextStats:
    """The ``lm text`` stage: sources -> normalised, leakage-free LM text + its ``.json`` statistics.

    ``text_file`` (LMConfig.text) wins over the corpus sources (CorpusConfig.source_dir/files).
    Exclusion needs ``data_dir`` (DataConfig.dir) when ``exclude_splits`` is not empty.
    """
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise B2txtError(f"{path}: LM text file not found (lm.text)")
        texts = [path.read_text(encoding="utf-8", errors="replace")]
        sources = [str(path)]
        fortune_style = False
    else:
        if not source_files:
            raise B2txtError("no LM text: set lm.text or corpus.files")
        texts = read_sources(source_dir, list(source_files))
        sources = [str(Path(source_dir) / f) if source_dir else f for f in source_files]
        fortune_style = True
    exclude: set[str] = set()
    if exclude_splits:
        if data_dir is None or not Path(data_dir).exists():
            raise B2txtError(f"{data_dir}: data directory not found, so evaluation sentences "
                             f"({', '.join(exclude_splits)}) cannot be excluded from the LM text; "
                             f"create the data first or set lm.exclude_splits: []")
        exclude = evaluation_sentences(data_dir, exclude_splits)
    return prepare_text(out, source_sentences(texts, fortune_style), lexicon, exclude=exclude,
                        add_lexicon_words=add_lexicon_words, sources=sources, stats_path=stats_path,
                        excluded_splits=list(exclude_splits))


def read_stats(path: str | Path) -> TextStats:
    data = json.loads(Path(path).read_text())
    data["top_oov"] = [tuple(x) for x in data.get("top_oov", [])]
    return TextStats(**data)


def build_lm_text_for(cfg: "PipelineConfig", out: str | Path, lexicon: Lexicon,
                      stats_path: str | Path | None = None) -> TextStats:
    """:func:`build_lm_text` with the pipeline configuration (lm.text, corpus.*, data.dir, lm.*)."""
    return build_lm_text(out, lexicon, stats_path=stats_path, text_file=cfg.lm.text,
                         source_dir=cfg.corpus.source_dir,
                         source_files=cfg.lm.source_files or cfg.corpus.files, data_dir=cfg.data.dir,
                         exclude_splits=cfg.lm.exclude_splits, add_lexicon_words=cfg.lm.add_lexicon_words)
