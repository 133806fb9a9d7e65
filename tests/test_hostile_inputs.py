"""The hostile-input suite (issue 15), one table per kind of careless or hostile input.

Each row is a ``helpers.hostile.Case``; ``check`` asserts the exit status, the culprit named in the
one error message, no traceback, every input byte-identical and nothing left at the output path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.hostile import Case, check


@pytest.fixture()
def paths(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ("m.csv", "c.yaml", "sub/x.hdf5"):
        (d / name).write_text("data\n")
    return {"d": d, "m": d / "m.csv", "x": d / "sub" / "x.hdf5", "o": tmp_path / "out", "missing": tmp_path / "nope"}


MISSING_INPUTS = [
    Case("score-missing-logits", ["score", "--logits", "{missing}", "--out", "{o}"], ["{missing}"],
         outputs=["o"]),
    Case("preprocess-missing-data", ["preprocess", "--data", "{missing}", "--out", "{o}"], ["{missing}"],
         outputs=["o"]),
    Case("train-out-onto-data", ["train", "--data", "{d}", "--manifest", "{m}", "--out", "{d}"],
         ["--out {d} is the input --data"], inputs=["d"]),
]


@pytest.mark.parametrize("case", [c.param() for c in MISSING_INPUTS])
def test_missing_inputs_and_outputs_onto_inputs(case: Case, paths, capsys):
    check(case, paths, capsys)
