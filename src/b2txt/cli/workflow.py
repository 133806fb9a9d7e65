"""Workflow commands: ``workflow dvc`` (dvc.yaml from the stage table the Snakefile also uses)."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from ..ground.console import log
from ..ground.errors import B2txtError
from .common import Command

GROUP = ("workflow", "the pipeline's stage table, written out for DVC",
         "Snakemake (Snakefile) and DVC (dvc.yaml) run the same stages from one table in the package "
         "(src/b2txt/workflow.py).")

#: The config files of the default pipeline, as the Snakefile reads them.
DEFAULT_STACK = ("config/config.yaml", "config/model/baseline.yaml")


def run_workflow_dvc(args: argparse.Namespace) -> int:
    from ..ground.fileio import write_text_atomic
    from ..workflow import dvc_yaml, pretrained_dvc_yaml

    root = args.root
    if not (root / "Snakefile").is_file():
        raise B2txtError(f"{root}: not the repository root (no Snakefile); run there or give --root")
    files = [str(f) for f in args.config] if args.config else list(DEFAULT_STACK)
    out = args.out or (Path("pretrained/dvc.yaml") if args.pretrained else Path("dvc.yaml"))
    text = (pretrained_dvc_yaml if args.pretrained else dvc_yaml)(files, root)
    target = root / out
    if args.check:
        old = target.read_text() if target.is_file() else ""
        if old == text:
            log(f"{target}: up to date with {' + '.join(files)}")
            return 0
        sys.stderr.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                   str(target), "generated", n=1))
        raise B2txtError(f"{target}: out of date; run `b2txt workflow dvc{' --pretrained' if args.pretrained else ''}"
                         f"{''.join(' --config ' + f for f in files)}`")
    write_text_atomic(target, text)
    log(f"{target}: {text.count(chr(10))} lines for {' + '.join(files)}")
    return 0


def workflow_dvc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, action="append", metavar="FILE",
                   help="config files, relative to the repository root, merged in order (default: "
                        f"{' + '.join(DEFAULT_STACK)}, as the Snakefile); every DVC stage gets them")
    p.add_argument("--pretrained", action="store_true",
                   help="write pretrained/dvc.yaml: the published checkpoint and language models")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="relative to --root (default: dvc.yaml, or pretrained/dvc.yaml with --pretrained)")
    p.add_argument("--root", type=Path, default=Path("."), metavar="DIR", help="the repository root (default: .)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 2 when the file is not what it would be")


COMMANDS = (
    Command("workflow dvc", "write dvc.yaml (or pretrained/dvc.yaml) from the stage table for a config",
            "The stages the Snakefile runs, as DVC stages: the same b2txt command lines with the given config "
            "files (params: the sections each stage reads from them; deps: its inputs and the modules its command "
            "imports). Run it again after changing the config files' paths or lists (run, data.dir, lm.orders, "
            "infer.splits, ...); values alone are params and need no regeneration.",
            workflow_dvc_arguments, run_workflow_dvc),
)
