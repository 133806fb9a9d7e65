"""The block description CSV (``t15_copyTaskData_description.csv``, REFERENCE §1).

One row per recording block: ``Date, Post-implant day, Block number, Number of sentences,
Corpus, Split`` (split ``Train`` or ``Val/Test``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..ground.errors import DataError
from ..ground.fileio import atomic_file

DESCRIPTION_FILE = "t15_copyTaskData_description.csv"
COLUMNS = ["Date", "Post-implant day", "Block number", "Number of sentences", "Corpus", "Split"]


@dataclass(frozen=True)
class Block:
    date: dt.date
    post_implant_day: int
    block_num: int
    n_sentences: int
    corpus: str
    split: str  # "Train" or "Val/Test"


def write_description(path: str | Path, blocks: list[Block]) -> None:
    rows = [[b.date.isoformat(), b.post_implant_day, b.block_num, b.n_sentences, b.corpus, b.split]
            for b in blocks]
    with atomic_file(path) as tmp:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(tmp, index=False)


def read_description(path: str | Path) -> list[Block]:
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the description CSV: {exc}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {COLUMNS}")
    blocks, problems = [], []
    first_line: dict[tuple[dt.date, int], tuple[int, Block]] = {}
    for i, row in df.iterrows():
        line = i + 2  # header is line 1
        try:
            blocks.append(Block(
                date=dt.date.fromisoformat(row["Date"]),
                post_implant_day=int(row["Post-implant day"]),
                block_num=int(row["Block number"]),
                n_sentences=int(row["Number of sentences"]),
                corpus=row["Corpus"],
                split=row["Split"],
            ))
        except ValueError as exc:
            problems.append(f"{path}: line {line}: {exc}")
            continue
        b = blocks[-1]
        seen = first_line.setdefault((b.date, b.block_num), (line, b))
        if seen[1] != b:  # which corpus and day would the block's trials get?
            problems.append(f"{path}: line {line}: block {b.block_num} of {b.date} again, unlike line {seen[0]}")
    if problems:
        raise DataError(f"{path}: invalid rows", problems)
    return blocks


def find_description(data_dir: str | Path) -> Path | None:
    """The description CSV of a data directory (root or ``hdf5_data_final``), if any."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / DESCRIPTION_FILE, data_dir.parent / DESCRIPTION_FILE):
        if candidate.is_file():
            return candidate
    return None


def block_index(blocks: list[Block]) -> dict[tuple[dt.date, int], Block]:
    return {(b.date, b.block_num): b for b in blocks}


def undescribed_blocks(path: str | Path, blocks: list[Block],
                       used: dict[tuple[dt.date, int], tuple[str, int, str]]) -> list[str]:
    """Problems for the blocks the data use that the description CSV lacks.

    ``used`` maps (date, block) to (session, number of trials, where the first one is). Without its
    row a block's trials would get corpus "unknown" and no post-implant day, silently.
    """
    index = block_index(blocks)
    return [f"{path}: no row for session {session} block {block} ({n} trial(s), first {where})"
            for (date, block), (session, n, where) in sorted(used.items()) if (date, block) not in index]
