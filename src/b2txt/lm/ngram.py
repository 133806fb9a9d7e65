"""n-gram estimation: KenLM ``lmplz`` (default) or SRILM ``ngram-count`` -> ARPA, and KenLM binaries.

KenLM's tools are not on PyPI or in Debian: ``scripts/build_kenlm.sh`` builds them once into
``LMConfig.kenlm_dir/bin`` (default ``~/.cache/b2txt/kenlm/bin``); PATH is the fallback. The
binary ``lm.bin`` is always KenLM's ``build_binary``, also of an SRILM ARPA (and of an imported
one, :mod:`b2txt.lm.arpa`). SRILM itself is in no package index: ``ngram-count`` must be on PATH.

Measured pitfalls handled here (FIELD-NOTES §KenLM):

- lmplz takes 80 % of RAM unless told otherwise: ``-S`` (LMConfig.memory) and ``-T`` (a temporary
  directory beside the output, not a possibly small /tmp) are always passed;
- tiny corpora cannot estimate Kneser-Ney discounts: ``--discount_fallback`` is always passed;
- lmplz refuses a literal ``<unk>`` in its text ("Special word <unk> is not allowed"). The LM text
  keeps the SRILM convention (OOV words are ``<unk>``), so the text is fed to lmplz with ``<unk>``
  renamed to a placeholder word, and the ARPA is rewritten so the placeholder becomes ``<unk>``
  again (its unigram probability log-added to lmplz's own ``<unk>``). The ARPA then means what
  SRILM's ``-unk -map-unk <unk>`` ARPA means: ``<unk>`` carries the OOV words' mass.

Every output is written atomically; a failing tool leaves no ARPA behind and its stderr (tail)
is in the error message.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..ground.errors import B2txtError
from ..ground.fileio import atomic_dir, atomic_file
from ..ground.procs import dies_with_parent
from .text import UNK

#: The name ``<unk>`` has while lmplz estimates (any word the normalised text cannot contain).
PLACEHOLDER = "<b2txt-unk>"
DEFAULT_KENLM_DIR = "~/.cache/b2txt/kenlm"
_HEADER_RE = re.compile(r"^ngram\s+(\d+)\s*=\s*(\d+)\s*$")


class ToolError(B2txtError):
    """An external LM tool is missing or failed."""


@dataclass(frozen=True)
class NgramFiles:
    """What :func:`build_ngram` wrote for one order."""

    order: int
    arpa: Path  # lm.arpa: the LM the decoding graph uses (pruned when pruning is configured)
    binary: Path | None  # KenLM trie binary of ``arpa`` (None only when not asked for)
    unpruned_arpa: Path | None  # only when pruned: the full LM, for G_no_prune.fst rescoring


def ngram_paths(out_dir: str | Path) -> tuple[Path, Path, Path]:
    """``(lm.arpa, lm.bin, lm.unpruned.arpa)`` of one order's directory (``<lm>/<n>gram/``).

    The decoding graph (TLG.fst, words.txt, …) is written into the same directory, so one
    directory per order serves both decoders (``b2txt decode --lm DIR``).
    """
    out_dir = Path(out_dir)
    return out_dir / "lm.arpa", out_dir / "lm.bin", out_dir / "lm.unpruned.arpa"


def find_tool(name: str, kenlm_dir: str | Path | None = DEFAULT_KENLM_DIR) -> Path:
    """A KenLM tool from ``kenlm_dir/bin``, else from PATH; a clear error naming the fix."""
    if kenlm_dir is not None:
        candidate = Path(kenlm_dir).expanduser() / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    where = f"{Path(kenlm_dir).expanduser() / 'bin'} or " if kenlm_dir is not None else ""
    raise ToolError(f"KenLM tool `{name}` not found in {where}PATH; build it with "
                    f"`scripts/build_kenlm.sh {kenlm_dir or DEFAULT_KENLM_DIR}` (needs cmake and the "
                    f"Boost -dev packages of scripts/bootstrap.sh), or set lm.kenlm_dir")


def check_prune(order: int, prune: Sequence[int] | None) -> list[int] | None:
    """lmplz ``--prune`` thresholds, validated; None when nothing is pruned.

    lmplz cannot prune unigrams and wants non-decreasing thresholds (count <= t is dropped).
    """
    if prune is None or not any(prune):
        return None
    prune = [int(t) for t in prune]
    if len(prune) != order:
        raise B2txtError(f"lm.prune[{order}]: needs {order} thresholds (one per order), got {prune}")
    if prune[0] != 0:
        raise B2txtError(f"lm.prune[{order}]: {prune}: unigrams cannot be pruned (first value must be 0)")
    if any(b < a for a, b in zip(prune, prune[1:])):
        raise B2txtError(f"lm.prune[{order}]: {prune}: thresholds must not decrease")
    return prune


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # lmplz draws progress bars with many dashes; keep the informative lines
    kept = [ln for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("-0123456789*")]
    return "\n".join(kept[-lines:])


def _run_lmplz(lmplz: Path, text: Path, arpa: Path, order: int, prune: list[int] | None,
               memory: str, tmp: Path) -> None:
    cmd = [str(lmplz), "-o", str(order), "-S", memory, "-T", str(tmp), "--discount_fallback",
           "--arpa", str(arpa)]
    if prune:
        cmd += ["--prune", *map(str, prune)]
    log = tmp / "lmplz.log"
    with log.open("wb") as err, text.open("rb") as src:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=dies_with_parent())
        assert proc.stdin is not None
        unk, placeholder = UNK.encode(), PLACEHOLDER.encode()
        try:
            for line in src:  # stream, so a corpus of any size needs no second copy on disk
                proc.stdin.write(line.replace(unk, placeholder))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # lmplz died early; its exit status and log tell why
        rc = proc.wait()
    if rc != 0:
        raise ToolError(f"lmplz failed on {text} (order {order}, exit status {rc}):\n{_tail(log)}")


def _rewrite_unk(raw: Path, out: Path) -> None:
    """Copy lmplz's ARPA, turning the placeholder into ``<unk>`` (log-adding the two unigrams)."""
    unk_prob: float | None = None
    placeholder_line: list[str] | None = None
    with raw.open(encoding="utf-8") as f:  # pass 1: the unigram section only
        section = 0
        for line in f:
            if line.startswith("\\1-grams:"):
                section = 1
                continue
            if section == 1:
                if line.startswith("\\"):
                    break
                cols = line.rstrip("\n").split("\t")
                if len(cols) >= 2 and cols[1] == UNK:
                    unk_prob = float(cols[0])
                elif len(cols) >= 2 and cols[1] == PLACEHOLDER:
                    placeholder_line = cols
    merge = unk_prob is not None and placeholder_line is not None
    with raw.open(encoding="utf-8") as f, out.open("w", encoding="utf-8") as o:
        section = 0  # 0: header, n: the n-grams section
        for line in f:
            if line.startswith("\\"):
                m = re.match(r"\\(\d+)-grams:", line)
                section = int(m.group(1)) if m else 0
            elif section == 0 and merge and (m := _HEADER_RE.match(line.strip())) and m.group(1) == "1":
                line = f"ngram 1={int(m.group(2)) - 1}\n"  # two unigrams became one
            elif section == 1 and merge:
                cols = line.rstrip("\n").split("\t")
                if len(cols) >= 2 and cols[1] == UNK:
                    continue  # merged into the placeholder's line
                if len(cols) >= 2 and cols[1] == PLACEHOLDER:
                    assert unk_prob is not None
                    p = float(cols[0])
                    merged = max(p, unk_prob) + math.log10(1 + 10 ** (-abs(p - unk_prob)))
                    cols[0], cols[1] = f"{merged:.7g}", UNK
                    line = "\t".join(cols) + "\n"
            if PLACEHOLDER in line:
                line = line.replace(PLACEHOLDER, UNK)
            o.write(line)


