"""Phoneme-decoder commands: ``train``, ``infer`` and ``calibrate`` (torch)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..ground.console import log
from .common import Command, add_config, at_least, config_of, positive


def run_train(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    cfg = config_of(args)
    tcfg = cfg.ensemble.member(args.member).train_config(cfg.train) if args.member else cfg.train
    if args.threads:
        tcfg = tcfg.model_copy(update={"threads": args.threads})
    if args.device:
        tcfg = tcfg.model_copy(update={"device": args.device})
    best = train(tcfg, args.data, args.manifest, args.out, log=log, nproc=args.nproc)
    log(f"{args.out}: best val PER {best.per:.4f}")
    return 0


def train_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "train")
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--manifest", type=Path, required=True, metavar="MANIFEST_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--threads", type=at_least(1), help="CPU threads for torch (overrides train.threads)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or xla (overrides train.device)")
    p.add_argument("--member", metavar="NAME", help="train the ensemble member NAME: the train section with its "
                                                    "overrides (ensemble.members)")
    p.add_argument("--nproc", type=at_least(1), default=1, metavar="N",
                   help="data-parallel processes on this machine (DistributedDataParallel: gloo on CPU, nccl "
                        "with one GPU each); train.batch_size is split evenly over them. Under torchrun or "
                        "srun --ntasks N leave this at 1: the launcher's processes form the group.")


def run_infer(args: argparse.Namespace) -> int:
    from ..data.store import build_manifest, write_manifest
    from ..models.inference import infer_split

    icfg = config_of(args).infer
    device = args.device or icfg.device
    batch_size = args.batch_size or icfg.batch_size
    positive("--batch-size", batch_size)
    tta = [] if args.no_tta else icfg.tta

    def run(manifest: Path) -> int:
        return infer_split(args.model, args.data, manifest, args.split, args.out, device, batch_size,
                           args.known_sessions_only, args.chunk_bins, log, tta)

    if args.manifest is not None:
        n = run(args.manifest)
    else:  # a model and a data directory are enough
        with tempfile.TemporaryDirectory(prefix="b2txt-manifest-") as tmpdir:
            manifest = Path(tmpdir) / "manifest.csv"
            write_manifest(build_manifest(args.data, [args.split], warn=log), manifest)
            n = run(manifest)
    log(f"{args.out}: logits of {n} {args.split} trials")
    return 0


def infer_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "infer")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--split", choices=["train", "val", "test"], required=True)
    p.add_argument("--out", type=Path, required=True, metavar="LOGITS_HDF5")
    p.add_argument("--manifest", type=Path, help="manifest CSV (default: built from DATA_DIR)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or xla (default: infer.device)")
    p.add_argument("--batch-size", type=at_least(1), help="trials per forward pass (default: infer.batch_size)")
    p.add_argument("--chunk-bins", type=at_least(1), metavar="N",
                   help="decode online, N bins (20 ms each) at a time with the GRU state carried (GRU models); "
                        "gives the same logits as one pass")
    p.add_argument("--known-sessions-only", action="store_true",
                   help="skip (and report) trials of sessions the model was not trained on, instead of failing")
    p.add_argument("--no-tta", action="store_true",
                   help="plain inference even when infer.tta lists test-time augmentation transforms")


def run_calibrate(args: argparse.Namespace) -> int:
    from ..training.calibration import calibrate

    ccfg = config_of(args).calibrate
    if args.session is not None:
        session = int(args.session) if args.session.lstrip("-").isdigit() else args.session
        ccfg = ccfg.model_copy(update={"session": session})
    if args.n_sentences:
        ccfg = ccfg.model_copy(update={"n_sentences": args.n_sentences})
    table = calibrate(args.model, args.data, args.manifest, ccfg, args.out, args.device, log)
    print(table[["session", "n_sentences", "PER"]].to_string(index=False))
    return 0


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "calibrate")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--manifest", type=Path, required=True, metavar="MANIFEST_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument("--session", help="session name or index (overrides calibrate.session)")
    p.add_argument("--n-sentences", type=at_least(0), nargs="+", help="overrides calibrate.n_sentences")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")


COMMANDS = (
    Command("train", "train the GRU phoneme decoder with CTC (config: train)",
            "Writes MODEL_DIR/checkpoint/best_checkpoint, checkpoint/args.yaml (published layout), "
            "training_log and metrics.csv.",
            train_arguments, run_train, ("train",)),
    Command("infer", "phoneme logits of every trial of a split (config: infer)",
            "Runs a model directory (ours or the published layout) on a data split and writes an HDF5 file "
            "with one group per trial (logits [T', 41] in model column order, labels when known).",
            infer_arguments, run_infer, ("train",)),
    Command("calibrate", "fit a new session's day layer from its first N sentences (config: calibrate)",
            "Rapid calibration: for each N in calibrate.n_sentences, add a day layer for a session the model "
            "never saw, fit it on the session's first N labelled sentences and measure PER on its val trials. "
            "Writes OUT_DIR/calibration.csv and OUT_DIR/model (calibrated with the largest N); "
            "`b2txt figures --calibration OUT_DIR/calibration.csv` draws the curve.",
            calibrate_arguments, run_calibrate, ("train",)),
)
