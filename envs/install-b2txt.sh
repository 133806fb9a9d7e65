#!/usr/bin/env bash
# Post-deploy script of every envs/<env>.yaml (each <env>.post-deploy.sh links here): Snakemake
# runs it once, inside the new conda env, after creating the env. It installs the b2txt package
# itself, editable from this checkout, without dependencies (the env file holds them), so the
# rules run the checkout's current code. Snakemake runs a copy of this file from .snakemake/conda/,
# so the checkout is found through B2TXT_SOURCE, which workflow/rules/common.smk sets to the
# Snakefile's directory, never through this file's own location.
set -euo pipefail
src=${B2TXT_SOURCE:-}
if [[ -z "$src" || ! -f "$src/pyproject.toml" ]]; then
  echo "install-b2txt: B2TXT_SOURCE ('$src') is not the b2txt checkout; run Snakemake with this repository's Snakefile" >&2
  exit 1
fi
python -m pip install --no-deps --quiet -e "$src"
b2txt --version