def estimate_arpa(text: str | Path, out: str | Path, order: int, *, prune: Sequence[int] | None = None,
                  memory: str = "20%", kenlm_dir: str | Path | None = DEFAULT_KENLM_DIR,
                  tool: str = "kenlm") -> Path:
    """Estimate an order-``order`` ARPA from an LM text (one sentence per line, ``<unk>`` for OOV).

    KenLM: modified Kneser-Ney, ``--prune`` count thresholds as in lmplz. SRILM (``tool='srilm'``,
    ``ngram-count`` on PATH): Good-Turing as in the published recipe, thresholds ``t`` mapped to
    ``-gt<n>min t+1`` (same meaning: n-grams seen at most ``t`` times are dropped).
    """
    text, out = Path(text), Path(out)
    if not text.is_file() or text.stat().st_size == 0:
        raise B2txtError(f"{text}: LM text not found or empty (run the LM text stage first)")
    thresholds = check_prune(order, prune)
    if tool == "srilm":
        return _estimate_srilm(text, out, order, thresholds)
    if tool != "kenlm":
        raise B2txtError(f"lm.tool: unknown n-gram tool {tool!r} (kenlm or srilm)")
    lmplz = find_tool("lmplz", kenlm_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.lmplz-", dir=out.parent) as tmpdir:
        tmp = Path(tmpdir)
        raw = tmp / "raw.arpa"
        _run_lmplz(lmplz, text, raw, order, thresholds, memory, tmp)
        with atomic_file(out) as final:
            _rewrite_unk(raw, final)
    return out


def _estimate_srilm(text: Path, out: Path, order: int, thresholds: list[int] | None) -> Path:
    exe = shutil.which("ngram-count")
    if exe is None:
        raise ToolError("lm.tool is 'srilm' but `ngram-count` is not on PATH; install SRILM "
                        "(http://www.speech.sri.com/projects/srilm/) and add its bin directory to PATH, "
                        "or use lm.tool: kenlm")
    with atomic_file(out) as tmp:
        cmd = [exe, "-order", str(order), "-text", str(text), "-lm", str(tmp), "-unk", "-map-unk", UNK]
        for n, t in enumerate(thresholds or [], start=1):
            if n > 1:
                cmd += [f"-gt{n}min", str(t + 1)]
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=dies_with_parent())
        if proc.returncode != 0:
            raise ToolError(f"ngram-count failed on {text} (exit status {proc.returncode}):\n"
                            + "\n".join(proc.stderr.splitlines()[-25:]))
    return out


