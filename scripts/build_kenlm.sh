#!/usr/bin/env bash
# Build KenLM's `lmplz` and `build_binary` once, from the pinned kenlm==0.3.0 PyPI sdist.
#
#   scripts/build_kenlm.sh [DEST] [--manifest FILE]
#
# DEST defaults to ~/.cache/b2txt/kenlm; the binaries go to DEST/bin. With --manifest, FILE (JSON)
# then records where the tools are and their sha256 checksums: the pipeline's kenlm_tools stage
# writes it under results/ so that DVC, which tracks nothing outside the repository, has an output
# of this stage for the LM stages to depend on (a rebuilt tool changes the file). It is written
# atomically, after both tools were found to run.
#
# Why: no Debian or PyPI package ships lmplz (the kenlm-ex sdist's lmplz crashes at start), but the
# kenlm 0.3.0 sdist holds the full C++ source. Static binaries (-DFORCE_STATIC=ON) need nothing at
# run time. With lmplz and build_binary on PATH (conda-forge's kenlm) it links those instead.
# Idempotent: exits at once when both binaries exist and run. Builds in a temporary
# directory and moves the binaries into place only when both built, so a failed or killed build
# never leaves half a tool chain behind. Needs the Debian packages listed in scripts/bootstrap.sh
# (build-essential cmake zlib1g-dev libbz2-dev liblzma-dev libboost-{program-options,system,
# thread,test}-dev; cmake does not configure without the Boost test package).
set -euo pipefail

KENLM_VERSION=0.3.0
DEST=$HOME/.cache/b2txt/kenlm
MANIFEST=
while (($#)); do
  case $1 in
    --manifest) MANIFEST=${2:?--manifest needs a file name}; shift 2 ;;
    -*) echo "[build_kenlm] unknown option $1 (usage: scripts/build_kenlm.sh [DEST] [--manifest FILE])" >&2; exit 2 ;;
    *) DEST=$1; shift ;;
  esac
done
BIN="$DEST/bin"
HERE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$HERE/.venv/bin/python" ]]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi

say() { echo "[build_kenlm] $*" >&2; }

# A tool "runs" when it starts and prints its usage (both print it and exit non-zero on --help).
runs() {
  local out
  out=$("$1" --help 2>&1 || true)
  [[ "${out,,}" == *usage* || "${out,,}" == *--order* ]]
}

json_string() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# The manifest: the tools' directory and checksums, written to a temporary sibling and renamed.
write_manifest() {
  [[ -n "$MANIFEST" ]] || return 0
  local dir tmp bin
  dir=$(dirname "$MANIFEST")
  mkdir -p "$dir"
  bin=$(cd "$BIN" && pwd)
  tmp=$(mktemp "$dir/.$(basename "$MANIFEST").tmp-XXXXXX")
  {
    printf '{\n  "bin": %s,\n' "$(json_string "$bin")"
    printf '  "sha256": {\n'
    printf '    "lmplz": "%s",\n' "$(sha256sum "$BIN/lmplz" | cut -d' ' -f1)"
    printf '    "build_binary": "%s"\n' "$(sha256sum "$BIN/build_binary" | cut -d' ' -f1)"
    printf '  }\n}\n'
  } >"$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$MANIFEST"
}

if [[ -x "$BIN/lmplz" && -x "$BIN/build_binary" ]] && runs "$BIN/lmplz" && runs "$BIN/build_binary"; then
  write_manifest
  exit 0
fi

# Tools already on PATH (conda-forge's kenlm in envs/lm.yaml) are linked, not compiled again.
if command -v lmplz >/dev/null 2>&1 && command -v build_binary >/dev/null 2>&1 \
   && runs "$(command -v lmplz)" && runs "$(command -v build_binary)"; then
  mkdir -p "$DEST"
  stage=$(mktemp -d "$DEST/.link.XXXXXX")
  ln -s "$(command -v lmplz)" "$stage/lmplz" && ln -s "$(command -v build_binary)" "$stage/build_binary"
  if [[ -d "$BIN" ]]; then rm -rf "$BIN"; fi
  mv "$stage" "$BIN"
  say "linked $BIN/lmplz and $BIN/build_binary to the tools on PATH ($(dirname "$(command -v lmplz)"))"
  exit 0
fi

missing=()
for tool in cmake make c++; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if ((${#missing[@]})); then
  say "missing build tools: ${missing[*]}"
  say "install: apt-get install -y build-essential cmake zlib1g-dev libbz2-dev liblzma-dev libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev"
  exit 1
fi

mkdir -p "$DEST"
work=$(mktemp -d "$DEST/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

say "downloading the kenlm==$KENLM_VERSION source distribution"
"$PYTHON" -m pip download -q --no-binary :all: --no-deps --no-build-isolation "kenlm==$KENLM_VERSION" -d "$work/dl" >&2 \
  || "$PYTHON" -m pip download -q --no-binary :all: --no-deps "kenlm==$KENLM_VERSION" -d "$work/dl" >&2
tar -xzf "$work"/dl/kenlm-*.tar.gz -C "$work"
src=$(find "$work" -maxdepth 2 -name CMakeLists.txt -path "*kenlm-*" -printf '%h\n' | head -n1)
[[ -n "$src" ]] || { say "no CMakeLists.txt in the kenlm sdist"; exit 1; }

say "building lmplz and build_binary (static, Release) in $work"
jobs=$(nproc 2>/dev/null || echo 2)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DFORCE_STATIC=ON >"$work/cmake.log" 2>&1 \
  || { tail -n 40 "$work/cmake.log" >&2; say "cmake failed (are the Boost -dev packages installed?)"; exit 1; }
cmake --build "$work/build" --target lmplz build_binary -j "$jobs" >"$work/make.log" 2>&1 \
  || { tail -n 40 "$work/make.log" >&2; say "build failed"; exit 1; }

stage="$work/bin"
mkdir -p "$stage"
for tool in lmplz build_binary; do
  found=$(find "$work/build" -type f -name "$tool" -perm -u+x | head -n1)
  [[ -n "$found" ]] || { say "$tool was not built"; exit 1; }
  cp "$found" "$stage/$tool"
  runs "$stage/$tool" || { say "$tool was built but does not run"; exit 1; }
done

# Swap the finished bin/ into place (renames within DEST).
if [[ -d "$BIN" ]]; then mv "$BIN" "$work/old-bin"; fi
mv "$stage" "$BIN"
say "installed $BIN/lmplz and $BIN/build_binary"
write_manifest
