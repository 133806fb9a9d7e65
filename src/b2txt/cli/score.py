"""Logits and scoring commands: ``ensemble`` (average several models' logits), ``score`` (PER and
WER tables) and ``submission`` (the competition CSV)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..ground.console import log
from ..ground.errors import B2txtError
from .common import Command, add_config, config_of


def run_ensemble(args: argparse.Namespace) -> int:
    from ..data.ensemble import ensemble_files

    weights = args.weights
    if weights is None and args.config:
        weights = config_of(args).ensemble.weights
        if weights is not None and len(weights) != len(args.logits):
            raise B2txtError(f"ensemble.weights: {len(weights)} weight(s) for {len(args.logits)} --logits file(s)")
    n = ensemble_files(args.logits, args.out, weights)
    log(f"{args.out}: ensemble of {len(args.logits)} logits file(s), {n} trials")
    return 0


def ensemble_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "ensemble.weights")
    p.add_argument("--logits", type=Path, required=True, nargs="+", metavar="LOGITS_HDF5",
                   help="the members' logits files (`b2txt infer` of each model on the same split)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one weight per --logits file (default: ensemble.weights of --config, else equal)")
    p.add_argument("--out", type=Path, required=True, metavar="LOGITS_HDF5")

#: What `score --logits` and `score --decoded` write into one directory, file by file as far as
#: Snakemake and DVC know (evaluation.reports.PER_FILES | WER_FILES; a test keeps them equal).
SCORE_FILES = frozenset({"per_session.csv", "per_corpus.csv", "trials.csv", "metrics.json",
                         "wer_per_session.csv", "wer_per_corpus.csv", "wer_trials.csv", "wer.json"})


def run_score(args: argparse.Namespace) -> int:
    if not args.logits and not args.decoded:
        raise B2txtError("give --logits (phoneme error rate), --decoded (word error rate) or both")
    split = args.split or "val"
    summary: dict[str, Any] = {}
    if args.logits:
        from ..data.logits import read_logits
        from ..evaluation.error_rates import phoneme_table
        from ..evaluation.reports import write_scores

        table = phoneme_table(read_logits(args.logits))
        if table.empty:
            raise B2txtError(f"{args.logits}: no labelled trials to score")
        metrics = write_scores(table, args.out, split)
        log(f"{args.out}: {split} PER {metrics['PER']:.4f} over {metrics['n_trials']} trials")
        summary.update(PER=metrics["PER"], n_trials=metrics["n_trials"])
    if args.decoded:
        from ..data.decoded import read_decoded
        from ..evaluation.reports import write_word_scores

        decoded = read_decoded(args.decoded)
        try:
            metrics = write_word_scores(decoded, args.out, split)
        except ValueError:
            raise B2txtError(f"{args.decoded}: no labelled trials to score") from None
        log(f"{args.out}: {split} WER {metrics['WER']:.4f} over {metrics['n_trials']} trials")
        summary.update(WER=metrics["WER"], n_trials=metrics["n_trials"])
    print(json.dumps(summary))
    return 0


def score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logits", type=Path, metavar="LOGITS_HDF5")
    p.add_argument("--decoded", type=Path, metavar="DECODED_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument("--split", help="split name recorded in the metrics (default: val)")


def run_submission(args: argparse.Namespace) -> int:
    from ..data.decoded import read_decoded
    from ..evaluation.reports import write_submission

    decoded = read_decoded(args.decoded)
    if decoded.empty:
        raise B2txtError(f"{args.decoded}: no trials: a submission needs every test trial")
    splits = sorted(set(decoded["split"].astype(str))) if "split" in decoded.columns else []
    if splits != ["test"]:  # the competition scores test trials: another split's rows would be wrong
        found = f"split(s) {', '.join(repr(s) for s in splits)}" if splits else "no split column"
        raise B2txtError(f"{args.decoded}: {found}; the competition submission is of the test split only "
                         "(decode the test logits: `b2txt infer --split test`, then `b2txt decode`)")
    n = write_submission(decoded, args.out)
    log(f"{args.out}: {n} rows (id,text)")
    return 0


def submission_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decoded", type=Path, required=True, metavar="DECODED_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="CSV")


COMMANDS = (
    Command("ensemble", "average the phoneme log-probabilities of several models' logits files (config: ensemble)",
            "Per trial and frame, the weighted mean of the members' log-softmax, normalised again: a logits file "
            "like `b2txt infer`'s (score and decode read it alike). The files must hold the same trials in the "
            "same order with as many frames each (models of one patch size and stride), gru and triple alike.",
            ensemble_arguments, run_ensemble),
    Command("score", "phoneme error rate (greedy CTC) and word error rate per trial, session, corpus",
            "With --logits: per_session.csv, per_corpus.csv, trials.csv and metrics.json (PER). With --decoded "
            "(a decoded.csv from `b2txt decode`): wer_per_session.csv, wer_per_corpus.csv, wer_trials.csv and "
            "wer.json (WER with a bootstrap 95 %% interval). All in OUT_DIR.",
            score_arguments, run_score, layout=SCORE_FILES),
    Command("submission", "the competition CSV (id,text) from a decoded test split",
            "Rows in session order, then trial order, ids 0..N-1, text normalised (REFERENCE §7).",
            submission_arguments, run_submission),
)
