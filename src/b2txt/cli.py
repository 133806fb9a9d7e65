"""``b2txt``: one command per pipeline stage. Snakemake rules and DVC stages call these.

Every command reads files and writes files (atomically); bad input ends with one clear
message and exit status 2, never a traceback from deep inside a library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .config import DEFAULT_CONFIGS, PipelineConfig, config_to_yaml, json_schema, load_config
from .errors import B2txtError


def log(msg: str) -> None:
    print(f"[b2txt] {msg}", file=sys.stderr, flush=True)


def _config(args: argparse.Namespace) -> PipelineConfig:
    paths = args.config
    if not paths:
        paths = [p for p in DEFAULT_CONFIGS if p.is_file()] or None
    cfg = load_config(paths)
    log(f"config: {' + '.join(map(str, paths)) if paths else 'built-in defaults'}")
    return cfg


def _add_config(p: argparse.ArgumentParser) -> None:
    default = " + ".join(map(str, DEFAULT_CONFIGS))
    p.add_argument("--config", type=Path, action="append", metavar="FILE",
                   help=f"config YAML; repeat to merge several, later ones override (default: {default} "
                        "where present, else built-in defaults)")


# ----------------------------------------------------------------------------- commands

def cmd_corpus(args: argparse.Namespace) -> int:
    from .corpus import CorpusStats, extract_sentences, read_sources, write_sentences
    from .phonemes import Lexicon

    c = _config(args).corpus
    out = args.out or Path(c.out)
    stats = CorpusStats()
    sentences = extract_sentences(read_sources(c.source_dir, c.files), Lexicon.from_cmudict(),
                                  c.min_words, c.max_words, stats)
    if not sentences:
        raise B2txtError(f"no usable sentences in the corpus sources ({stats.summary()})")
    write_sentences(out, sentences)
    log(f"{out}: {stats.summary()}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .corpus import read_sentences
    from .simulate import simulate

    cfg = _config(args)
    sim = cfg.simulate if args.seed is None else cfg.simulate.model_copy(update={"seed": args.seed})
    sentences_path = args.sentences or Path(cfg.corpus.out)
    sentences = read_sentences(sentences_path)
    t0 = time.time()
    out = simulate(sim, sentences, args.out, log=log)
    log(f"{out}: {sim.n_sessions} sessions simulated (seed {sim.seed}) in {time.time() - t0:.1f} s")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """The data set data.source names, made or fetched into --out (DVC's single data stage)."""
    from .data.dryad import discover
    from .download import HttpOptions, download

    cfg = _config(args)
    source = cfg.data.source
    if source == "simulated":
        return cmd_simulate(argparse.Namespace(**vars(args), seed=None))
    if source == "dryad":
        d = cfg.download
        download(["data"], args.out, d.files, d.api_root, HttpOptions(timeout_s=d.timeout_s, retries=d.retries),
                 dois=d.datasets, log=log, partial_dir=d.partial_dir or f"{args.out}.partial")
    if not Path(args.out).is_dir():
        raise B2txtError(f"{args.out}: data.source is {source!r} but the directory does not exist")
    files, problems = discover(args.out)
    if not files:
        raise B2txtError(f"{args.out}: no Dryad-layout data files (data.source {source!r})"
                         + (f": {problems[0]}" if problems else ""))
    sessions = {f.session for f in files}
    log(f"{args.out}: {len(files)} files of {len(sessions)} sessions ({source}"
        f"{', used as it is' if source == 'dir' else ''}); `b2txt validate` checks every trial")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .data.validate import validate_dataset
    from .fileio import write_text_atomic

    report = validate_dataset(args.data_dir)
    text = f"{args.data_dir}: {report.summary()}\n"
    if args.report:
        if report.ok:
            write_text_atomic(args.report, text)
        elif Path(args.report).exists():
            Path(args.report).unlink()  # never leave a stale "clean" report behind
    if report.ok:
        log(text.strip())
        return 0
    print(text, file=sys.stderr, end="")
    return 2


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .data.store import build_manifest, write_manifest

    manifest = build_manifest(args.data)
    write_manifest(manifest, args.out)
    counts = manifest.groupby("split").size().to_dict()
    log(f"{args.out}: {len(manifest)} trials from {manifest['session'].nunique()} sessions {counts}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    tcfg = _config(args).train
    if args.threads:
        tcfg = tcfg.model_copy(update={"threads": args.threads})
    if args.device:
        tcfg = tcfg.model_copy(update={"device": args.device})
    if args.nproc < 1:
        raise B2txtError(f"--nproc must be at least 1, not {args.nproc}")
    best = train(tcfg, args.data, args.manifest, args.out, log=log, nproc=args.nproc)
    log(f"{args.out}: best val PER {best.per:.4f}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from .data.store import build_manifest, write_manifest
    from .infer import infer_split

    def run(manifest: Path) -> int:
        return infer_split(args.model, args.data, manifest, args.split, args.out, args.device, args.batch_size,
                           args.known_sessions_only, args.chunk_bins, log)

    if args.manifest is not None:
        n = run(args.manifest)
    else:  # a model and a data directory are enough
        import tempfile

        with tempfile.TemporaryDirectory(prefix="b2txt-manifest-") as tmpdir:
            manifest = Path(tmpdir) / "manifest.csv"
            write_manifest(build_manifest(args.data, [args.split]), manifest)
            n = run(manifest)
    log(f"{args.out}: logits of {n} {args.split} trials")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    ccfg = _config(args).calibrate
    if args.session is not None:
        ccfg = ccfg.model_copy(update={"session": int(args.session) if args.session.lstrip("-").isdigit() else args.session})
    if args.n_sentences:
        ccfg = ccfg.model_copy(update={"n_sentences": args.n_sentences})
    table = calibrate(args.model, args.data, args.manifest, ccfg, args.out, args.device, log)
    print(table[["session", "n_sentences", "PER"]].to_string(index=False))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    if not args.logits and not args.decoded:
        raise B2txtError("give --logits (phoneme error rate), --decoded (word error rate) or both")
    split = args.split or "val"
    summary: dict = {}
    if args.logits:
        from .evaluate import phoneme_table, write_scores
        from .logits import read_logits

        table = phoneme_table(read_logits(args.logits))
        if table.empty:
            raise B2txtError(f"{args.logits}: no labelled trials to score")
        metrics = write_scores(table, args.out, split)
        log(f"{args.out}: {split} PER {metrics['PER']:.4f} over {metrics['n_trials']} trials")
        summary.update(PER=metrics["PER"], n_trials=metrics["n_trials"])
    if args.decoded:
        from .evaluate import write_word_scores
        from .lm.decode import read_decoded

        decoded = read_decoded(args.decoded)
        try:
            metrics = write_word_scores(decoded, args.out, split)
        except ValueError:
            raise B2txtError(f"{args.decoded}: no labelled trials to score") from None
        log(f"{args.out}: {split} WER {metrics['WER']:.4f} over {metrics['n_trials']} trials")
        summary.update(WER=metrics["WER"], n_trials=metrics["n_trials"])
    print(json.dumps(summary))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from .lm.decode import decode_file

    cfg = _config(args)
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


def cmd_submission(args: argparse.Namespace) -> int:
    from .evaluate import write_submission
    from .lm.decode import read_decoded

    n = write_submission(read_decoded(args.decoded), args.out)
    log(f"{args.out}: {n} rows (id,text)")
    return 0


def cmd_lm_text(args: argparse.Namespace) -> int:
    from .lm.text import build_lm_text_for
    from .phonemes import Lexicon

    cfg = _config(args)
    if args.data is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"dir": str(args.data)})})
    stats_path = args.out.with_suffix(".json")
    stats = build_lm_text_for(cfg, args.out, Lexicon.from_cmudict(), stats_path=stats_path)
    log(f"{args.out}: {stats.summary()}")
    return 0


