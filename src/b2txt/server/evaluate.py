"""Evaluation through the LM server: a logits file in, decoded sentences and scores out.

:func:`evaluate` starts a private ``redis-server`` (Unix socket in the run directory, no
persistence) and ``lm-server`` as children that die with this process even when it is
SIGKILLed, sends every trial over the published protocol from several sessions at once,
and writes the same ``decoded.csv`` / ``nbest.jsonl`` as ``b2txt decode`` plus
``submission.csv``, WER and PER tables.

No trial is lost or duplicated when things fail mid-run:

- a monitor thread owns both children: it restarts whichever dies (bounded) and bumps a
  *generation* counter; a client waiting on a reply from the old generation gives up at
  once and re-sends its trial (re-opening its session first), instead of waiting out its
  timeout;
- a reply that does not come within ``timeout`` also gets the trial re-sent;
- replies are matched to requests by ``request_id``, so a late reply to an abandoned attempt
  is never taken for another trial's; results are stored by trial index, once.

With ``group_workers`` or ``external_workers`` (the consumer-group mode, :mod:`.evaluate_group`)
the trials go instead, whole, onto a Redis stream that ``b2txt lm-worker`` processes on any host
share; the outputs are the same files. Either way every trial is decoded by the same decoding
core (:mod:`b2txt.lm.core`), inside the LM server's workers or the lm-workers.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.decoded import decoded_row, write_decoded
from ..data.logits import LogitsTrial, read_logits
from ..evaluation.error_rates import phoneme_table
from ..evaluation.reports import write_scores, write_submission, write_word_scores
from ..ground.console import Log
from ..ground.errors import B2txtError
from ..ground.fileio import atomic_dir, write_text_atomic
from ..lm.core import trial_logits
from .evaluate_common import EvalSettings, ModeRun, TrialOutcome
from .evaluate_group import run_group
from .evaluate_sessions import run_sessions


def decoded_table(trials: list[LogitsTrial], outcomes: dict[int, TrialOutcome]) -> pd.DataFrame:
    """One row per trial: the columns of ``b2txt decode``'s decoded.csv, + latency and attempts."""
    rows = []
    for i, t in enumerate(trials):
        o = outcomes.get(i)
        row = decoded_row(i, t, o.result.sentence if o else "", len(o.result.nbest) if o else 0)
        rows.append(row | {"decode_ms": round(1000 * o.seconds, 3) if o else 0.0, "attempts": o.attempts if o else 0})
    return pd.DataFrame(rows)


def write_outputs(tmp: Path, trials: list[LogitsTrial], table: pd.DataFrame,
                  outcomes: dict[int, TrialOutcome], split: str) -> dict[str, Any]:
    # decoded.csv is deterministic (the same file as `b2txt decode` writes); latency and
    # re-sends vary from run to run, so they go to timing.csv
    write_decoded(tmp, table.drop(columns=["decode_ms", "attempts"]),
                  [outcomes[i].result.nbest.candidates if i in outcomes else () for i in table["trial"]])
    table[["trial", "session", "decode_ms", "attempts"]].to_csv(tmp / "timing.csv", index=False)
    write_submission(table, tmp / "submission.csv")
    metrics: dict[str, Any] = {"WER": None, "PER": None}
    if (table["reference"].astype(str).str.strip() != "").any():
        metrics["WER"] = write_word_scores(table, tmp, split, whole=False)["WER"]
    phonemes = phoneme_table(trials)
    if len(phonemes):
        metrics["PER"] = write_scores(phonemes, tmp, split, whole=False)["PER"]
    return metrics


def rescore_summary(settings: EvalSettings, outcomes: dict[int, TrialOutcome]) -> dict[str, Any] | None:
    """With LLM rescoring: how many n-best lists the LLM saw (``rescore.unsure_margin`` lets only
    unsure ones through), as ``b2txt decode`` reports in timing.json. A rescored list carries the
    LLM's log-probabilities, which are never 0 for a sentence; a list the gate passed over has none."""
    if settings.rescore is None or not settings.rescore.enabled:
        return None
    lists = [o.result.nbest.candidates for o in outcomes.values() if o.result.nbest.candidates]
    rescored = sum(any(c.llm != 0.0 for c in cands) for cands in lists)
    return {"model": settings.rescore.model, "alpha": settings.alpha, "unsure_margin": settings.rescore.unsure_margin,
            "lists": len(lists), "rescored": rescored,
            "fraction_rescored": round(rescored / len(lists), 6) if lists else 0.0}


def _run_dir(settings: EvalSettings) -> tuple[Path, bool]:
    """(run directory, whether to remove it afterwards); short enough for a Unix socket path."""
    if settings.run_dir is not None:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        return settings.run_dir.resolve(), False
    return Path(tempfile.mkdtemp(prefix="b2txt-eval-")), True



def evaluate(settings: EvalSettings, log: Log = print) -> dict[str, Any]:
    """Decode every trial of ``settings.logits`` through Redis; write ``settings.out``; return a summary."""
    trials = read_logits(settings.logits)
    if not trials:
        raise B2txtError(f"{settings.logits}: no trials")
    logits = trial_logits(trials, settings.logits)
    split = settings.split or str(trials[0].attrs.get("split", "") or "unknown")
    run_dir, remove = _run_dir(settings)
    try:
        mode = run_group if settings.group_mode else run_sessions
        return _finish(run_dir, settings, trials, logits, split, mode(run_dir, settings, logits, log))
    finally:
        if remove:  # a failure's message already carries the lm-server log tail
            shutil.rmtree(run_dir, ignore_errors=True)


def _finish(run_dir: Path, settings: EvalSettings, trials: list[LogitsTrial], logits: dict[int, np.ndarray],
            split: str, run: ModeRun) -> dict[str, Any]:
    """Write the outputs (the same files in every mode) and evaluation.json; return the summary."""
    table = decoded_table(trials, run.outcomes)
    mode = dict(run.fields)
    with atomic_dir(settings.out) as tmp:
        metrics = write_outputs(tmp, trials, table, run.outcomes, split)
        summary = {
            "n_trials": len(trials), "n_sent": len(logits), "seconds": round(run.seconds, 3),
            "trials_per_second": round(len(logits) / max(run.seconds, 1e-9), 3),
            "resent_trials": int((table["attempts"] > 1).sum()), "restarts": run.restarts,
            "sessions": mode.pop("sessions"), "workers": mode.pop("workers"),
            "split": split, **metrics, **mode,
        }
        gate = rescore_summary(settings, run.outcomes)
        if gate is not None:
            summary["rescore"] = gate
        write_text_atomic(tmp / "evaluation.json", json.dumps(summary, indent=2) + "\n")
        for name in ("lm-server.log", "redis.log", *sorted(p.name for p in run_dir.glob("lm-worker-*.log"))):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, tmp / name)
    return summary
