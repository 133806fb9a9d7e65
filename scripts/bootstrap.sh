#!/usr/bin/env bash
# Bootstrap: system packages (Debian/Ubuntu, as root) and the Python environment (.venv).
# Idempotent: does nothing when everything is in place. Without root it still builds .venv, then
# lists the missing system packages, each with what it serves, the apt-get line to install them,
# and exits 1 (the parts of the pipeline that need them would fail later, less clearly).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# redis-server: the language-model server's transport; fortunes: the default English corpus;
# the rest build KenLM's lmplz/build_binary (scripts/build_kenlm.sh; cmake needs the Boost test package).
APT_PACKAGES=(${B2TXT_APT_PACKAGES:-redis-server fortunes build-essential cmake zlib1g-dev libbz2-dev liblzma-dev libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev})  # override only to test this script

say() { echo "[bootstrap] $*" >&2; }

# What each system package serves (shown when it is missing).
serves() {
  case "$1" in
    redis-server) echo "the LM server's transport (b2txt evaluate, lm-server; tests marked redis)" ;;
    fortunes) echo "the default English corpus (corpus.source_dir); or set corpus.source_dir/files" ;;
    python3-venv) echo "creating $VENV (python -m venv needs ensurepip)" ;;
    build-essential|cmake|zlib1g-dev|libbz2-dev|liblzma-dev|libboost-*) echo "building KenLM's lmplz/build_binary (scripts/build_kenlm.sh)" ;;
    *) echo "(needed by the pipeline)" ;;
  esac
}

missing_apt=()
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing_apt+=("$pkg")
  done
else
  command -v redis-server >/dev/null 2>&1 || missing_apt+=(redis-server)
  [[ -d /usr/share/games/fortunes ]] || missing_apt+=(fortunes)
fi
# Stock Debian and Ubuntu split venv (ensurepip) out of python3.
if [[ ! -x "$VENV/bin/python" ]] && ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
  missing_apt+=(python3-venv)
fi
if ((${#missing_apt[@]})) && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  say "installing ${missing_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
  missing_apt=()
fi

report_missing() {
  ((${#missing_apt[@]})) || return 0
  say "missing system packages (not root: not installed):"
  for pkg in "${missing_apt[@]}"; do say "  $pkg: $(serves "$pkg")"; done
  say "install them with:  sudo apt-get install -y ${missing_apt[*]}"
  say "(other systems: a redis-server binary on PATH, and a corpus: set corpus.source_dir/files in config/config.yaml)"
  exit 1
}
trap report_missing EXIT

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  say "Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1 || echo missing)); set PYTHON=/path/to/python3.11"
  exit 1
fi

stamp="$VENV/.b2txt-bootstrap"
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$VENV/bin/b2txt" ]]; then
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  if [[ " ${missing_apt[*]} " == *" python3-venv "* ]]; then
    say "cannot create $VENV without python3-venv"
    exit 1
  fi
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
say "installing the package and its pinned dependencies into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# requirements.lock pins every transitive dependency; torch==2.13.0 (no local tag) lets pip
# take the CPU wheel on CPU machines and a CUDA build of the same version elsewhere.
"$VENV/bin/python" -m pip install -q -c requirements.lock -e ".[all,dev]"
echo "$want" > "$stamp"
say "done: $("$VENV/bin/b2txt" --version)"
