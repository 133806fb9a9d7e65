"""Configuration commands: ``config-schema`` and ``config-show``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..ground.config import config_to_yaml, json_schema
from ..ground.fileio import write_text_atomic
from .common import Command, add_config, config_of


def run_config_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


def config_schema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="write here instead of stdout")


def run_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(config_to_yaml(config_of(args)))
    return 0


COMMANDS = (
    Command("config-schema", "print (or write) the JSON schema of the pipeline config",
            "The schema Snakemake checks the config against (workflow/schemas/config.schema.json), generated "
            "from the typed config.", config_schema_arguments, run_config_schema),
    Command("config-show", "print the effective configuration with every default filled in",
            "The config files of --config merged in order over the built-in defaults, as every command sees it.",
            add_config, run_config_show),
)
