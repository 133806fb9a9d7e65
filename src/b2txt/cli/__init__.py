"""``b2txt``: one command per pipeline stage. Snakemake rules and DVC stages call these.

Every command reads files and writes files (atomically); bad input ends with one clear
message and exit status 2, never a traceback from deep inside a library. Commands are
:class:`~b2txt.cli.common.Command` records in the ``COMMANDS`` of one module per rule family.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..ground.errors import B2txtError
from ..ground.extras import missing_extra
from ..ground.outputs import no_room, output_error
from . import config, data, figures, lm, score, server, train, workflow
from .common import Command, add_force, claim_outputs, guard_existing, guard_outputs

#: Every command, in the order ``b2txt --help`` lists them (roughly the pipeline's).
COMMANDS: tuple[Command, ...] = (*data.COMMANDS, *train.COMMANDS, *score.COMMANDS, *lm.COMMANDS,
                                 *server.COMMANDS, *figures.COMMANDS, *workflow.COMMANDS, *config.COMMANDS)
#: Commands with steps (``b2txt lm text``): name, help, description.
GROUPS = {lm.GROUP[0]: lm.GROUP[1:], workflow.GROUP[0]: workflow.GROUP[1:]}
#: Spellings that mean another command.
ALIASES = {("figures", "paper"): "figures-paper"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="b2txt",
        description="Brain-to-text pipeline: neural recordings -> phonemes -> text. "
                    "Each command is one pipeline stage; `snakemake --cores all` or `dvc repro` runs them all.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stages in order: corpus -> simulate -> validate -> preprocess -> train -> infer -> score -> figures;\n"
               "calibrate adapts a trained model to a held-out session.\n"
               "Run `b2txt COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"b2txt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        group, _, step = cmd.name.rpartition(" ")
        if group and group not in groups:
            help_, description = GROUPS[group]
            g = sub.add_parser(group, help=help_, description=description)
            groups[group] = g.add_subparsers(dest=f"{group}_command", metavar="STEP", required=True)
        p = (groups[group] if group else sub).add_parser(step, help=cmd.help, description=cmd.description)
        cmd.arguments(p)
        add_force(p)
        p.set_defaults(func=cmd.run, command=cmd.name, extras=cmd.extras, out_holds_inputs=cmd.out_holds_inputs,
                       outputs_policy=cmd.outputs, outputs_layout=cmd.layout)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if tuple(argv[:2]) in ALIASES:
        argv = [ALIASES[tuple(argv[:2])], *argv[2:]]
    args = parser.parse_args(argv)
    try:
        guard_outputs(args, args.out_holds_inputs)
        guard_existing(args, args.outputs_policy, args.outputs_layout)
        status = args.func(args)
        if status == 0:
            claim_outputs(args, args.outputs_policy)
        return status
    except B2txtError as exc:
        print(f"b2txt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # a package of an extra this installation lacks
        missing = missing_extra(exc, args.extras)
        if missing is None:
            raise
        print(f"b2txt {args.command}: error: {missing}", file=sys.stderr)
        return missing.exit_code
    except KeyboardInterrupt:
        print(f"b2txt {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk in a writer without its own message: still one clear error
        full = no_room(exc)
        if full is None:
            raise
        error = output_error(full.filename or getattr(args, "out", None) or "an output", full)
        print(f"b2txt {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
