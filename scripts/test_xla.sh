#!/usr/bin/env bash
# make test-xla: the TPU code path (device 'xla') run for real on XLA:CPU.
#
# Builds .venv-xla (idempotent) with torch 2.9.0 + torch_xla 2.9.0, the pair that imports
# together (torch_xla 2.9.0 is built against torch 2.9.0 exactly; it cannot sit beside the main
# environment's torch 2.13), the package's runtime dependencies at the pins of pyproject.toml
# and the package itself (editable, --no-deps so torch stays at 2.9.0). Then runs tests/xla
# with PJRT_DEVICE=CPU. PyPI's torch 2.9.0 is the CUDA build: the first run downloads ~4 GB and
# the venv takes several GB on disk, so this is not part of `make test` or CI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${XLA_VENV:-.venv-xla}
PYTHON=${PYTHON:-python3.11}
MAIN_PY=${B2TXT_MAIN_PYTHON:-.venv/bin/python}  # the main environment, for the checkpoint round trip
XLA_PINS=(torch==2.9.0 torch_xla==2.9.0)
# The package's core (no 'train' extra: its torch is 2.13) and, from the dev pins of
# pyproject.toml, what the tests need.
NEEDED=(pytest pytest-timeout)

say() { echo "[test-xla] $*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "Python >= 3.11 is required ($PYTHON); set PYTHON=/path/to/python3.11"
  exit 1
fi

stamp="$VENV/.b2txt-xla"
want=$( (cat pyproject.toml requirements.lock; echo "${XLA_PINS[*]} ${NEEDED[*]}") | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  say "$VENV is up to date"
else
  t0=$(date +%s)
  [[ -x "$VENV/bin/python" ]] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  pins=$("$PYTHON" - "${NEEDED[@]}" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = project["optional-dependencies"]["dev"]
by_name = {re.split(r"[=<>!~ \[]", s, 1)[0].lower(): s for s in specs}
print(" ".join(by_name[name] for name in sys.argv[1:]))
PY
)
  # requirements.lock (less torch, pinned to 2.13 there) constrains the transitive dependencies.
  grep -v '^torch==' requirements.lock > "$VENV/constraints.txt"
  say "installing ${XLA_PINS[*]} $pins into $VENV (first time: ~4 GB download)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q -c "$VENV/constraints.txt" "${XLA_PINS[@]}" $pins -e .
  echo "$want" > "$stamp"
  say "built $VENV in $(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1)"
fi

if [[ ! -x "$MAIN_PY" ]]; then
  say "the main environment ($MAIN_PY) is missing: run 'make bootstrap' first"
  exit 1
fi
# XLA on the CPU (PJRT); the report of measured numbers (compile counts, step times) goes to JSON
export PJRT_DEVICE=CPU B2TXT_MAIN_PYTHON="$MAIN_PY" B2TXT_XLA_REPORT=${B2TXT_XLA_REPORT:-results/xla/report.json}
versions='import torch, torch_xla; print("torch", torch.__version__, "+ torch_xla", torch_xla.__version__)'
say "$("$VENV/bin/python" -c "$versions")"
"$VENV/bin/python" -m pytest tests/xla -v -p no:cacheprovider "$@"