def build_binary(arpa: str | Path, out: str | Path, *, memory: str = "20%",
                 kenlm_dir: str | Path | None = DEFAULT_KENLM_DIR) -> Path:
    """KenLM trie binary of an ARPA (what the lexicon decoder loads; fast to mmap)."""
    arpa, out = Path(arpa), Path(out)
    counts = read_arpa_counts(arpa)  # a clear error for a missing or broken ARPA before the tool runs
    exe = find_tool("build_binary", kenlm_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.bb-", dir=out.parent) as tmpdir, \
            atomic_file(out) as tmp:
        source = arpa
        if max(counts) == 1:  # KenLM "assumes at least a bigram model": same LM, zero bigrams
            source = Path(tmpdir) / "as_bigram.arpa"
            _unigram_as_bigram(arpa, source)
        proc = subprocess.run([str(exe), "-S", memory, "-T", tmpdir, "trie", str(source), str(tmp)],
                              capture_output=True, text=True, preexec_fn=dies_with_parent())
        if proc.returncode != 0:
            raise ToolError(f"build_binary failed on {arpa} (exit status {proc.returncode}):\n"
                            + "\n".join(proc.stderr.splitlines()[-25:]))
    return out


def _unigram_as_bigram(arpa: Path, out: Path) -> None:
    """A unigram ARPA as an equivalent bigram ARPA with no bigrams (every backoff weight 0)."""
    with arpa.open(encoding="utf-8") as f, out.open("w", encoding="utf-8") as o:
        section = 0
        for line in f:
            s = line.rstrip("\n")
            if s.startswith("\\"):
                if s.startswith("\\end\\"):
                    o.write("\\2-grams:\n\n")
                section = 1 if s.startswith("\\1-grams:") else 0
            elif section == 0 and _HEADER_RE.match(s.strip()):
                o.write(f"{s}\nngram 2=0\n")
                continue
            elif section == 1 and s.strip():
                cols = s.split("\t")
                line = "\t".join(cols[:2] + ["0"]) + "\n"
            o.write(line)


def read_arpa_counts(arpa: str | Path) -> dict[int, int]:
    """``{order: number of n-grams}`` from an ARPA header; an error naming the file if it is not one."""
    arpa = Path(arpa)
    if not arpa.is_file():
        raise B2txtError(f"{arpa}: ARPA file not found")
    counts: dict[int, int] = {}
    seen_data = False
    try:
        with arpa.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                s = line.strip()
                if s == "\\data\\":
                    seen_data = True
                elif s.startswith("\\1-grams:") or i > 1000:
                    break
                elif seen_data and (m := _HEADER_RE.match(s)):
                    counts[int(m.group(1))] = int(m.group(2))
    except UnicodeDecodeError:
        raise B2txtError(f"{arpa}: not an ARPA language model (not UTF-8 text; a KenLM binary?)") from None
    if not seen_data or not counts or sorted(counts) != list(range(1, max(counts) + 1)):
        raise B2txtError(f"{arpa}: not an ARPA language model (expected a \\data\\ header with "
                         f"'ngram 1=…' lines)")
    return counts


def build_ngram(text: str | Path, out_dir: str | Path, order: int, *, prune: Sequence[int] | None = None,
                memory: str = "20%", kenlm_dir: str | Path | None = DEFAULT_KENLM_DIR,
                tool: str = "kenlm", binary: bool = True) -> NgramFiles:
    """One order of the ``lm ngram`` stage: ``lm.arpa`` + ``lm.bin`` (+ ``lm.unpruned.arpa`` if pruned),
    the directory ``out_dir`` replaced whole.

    ``lm.bin`` is KenLM's ``build_binary`` whichever ``tool`` estimated the ARPA (the stage
    declares it in both modes), so a missing ``build_binary`` stops the build before estimating.
    """
    thresholds = check_prune(order, prune)
    if binary:
        find_tool("build_binary", kenlm_dir)
    # the whole directory is built beside the old one and swapped in: a kill leaves the old LM
    # as it was, never a new ARPA beside an old binary, and no graph of the old LM survives
    with atomic_dir(out_dir) as tmp:
        arpa, bin_path, unpruned = ngram_paths(tmp)
        estimate_arpa(text, arpa, order, prune=thresholds, memory=memory, kenlm_dir=kenlm_dir, tool=tool)
        if thresholds:
            estimate_arpa(text, unpruned, order, prune=None, memory=memory, kenlm_dir=kenlm_dir, tool=tool)
        if binary:
            build_binary(arpa, bin_path, memory=memory, kenlm_dir=kenlm_dir)
    arpa, bin_path, unpruned = ngram_paths(out_dir)
    made_binary = bin_path if binary else None
    return NgramFiles(order, arpa, made_binary, unpruned if thresholds else None)
