#!/usr/bin/env bash
# Bootstrap: system packages (Debian/Ubuntu, as root) and the Python environment (.venv).
# Idempotent: does nothing when everything is in place. Without root it prints the exact
# apt-get command to run and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# redis-server: the language-model server's transport; fortunes: the default English corpus;
# the rest build KenLM's lmplz/build_binary (scripts/build_kenlm.sh; cmake needs the Boost test package).
APT_PACKAGES=(${B2TXT_APT_PACKAGES:-redis-server fortunes build-essential cmake zlib1g-dev libbz2-dev liblzma-dev libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev})  # override only to test this script

say() { echo "[bootstrap] $*" >&2; }

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
if ((${#missing_apt[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >/dev/null
  else
    say "missing system packages: ${missing_apt[*]}"
    say "install them with:  sudo apt-get install -y ${missing_apt[*]}"
    say "(other systems: a redis-server binary on PATH, and a corpus: set corpus.source_dir/files in config/config.yaml)"
    exit 1
  fi
fi

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
