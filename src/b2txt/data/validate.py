"""Whole-dataset validation: every file and trial, plus checks across trials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..ground.console import progress
from ..ground.errors import DataError
from .description import find_description, read_description
from .dryad import discover, iter_file


@dataclass
class ValidationReport:
    n_files: int = 0
    n_trials: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.n_files} file(s), {self.n_trials} trial(s): "
        if self.ok:
            return head + "no problems found"
        return head + f"{len(self.problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in self.problems)


def validate_dataset(data_dir: str | Path) -> ValidationReport:
    """Check every file and trial of a Dryad-layout directory; collect every problem."""
    report = ValidationReport()
    files, report.problems = discover(data_dir)
    seen: dict[tuple[str, int, int], str] = {}
    for df in progress(files, desc="validate", unit="file"):
        report.n_files += 1
        try:
            for name, trial, problems in iter_file(df):
                report.n_trials += 1
                report.problems.extend(problems)
                if trial is None:
                    continue
                key = (df.session, trial.block_num, trial.trial_num)
                where = f"{df.path}: {name}"
                if key in seen:
                    report.problems.append(
                        f"{where}: duplicate trial: block {key[1]} trial {key[2]} also in {seen[key]}")
                else:
                    seen[key] = where
        except DataError as exc:
            report.problems.append(str(exc))
    desc = find_description(data_dir)
    if desc is not None:
        try:
            read_description(desc)
        except DataError as exc:
            report.problems.append(str(exc))
    return report
