"""Whole-dataset validation: every file and trial, plus checks across trials."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from ..ground.config import ModelConfig
from ..ground.console import progress
from ..ground.errors import DataError
from .description import find_description, read_description, undescribed_blocks
from .dryad import discover, fit_problem, implausible_features, iter_file, session_date

_MODEL = ModelConfig()


@dataclass
class ValidationReport:
    n_files: int = 0
    n_trials: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # suspicious, not provably wrong

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.n_files} file(s), {self.n_trials} trial(s): "
        text = head + ("no problems found" if self.ok else f"{len(self.problems)} problem(s)")
        text += "".join(f"\n  - {p}" for p in self.problems)
        if self.warnings:
            text += f"\n{len(self.warnings)} warning(s)" + "".join(f"\n  - {w}" for w in self.warnings)
        return text


def validate_dataset(data_dir: str | Path, patch_size: int = _MODEL.patch_size,
                     patch_stride: int = _MODEL.patch_stride) -> ValidationReport:
    """Check every file and trial of a Dryad-layout directory; collect every problem.

    ``patch_size``/``patch_stride``: the model's (train.model); a trial shorter than one patch, or
    whose labels CTC cannot align to its patched frames, is a problem in every split.
    """
    report = ValidationReport()
    files, report.problems = discover(data_dir)
    seen: dict[tuple[str, int, int], str] = {}
    blocks: dict[tuple[dt.date, int], tuple[str, int, str]] = {}
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
                misfit = fit_problem(trial, where, patch_size, patch_stride)
                if misfit:
                    report.problems.append(misfit)
                odd = implausible_features(trial.features, where)
                if odd:
                    report.warnings.append(odd)
                bkey = (session_date(df.session), trial.block_num)
                session, n, first = blocks.get(bkey, (df.session, 0, where))
                blocks[bkey] = (session, n + 1, first)
        except DataError as exc:
            report.problems.append(str(exc))
    desc = find_description(data_dir)
    if desc is not None:
        try:
            report.problems += undescribed_blocks(desc, read_description(desc), blocks)
        except DataError as exc:
            report.problems.append(str(exc))
    return report