def cmd_lm_ngram(args: argparse.Namespace) -> int:
    from .lm.ngram import build_ngram

    lm = _config(args).lm
    t0 = time.perf_counter()
    files = build_ngram(args.text, args.out, args.order, prune=lm.prune.get(args.order), memory=lm.memory,
                        kenlm_dir=lm.kenlm_dir, tool=lm.tool)
    log(f"{args.out}: {args.order}-gram {files.arpa.name}{' + ' + files.binary.name if files.binary else ''} "
        f"in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_lm_graph(args: argparse.Namespace) -> int:
    from .lm.graph import build_graph
    from .lm.ngram import ngram_paths
    from .phonemes import Lexicon

    lm = _config(args).lm
    arpa, _, unpruned = ngram_paths(args.out)
    if args.arpa is not None:
        arpa = args.arpa
        unpruned = args.arpa.with_name("lm.unpruned.arpa")
    t0 = time.perf_counter()
    stats = build_graph(arpa, args.out, Lexicon.from_cmudict(), sil_prob=lm.sil_prob,
                        unpruned_arpa=unpruned if unpruned.is_file() else None)
    log(f"{args.out}: TLG.fst built in {time.perf_counter() - t0:.1f} s ({stats})")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .figures import make_pipeline_figures

    paths = make_pipeline_figures(args.model, args.scores, args.out, seed=args.seed, logits=args.logits,
                                  calibration=args.calibration, example_trial=args.example_trial)
    log(f"{args.out}: {len(paths)} files")
    return 0


def cmd_figures_paper(args: argparse.Namespace) -> int:
    from .figures import make_paper_figures

    paths = make_paper_figures(args.copy_task, args.personal_use, args.out, args.seed, args.example_trial)
    log(f"{args.out}: {len(paths)} files ({', '.join(sorted({p.stem for p in paths}))})")
    return 0


def add_figures_paper_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``b2txt figures paper`` (here, so that ``b2txt --help`` does not import matplotlib)."""
    p.add_argument("--copy-task", type=Path, metavar="PKL", help="t15_copyTask.pkl (figure 2)")
    p.add_argument("--personal-use", type=Path, metavar="PKL", help="t15_personalUse.pkl (figure 4)")
    p.add_argument("--out", type=Path, required=True, metavar="FIG_DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence intervals")
    p.add_argument("--example-trial", type=int, default=0, metavar="N",
                   help="copy-task trial whose logits figure 2 shows (default 0)")
    return p


def cmd_config_schema(args: argparse.Namespace) -> int:
    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        from .fileio import write_text_atomic
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(config_to_yaml(_config(args)))
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="b2txt",
        description="Brain-to-text pipeline: neural recordings -> phonemes -> text. "
                    "Each command is one pipeline stage; `snakemake --cores all` or `dvc repro` runs them all.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Stages in order: corpus -> simulate -> validate -> preprocess -> train -> infer -> score -> figures;\n"
               "calibrate adapts a trained model to a held-out session.\n"
               "Run `b2txt COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"b2txt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description or help_)
        p.set_defaults(func=func)
        return p

    p = add("corpus", cmd_corpus, "extract normalised, pronounceable English sentences (config: corpus)",
            "Read the corpus source files (default: Debian's fortunes), split them into sentences, normalise "
            "them and keep those whose every word is in the CMU lexicon. Writes one sentence per line.")
    _add_config(p)
    p.add_argument("--out", type=Path, help="sentence file (default: corpus.out of the config)")

    p = add("simulate", cmd_simulate, "simulate a Dryad-format data set of attempted speech (config: simulate)",
            "Write simulated sessions in the Dryad HDF5 layout (hdf5_data_final/<session>/data_<split>.hdf5), "
            "the block description CSV and the simulation's ground truth. See `python -m pydoc b2txt.simulate` "
            "for the generative model.")
    _add_config(p)
    p.add_argument("--out", type=Path, required=True, metavar="DATA_DIR", help="output data directory (replaced)")
    p.add_argument("--seed", type=int, help="override simulate.seed")
    p.add_argument("--sentences", type=Path, help="sentence file (default: corpus.out of the config)")

    p = add("data", cmd_data, "the data set config data.source names: simulated, downloaded or used as it is",
            "data.source simulated: as `b2txt simulate`; dryad: as `b2txt download --dataset data` (download.files, "
            "partial files beside OUT in OUT.partial unless download.partial_dir says otherwise); dir: OUT must "
            "already hold Dryad-layout data and is left as it is. One stage for tools that cannot switch stages on "
            "config values (DVC).")
    _add_config(p)
    p.add_argument("--out", type=Path, required=True, metavar="DATA_DIR", help="the data directory (data.dir)")
    p.add_argument("--sentences", type=Path, help="simulated: sentence file (default: corpus.out of the config)")

    p = add("validate", cmd_validate, "check every file and trial of a Dryad-layout data directory",
            "Report every problem with file, trial and field. Exit 0 when clean, 2 otherwise.")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--report", type=Path, help="write the summary here when the data are clean")

    p = add("preprocess", cmd_preprocess, "check all trials once and write the trial manifest CSV",
            "One row per trial: session, split, file, trial, block, length, phoneme count, corpus, "
            "post-implant day, sentence. Training loads the data into memory from it.")
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="MANIFEST_CSV")

    p = add("train", cmd_train, "train the GRU phoneme decoder with CTC (config: train)",
            "Writes MODEL_DIR/checkpoint/best_checkpoint, checkpoint/args.yaml (published layout), "
            "training_log and metrics.csv.")
    _add_config(p)
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--manifest", type=Path, required=True, metavar="MANIFEST_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--threads", type=int, help="CPU threads for torch (overrides train.threads)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or xla (overrides train.device)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (DistributedDataParallel: gloo on CPU, nccl "
                        "with one GPU each); train.batch_size is split evenly over them. Under torchrun or "
                        "srun --ntasks N leave this at 1: the launcher's processes form the group.")

    p = add("infer", cmd_infer, "phoneme logits of every trial of a split",
            "Runs a model directory (ours or the published layout) on a data split and writes an HDF5 file "
            "with one group per trial (logits [T', 41] in model column order, labels when known).")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--split", choices=["train", "val", "test"], required=True)
    p.add_argument("--out", type=Path, required=True, metavar="LOGITS_HDF5")
    p.add_argument("--manifest", type=Path, help="manifest CSV (default: built from DATA_DIR)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or xla")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-bins", type=int, metavar="N",
                   help="decode online, N bins (20 ms each) at a time with the GRU state carried (GRU models); "
                        "gives the same logits as one pass")
    p.add_argument("--known-sessions-only", action="store_true",
                   help="skip (and report) trials of sessions the model was not trained on, instead of failing")

    p = add("calibrate", cmd_calibrate, "fit a new session's day layer from its first N sentences (config: calibrate)",
            "Rapid calibration: for each N in calibrate.n_sentences, add a day layer for a session the model "
            "never saw, fit it on the session's first N labelled sentences and measure PER on its val trials. "
            "Writes OUT_DIR/calibration.csv, calibration.{pdf,png} and OUT_DIR/model (calibrated with the largest N).")
    _add_config(p)
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--manifest", type=Path, required=True, metavar="MANIFEST_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument("--session", help="session name or index (overrides calibrate.session)")
    p.add_argument("--n-sentences", type=int, nargs="+", help="overrides calibrate.n_sentences")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")

    p = add("decode", cmd_decode, "decode a logits file to sentences with an n-gram LM (config: decode, rescore)",
            "Re-orders each trial's logits to the LM column order, decodes it to an n-best list with the WFST "
            "(TLG.fst + words.txt) or lexicon (KenLM) decoder, augments the list and optionally rescores it "
            "with a large causal LM. Trials are spread over processes. Writes OUT_DIR/decoded.csv and "
            "OUT_DIR/nbest.jsonl.")
    _add_config(p)
    p.add_argument("--logits", type=Path, required=True, metavar="LOGITS_HDF5")
    p.add_argument("--lm", type=Path, required=True, metavar="LM_DIR",
                   help="language-model directory (b2txt lm graph, or a published one with TLG.fst + words.txt)")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument("--decoder", choices=["wfst", "lexicon"], help="overrides decode.decoder")
    p.add_argument("--workers", type=int, help="decoding processes (default: decode.workers, else all cores)")
    p.add_argument("--nbest", type=int, help="overrides decode.nbest")
    p.add_argument("--llm", metavar="MODEL", help="rescore with this causal LM (Hub name or directory)")
    p.add_argument("--no-rescore", action="store_true", help="skip LLM rescoring even when the config enables it")

    p = add("score", cmd_score, "phoneme error rate (greedy CTC) and word error rate per trial, session, corpus",
            "With --logits: per_session.csv, per_corpus.csv, trials.csv and metrics.json (PER). With --decoded "
            "(a decoded.csv from `b2txt decode`): wer_per_session.csv, wer_per_corpus.csv, wer_trials.csv and "
            "wer.json (WER with a bootstrap 95 %% interval). All in OUT_DIR.")
    p.add_argument("--logits", type=Path, metavar="LOGITS_HDF5")
    p.add_argument("--decoded", type=Path, metavar="DECODED_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    p.add_argument("--split", help="split name recorded in the metrics (default: val)")

    p = add("submission", cmd_submission, "the competition CSV (id,text) from a decoded test split",
            "Rows in session order, then trial order, ids 0..N-1, text normalised (REFERENCE §7).")
    p.add_argument("--decoded", type=Path, required=True, metavar="DECODED_CSV")
    p.add_argument("--out", type=Path, required=True, metavar="CSV")

    p = add("figures", cmd_figures, "our run's figures: training curve, error rates per session, figure-2 panels",
            "PDF (TrueType fonts) + PNG. `b2txt figures paper --copy-task PKL --personal-use PKL --out DIR` draws the "
            "paper's figures 2 and 4 from the Dryad pickles instead (see `b2txt figures paper --help`).")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR")
    p.add_argument("--scores", type=Path, required=True, metavar="SCORES_DIR",
                   help="scores of the val split (trials.csv; wer_trials.csv adds the WER panels)")
    p.add_argument("--out", type=Path, required=True, metavar="FIG_DIR")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence intervals")
    p.add_argument("--logits", type=Path, metavar="LOGITS_HDF5", help="draw an example trial's logits from here")
    p.add_argument("--calibration", type=Path, metavar="CALIBRATION_CSV", help="draw the calibration curve")
    p.add_argument("--example-trial", type=int, default=0, metavar="N", help="the example trial (default 0)")

    p = add("figures-paper", cmd_figures_paper, "the paper's figures 2 and 4 from the Dryad pickles (also: `figures paper`)",
            "Figure 2 from t15_copyTask.pkl, figure 4 from t15_personalUse.pkl (REFERENCE §6), PDF + PNG, with the "
            "tables behind them as CSV. The pickles are read with a restricted unpickler: no code in them runs.")
    add_figures_paper_arguments(p)

    from .download import add_download_command

    add_download_command(add)

    p = add("lm", None, "build language models: `lm text`, `lm ngram`, `lm graph` (config: lm)",
            "The language-model stages, in order: text (normalised, leakage-free LM text), ngram (KenLM lmplz + "
            "build_binary, or SRILM), graph (TLG.fst + words.txt in the published layout).")
    lm_sub = p.add_subparsers(dest="lm_command", metavar="STEP", required=True)

    def add_lm(name: str, func, help_: str, description: str) -> argparse.ArgumentParser:
        q = lm_sub.add_parser(name, help=help_, description=description)
        q.set_defaults(func=func, command=f"lm {name}")
        return q

    q = add_lm("text", cmd_lm_text, "LM training text from the corpus (config: lm, corpus)",
               "Normalise the text sources (lm.text, else the corpus section's fortune files), drop sentences of "
               "the evaluation splits found in DATA_DIR (lm.exclude_splits), map words outside the CMU lexicon to "
               "<unk>, optionally add every lexicon word once. Writes TEXT and TEXT's statistics (OOV rate, ...) as "
               "JSON beside it (text.txt -> text.json).")
    _add_config(q)
    q.add_argument("--data", type=Path, metavar="DATA_DIR", help="data whose evaluation sentences are excluded "
                   "(default: data.dir)")
    q.add_argument("--out", type=Path, required=True, metavar="TEXT")
    q = add_lm("ngram", cmd_lm_ngram, "estimate an n-gram LM (ARPA + KenLM binary) from LM text (config: lm)",
               "Runs KenLM lmplz (always with -S lm.memory and -T; --discount_fallback; --prune from lm.prune) and "
               "build_binary, or SRILM ngram-count with lm.tool: srilm. Writes OUT_DIR/lm.arpa, lm.bin (and "
               "lm.unpruned.arpa when pruned). The KenLM tools come from scripts/build_kenlm.sh.")
    _add_config(q)
    q.add_argument("--text", type=Path, required=True, metavar="TEXT")
    q.add_argument("--order", type=int, required=True, metavar="N")
    q.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")
    q = add_lm("graph", cmd_lm_graph, "build the decoding graph TLG.fst + words.txt from an ARPA LM",
               "CTC topology T over the 41 units in LM order, lexicon L (CMU dict, optional SIL after words), grammar "
               "G from the ARPA (kaldilm): TLG.fst, words.txt, tokens.txt, G.fst (+ G_no_prune.fst from "
               "lm.unpruned.arpa) and graph.json in OUT_DIR, the published layout.")
    _add_config(q)
    q.add_argument("--arpa", type=Path, metavar="ARPA", help="the LM (default: OUT_DIR/lm.arpa)")
    q.add_argument("--out", type=Path, required=True, metavar="OUT_DIR")

    from .server.commands import add_commands

    add_commands(sub)

    p = add("config-schema", cmd_config_schema, "print (or write) the JSON schema of the pipeline config")
    p.add_argument("--out", type=Path, help="write here instead of stdout")

    p = add("config-show", cmd_config_show, "print the effective configuration with every default filled in")
    _add_config(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["figures", "paper"]:  # `b2txt figures paper` is the figures-paper command
        argv = ["figures-paper", *argv[2:]]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except B2txtError as exc:
        print(f"b2txt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"b2txt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
