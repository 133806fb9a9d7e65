"""Figure commands: ``figures`` (our run) and ``figures-paper`` (the paper's, from the Dryad pickles).

matplotlib is imported only when a figure is drawn, not by ``b2txt --help``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..ground.console import log
from .common import Command, at_least


def run_figures(args: argparse.Namespace) -> int:
    from ..figures import make_pipeline_figures

    paths = make_pipeline_figures(args.model, args.scores, args.out, seed=args.seed, logits=args.logits,
                                  calibration=args.calibration, example_trial=args.example_trial)
    log(f"{args.out}: {len(paths)} files")
    return 0


def figures_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--scores", type=Path, required=True, metavar="SCORES_DIR",
                   help="scores of the val split (trials.csv; wer_trials.csv adds the WER panels)")
    p.add_argument("--out", type=Path, required=True, metavar="FIG_DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence intervals")
    p.add_argument("--logits", type=Path, metavar="LOGITS_HDF5", help="draw an example trial's logits from here")
    p.add_argument("--calibration", type=Path, metavar="CALIBRATION_CSV", help="draw the calibration curve")
    p.add_argument("--example-trial", type=at_least(0), default=0, metavar="N", help="the example trial (default 0)")


def run_figures_paper(args: argparse.Namespace) -> int:
    from ..figures import make_paper_figures

    paths = make_paper_figures(args.copy_task, args.personal_use, args.out, args.seed, args.example_trial)
    log(f"{args.out}: {len(paths)} files ({', '.join(sorted({p.stem for p in paths}))})")
    return 0


def figures_paper_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--copy-task", type=Path, metavar="PKL", help="t15_copyTask.pkl (figure 2)")
    p.add_argument("--personal-use", type=Path, metavar="PKL", help="t15_personalUse.pkl (figure 4)")
    p.add_argument("--out", type=Path, required=True, metavar="FIG_DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence intervals")
    p.add_argument("--example-trial", type=at_least(0), default=0, metavar="N",
                   help="copy-task trial whose logits figure 2 shows (default 0)")


COMMANDS = (
    Command("figures", "our run's figures: training curve, error rates per session, figure-2 panels",
            "PDF (TrueType fonts) + PNG. `b2txt figures paper --copy-task PKL --personal-use PKL --out DIR` draws the "
            "paper's figures 2 and 4 from the Dryad pickles instead (see `b2txt figures paper --help`).",
            figures_arguments, run_figures, ("figures",)),
    Command("figures-paper", "the paper's figures 2 and 4 from the Dryad pickles (also: `figures paper`)",
            "Figure 2 from t15_copyTask.pkl, figure 4 from t15_personalUse.pkl (REFERENCE §6), PDF + PNG, with the "
            "tables behind them as CSV. The pickles are read with a restricted unpickler: no code in them runs.",
            figures_paper_arguments, run_figures_paper, ("figures",)),
)
