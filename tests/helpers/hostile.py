"""The hostile-input suite's one check (issue 15): run a command on bad input and assert the promise.

Every case says what a careless or hostile user ran, and the check asserts, for every case alike:
the exit status, that the one error message names the culprit (file, trial, field or flag), that no
traceback reached the user, that every input is byte-identical afterwards, and that nothing was
left at the output path. Test modules build their cases as ``Case`` rows and call ``check``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from b2txt.cli import main


def digest(path: Path) -> str:
    """Names and bytes of a file or of everything under a directory ("" when the path is absent)."""
    if not path.exists() and not path.is_symlink():
        return ""
    h = hashlib.sha256()
    for p in sorted([path, *path.rglob("*")]) if path.is_dir() else [path]:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_symlink():
            h.update(b"->" + str(p.readlink()).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Case:
    """One hostile run. ``argv`` may hold ``{name}`` placeholders that ``check`` fills from ``paths``."""

    id: str
    argv: Sequence[str]
    culprit: Sequence[str]  # substrings that must all appear in the error output
    inputs: Sequence[str] = ()  # placeholder names of paths that must be byte-identical afterwards
    outputs: Sequence[str] = ()  # placeholder names of paths that must not exist afterwards
    status: int = 2
    extra: dict[str, str] = field(default_factory=dict)  # more placeholders, given literally

    def param(self) -> object:
        return pytest.param(self, id=self.id)


def check(case: Case, paths: dict[str, Path], capsys: pytest.CaptureFixture[str],
          run: Callable[[list[str]], int] = main) -> str:
    """Run ``case`` in process and assert the promise; return the error output for further checks."""
    names = {k: str(v) for k, v in paths.items()} | case.extra
    argv = [a.format(**names) for a in case.argv]
    before = {name: digest(paths[name]) for name in case.inputs}
    try:
        status = run(argv)
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert status == case.status, f"{case.id}: exit {status}, wanted {case.status}\n{err}"
    assert "Traceback" not in err, f"{case.id}: a traceback reached the user\n{err}"
    for text in case.culprit:
        assert text.format(**names) in err, f"{case.id}: {text!r} not named in\n{err}"
    for name in case.inputs:
        assert digest(paths[name]) == before[name], f"{case.id}: input {name} changed"
    for name in case.outputs:
        out = paths[name]
        assert not out.exists() and not out.is_symlink(), f"{case.id}: something left at {out}"
    return err
