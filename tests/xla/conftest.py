"""Fixtures of the XLA tests (``make test-xla``): a small data set of controlled trial lengths and
the report of measured numbers (compile counts, step times, differences) printed at the end.

These tests need torch_xla, which only ``.venv-xla`` has (torch 2.9.0 + torch_xla 2.9.0, built
by ``scripts/test_xla.sh``). In the main environment tests/conftest.py leaves this directory
out of collection (its ``collect_ignore``), so ``make test`` spends no time here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

#: Short sentences (14-17 phonemes with the word-final SIL), so that trials of 130 bins or more give
#: enough model outputs for CTC (T' = (T - 14) // 4 + 1 >= 30).
SENTENCES = ["the car is red", "turn off the light", "my dog runs fast", "i like green apples",
             "he drinks cold water", "the tree is tall", "i want some tea", "we went home early"]
SESSIONS = ["t15.2023.08.13", "t15.2023.08.20"]


def write_dataset(root: Path, lengths: dict[str, list[int]], seed: int = 0) -> tuple[Path, Path]:
    """Dryad-layout data set: every session gets trials of the given lengths per split
    (TX-like Poisson counts and Gaussian SBP), plus its manifest. Returns (data dir, manifest)."""
    from b2txt.data.dryad import Trial, data_file_path, write_trials
    from b2txt.data.store import build_manifest, write_manifest
    from b2txt.ground.phonemes import Lexicon

    lexicon = Lexicon.from_cmudict()
    rng = np.random.default_rng(seed)
    data = root / "data"
    for s, session in enumerate(SESSIONS):
        for split, lens in lengths.items():
            trials = []
            for i, n in enumerate(lens):
                sentence = SENTENCES[(s + i) % len(SENTENCES)]
                feats = np.concatenate([rng.poisson(1.0, size=(n, 256)), rng.normal(size=(n, 256))], axis=1)
                trials.append(Trial(features=feats.astype(np.float32), session=session,
                                    block_num=1 + (split != "train"), trial_num=i, sentence=sentence,
                                    phoneme_ids=np.asarray(lexicon.sentence_ids(sentence))))
            path = data_file_path(data, session, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_trials(path, trials)
    manifest = root / "manifest.csv"
    write_manifest(build_manifest(data), manifest)
    return data, manifest


@pytest.fixture(scope="session")
def bucket_data(tmp_path_factory) -> tuple[Path, Path]:
    """Training trials of 133-190 bins: after the random cut (0-2 bins) every batch is longer
    than 128 and at most 190 bins, i.e. inside one padding bucket of 64 (padded to 192)."""
    train = [133, 140, 146, 151, 157, 163, 168, 174, 179, 185, 188, 190]
    return write_dataset(tmp_path_factory.mktemp("xla_bucket"), {"train": train, "val": [150, 170]})


#: Measured numbers, printed at the end of the run and written to $B2TXT_XLA_REPORT (JSON).
REPORT: dict[str, object] = {}


@pytest.fixture(scope="session")
def report() -> dict[str, object]:
    return REPORT


def pytest_terminal_summary(terminalreporter):
    if not REPORT:
        return
    tr = terminalreporter
    tr.section("XLA:CPU measurements")
    for key, value in REPORT.items():
        tr.write_line(f"{key}: {json.dumps(value)}")
    out = os.environ.get("B2TXT_XLA_REPORT")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(REPORT, indent=2) + "\n")
        tr.write_line(f"(written to {out})")
