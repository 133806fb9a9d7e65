# The two commands: `make run` (the pipeline on config/config.yaml) and `make test`.
# Both bootstrap first (apt packages when root, the .venv with the package); idempotent.
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
CORES ?= all
PYTEST_ARGS ?=

.PHONY: all bootstrap run test test-fast report lint clean help

all: help

help:
	@echo "make run        bootstrap, then run the pipeline: snakemake --cores $(CORES)"
	@echo "make test       bootstrap, then run the test suite (pytest)"
	@echo "make test-fast  tests without the end-to-end pipeline runs"
	@echo "make report     snakemake --report results/report.html"
	@echo "make bootstrap  apt packages (root) + $(VENV) with the package installed"

bootstrap:
	@bash scripts/bootstrap.sh

run: bootstrap
	snakemake --cores $(CORES)

test: bootstrap
	python -m pytest $(PYTEST_ARGS)

test-fast: bootstrap
	python -m pytest -m "not slow" $(PYTEST_ARGS)

report: bootstrap
	snakemake --cores $(CORES) --report results/report.html

clean:
	rm -rf results/* .snakemake
