"""Workflow commands: ``workflow dvc`` (dvc.yaml from the stage table)."""

from __future__ import annotations

from .common import Command

GROUP = ("workflow", "the pipeline's stage table, written out for DVC",
         "Snakemake (Snakefile) and DVC (dvc.yaml) run the same stages from one table in the package.")

COMMANDS: tuple[Command, ...] = ()
