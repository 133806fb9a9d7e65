"""Configuration commands: ``config-schema`` and ``config-show``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..ground.config import config_to_yaml, json_schema
from ..ground.errors import B2txtError
from ..ground.fileio import write_text_atomic
from .common import Command, add_config, config_of


def run_config_schema(args: argparse.Namespace) -> int:
    schema = json_schema()
    text = json.dumps(schema, indent=2) + "\n"
    if args.out:
        if not args.force and args.out.is_file() and _title(args.out) != schema.get("title"):
            raise B2txtError(f"--out {args.out} exists and is not a config schema `b2txt config-schema` wrote; "
                             "not replacing it (choose another path, or give --force to replace it)")
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


def _title(path: Path) -> object:
    """The title of the JSON schema at ``path`` (the committed schema carries no sidecar: its title
    says that b2txt generated it)."""
    try:
        return json.loads(path.read_text()).get("title")
    except (OSError, ValueError, AttributeError):
        return None


def config_schema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="write here instead of stdout")


def run_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(config_to_yaml(config_of(args)))
    return 0


COMMANDS = (
    Command("config-schema", "print (or write) the JSON schema of the pipeline config",
            "The schema Snakemake checks the config against (workflow/schemas/config.schema.json), generated "
            "from the typed config.", config_schema_arguments, run_config_schema, outputs="self"),
    Command("config-show", "print the effective configuration with every default filled in",
            "The config files of --config merged in order over the built-in defaults, as every command sees it.",
            add_config, run_config_show),
)
