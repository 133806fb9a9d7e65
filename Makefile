# The two commands: `make run` (the pipeline on config/config.yaml) and `make test`.
# Both bootstrap first (apt packages when root, the .venv with the package); idempotent.
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
CORES ?= all
PYTEST_ARGS ?=

.PHONY: all bootstrap run test test-fast test-envs test-xla test-cluster report lint clean help

all: help

help:
	@echo "make run        bootstrap, then run the pipeline: snakemake --cores $(CORES)"
	@echo "make test       bootstrap, then the layer contract (lint-imports), lint (ruff) and the test suite"
	@echo "make test-fast  the same without the slow, multi-process and KenLM tests (under 2 minutes)"
	@echo "make lint       lint-imports (the package's layers) and ruff"
	@echo "make test-envs  one venv per rule family (.venvs/, pip twins of envs/*.yaml) and the tiny DAG in them"
	@echo "make test-cluster  the tiny pipeline through profiles/slurm on a private Slurm cluster (root)"
	@echo "make test-xla   the TPU path on XLA:CPU in .venv-xla (torch 2.9 + torch_xla; ~4 GB download)"
	@echo "make report     snakemake --report results/report.html"
	@echo "make bootstrap  apt packages (root) + $(VENV) with the package installed"

bootstrap:
	@bash scripts/bootstrap.sh

run: bootstrap
	snakemake --cores $(CORES)

test: lint
	python -m pytest $(PYTEST_ARGS)

# Markers (pyproject.toml): slow = the whole pipeline through Snakemake/DVC, redis = LM-server processes, ddp = several training
# processes, kenlm = needs lmplz (built once), cluster = a Slurm cluster (never in make test).
test-fast: lint
	python -m pytest -m "not slow and not redis and not ddp and not kenlm and not cluster" $(PYTEST_ARGS)

# One venv per rule family in .venvs/ (the core + that family's extra: what envs/*.yaml hold for
# conda), built once and reused; the tiny DAG runs with each job in its rule's venv and must give
# the outputs of the one-venv run. Part of .ci/run (~1.5 min with the venvs built, ~3 min without).
test-envs: bootstrap
	python -m pytest -m envs tests/test_family_envs.py $(PYTEST_ARGS)

# The layers of the package (an import-linter contract in pyproject.toml: no upward import, no
# cycle) and pyflakes/import-order checks.
lint: bootstrap
	lint-imports
	ruff check src tests benchmarks

# snakemake --profile profiles/slurm on a one-node Slurm cluster of its own (munged, slurmctld and
# slurmd on ports of their own, all stopped at the end), compared with a local run. As root it
# installs slurmd, slurmctld, slurm-client and munge. Part of .ci/run, after `make test`.
test-cluster: bootstrap
	bash scripts/test_cluster.sh

# Not part of `make test` or CI: builds .venv-xla (torch 2.9.0 + torch_xla 2.9.0, ~4 GB download).
test-xla: bootstrap
	bash scripts/test_xla.sh $(PYTEST_ARGS)

report: bootstrap
	snakemake --cores $(CORES) --report results/report.html

clean:
	rm -rf results/* .snakemake
