"""What every command shares: the :class:`Command` record, ``--config`` and the config it loads.

A command is registered one way only: a :class:`Command` in its family module's ``COMMANDS``
(``cli/data.py``, ``cli/train.py``, ...), which :func:`b2txt.cli.build_parser` collects. Family
modules import only the standard library and the ground layer at the top; each ``run`` imports
the layer it drives when it runs, so ``b2txt --help`` stays fast and a command loads only its
own rule family's packages.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ground.config import PipelineConfig, load_config
from ..ground.console import log
from ..ground.errors import B2txtError
from ..ground.fileio import check_replaceable


@dataclass(frozen=True)
class Command:
    """One ``b2txt`` command; ``name`` is ``"decode"``, or ``"lm text"`` for a step of a group."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    #: Extras of pyproject.toml it may need beyond the core (its error names the first that has a
    #: missing module; a test checks these against the modules its code imports).
    extras: tuple[str, ...] = ()
    #: Its output directory may hold its inputs (``lm graph`` adds the graph beside the ARPA it reads).
    out_holds_inputs: bool = False
    #: What it does to an existing --out/--report (see :func:`guard_existing`): ``"replace"`` it (only
    #: b2txt's own, or with --force; b2txt marks it as its own afterwards), ``"add"`` files into a
    #: directory without removing what it did not write (download, data, dvc-pin: they check their
    #: own files), or ``"self"``: the command tells its own output by its content (workflow dvc).
    outputs: str = "replace"
    #: Names several stages write file by file into its output directory (see
    #: :func:`~b2txt.ground.fileio.check_replaceable`): an unmarked directory of only these is b2txt's.
    layout: frozenset[str] = frozenset()


#: Arguments naming what a command writes; every other path argument names something it reads,
#: except these places it works in.
OUTPUT_ARGS = ("out", "report")
#: Files a command appends to as it runs (logs): never onto an input, but not replaced whole.
APPEND_ARGS = ("trace",)
WORKING_ARGS = frozenset({"partial_dir", "opt_cache_dir", "redis_socket", "run_dir", "root"})
POSITIONAL_ARGS = frozenset({"data_dir", "archives"})


def _paths(value: object) -> list[Path]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, Path)]


def _arg(name: str) -> str:
    return name.upper() if name in POSITIONAL_ARGS else "--" + name.replace("_", "-")


def guard_outputs(args: argparse.Namespace, out_holds_inputs: bool = False) -> None:
    """Refuse an output that is, lies inside or contains one of the command's inputs (symlinks
    followed), before anything runs: b2txt never writes over what it reads."""
    names = vars(args)
    written = (*OUTPUT_ARGS, *APPEND_ARGS)
    outputs = [(n, p) for n in written for p in _paths(names.get(n))]
    inputs = [(n, p) for n, v in names.items() if n not in written and n not in WORKING_ARGS for p in _paths(v)]
    for out_name, out in outputs:
        o = out.resolve()
        for in_name, given in inputs:
            i = given.resolve()
            if o == i:
                why = "is"
            elif i in o.parents:
                why = "lies inside"
            elif o in i.parents and not out_holds_inputs:
                why = "contains"
            else:
                continue
            raise B2txtError(f"{_arg(out_name)} {out} {why} the input {_arg(in_name)} {given}: b2txt never "
                             "writes over what it reads; choose another output path")


def guard_existing(args: argparse.Namespace, policy: str, layout: frozenset[str] = frozenset()) -> None:
    """Before a ``"replace"`` command runs: each existing --out/--report must be b2txt's own
    (:func:`~b2txt.ground.fileio.check_replaceable`), else one error and nothing touched."""
    if policy != "replace":
        return
    for name in OUTPUT_ARGS:
        for path in _paths(getattr(args, name, None)):
            check_replaceable(path, _arg(name), getattr(args, "force", False), layout)


def claim_outputs(args: argparse.Namespace, policy: str) -> None:
    """After a ``"replace"`` command succeeded: mark its outputs as b2txt's, so it may replace them."""
    from ..ground.fileio import mark_own

    if policy != "replace":
        return
    for name in OUTPUT_ARGS:
        for path in _paths(getattr(args, name, None)):
            mark_own(path)


def add_force(p: argparse.ArgumentParser) -> None:
    """``--force`` for every command that writes an output (added by the parser builder, not per command)."""
    if any(a.dest in OUTPUT_ARGS for a in p._actions) and not any(a.dest == "force" for a in p._actions):
        p.add_argument("--force", action="store_true",
                       help="replace an existing output that b2txt did not write (by default b2txt replaces "
                            "only its own outputs and refuses anything else)")


def add_config(p: argparse.ArgumentParser, reads: str = "") -> None:
    """``--config FILE`` (repeatable); without it the built-in defaults, the values of
    config/config.yaml + config/model/baseline.yaml, wherever the command runs."""
    p.add_argument("--config", type=Path, action="append", metavar="FILE",
                   help="config YAML; repeat to merge several, later ones override (default: the built-in "
                        "defaults, equal to config/config.yaml + config/model/baseline.yaml)"
                        + (f"; this command reads {reads}" if reads else ""))


def config_of(args: argparse.Namespace) -> PipelineConfig:
    """The config of ``--config`` (merged in order), else the built-in defaults."""
    paths = getattr(args, "config", None) or None
    cfg = load_config(paths)
    log(f"config: {' + '.join(map(str, paths)) if paths else 'built-in defaults'}")
    return cfg


def at_least(minimum: float, kind: type = int, *, exclusive: bool = False,
             most: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: a number of ``kind`` not below ``minimum`` (above it with ``exclusive``),
    not above ``most``; anything else is the parser's usage error naming the flag (exit 2)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        low = value <= minimum if exclusive else value < minimum
        if value != value or low or (most is not None and value > most):  # value != value: NaN
            bound = f"{'above' if exclusive else 'at least'} {minimum}" + (f" and at most {most}" if most else "")
            raise argparse.ArgumentTypeError(f"{text}: must be {bound}")
        return value

    parse.__name__ = kind.__name__
    return parse


PORT = at_least(1, most=65535)


def positive(name: str, value: int | float | None) -> None:
    """A count given on the command line must be at least 1."""
    if value is not None and value < 1:
        raise B2txtError(f"{name} {value}: must be at least 1")
