"""The pipeline's stage table: one truth for Snakemake and DVC.

:func:`stages` turns a config into the pipeline's stages: for each, the ``b2txt`` command line,
its inputs and outputs, the config sections the command reads, its rule family (resources,
conda env) and, for stages run once per split or n-gram order, the values. The Snakefile makes a
rule of every stage (``workflow/rules/stages.smk``) and :func:`dvc_yaml` writes the same stages
for DVC (``b2txt workflow dvc``), so both tools run the same commands with the same config:

- command arguments use Snakemake's placeholders (``{input.logits}``, ``{params.out}``,
  ``{wildcards.split}``); DVC gets them filled in, and ``${item}`` for the per-split/per-order value;
- a stage that reads config gets ``--config``: in Snakemake a file holding just its sections
  (named by content, so a change of those sections reruns it), in DVC the config files the
  pipeline was generated for (its ``params`` list the sections they set);
- what only one tool has: Snakemake's thread count per job (``--workers``, ``--threads``), its logs
  and ``localrules``; DVC's ``persist`` and the stage's code in ``deps``: the modules
  its command imports (:func:`code_deps`, from the import graph);
- a published archive (the checkpoint) is a Snakemake rule's download (``snakemake_only``), and in DVC
  a file pinned by ``b2txt dvc-pin`` that ``dvc pull`` brings, checked; both unpack it in the same stage.

The published models (``model.source: pretrained``) have their own DVC file,
:func:`pretrained_dvc_yaml` (outputs under ``results/<run>/pretrained/``), beside the trained
pipeline's stages.
"""

from __future__ import annotations

import ast
import functools
import os
import shlex
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .ground.config import PipelineConfig, load_config, read_yaml
from .ground.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
SRC_DIR = PACKAGE_DIR.parent


#: The conda environments of the rules (``envs/<env>.yaml``, for ``snakemake --use-conda``) and the
#: extras of ``pyproject.toml`` each holds beyond the core; ``xla`` holds torch 2.9 + torch_xla 2.9
#: instead of ``train``'s torch (a train rule with ``train.device: xla`` runs in it).
ENVS: dict[str, tuple[str, ...]] = {
    "data": (),
    "train": ("train",),
    "xla": ("train",),
    "lm": ("lm",),
    "rescore": ("lm", "rescore"),
    "figures": ("figures",),
}


#: The variable through which the envs' post-deploy script (envs/install-b2txt.sh) finds the checkout.
CHECKOUT_VARIABLE = "B2TXT_SOURCE"


def announce_checkout(path: str | os.PathLike) -> None:
    """Tell the conda envs' post-deploy script where the checkout is: Snakemake runs a copy of the
    script from .snakemake/conda/, in a child of its own process, so the script cannot find the
    checkout from its own location (called by workflow/rules/common.smk)."""
    os.environ[CHECKOUT_VARIABLE] = str(path)


@dataclass(frozen=True)
class Output:
    path: str
    directory: bool = False
    metric: bool = False  # DVC metrics (JSON); Snakemake: a plain file
    persist: bool = False  # DVC keeps it before rerunning the stage (a resumable download)
    report: str | None = None  # Snakemake report: the caption file (the PNGs of a figures directory)


@dataclass(frozen=True)
class Input:
    path: str


@dataclass(frozen=True)
class Stage:
    """One pipeline stage; ``args`` follow ``b2txt`` (or ``shell``'s program) with Snakemake placeholders."""

    name: str
    args: tuple[str, ...]
    inputs: Mapping[str, Input] = field(default_factory=dict)
    outputs: Mapping[str, Output] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    sections: tuple[str, ...] = ()  # config sections the command reads (--config)
    family: str = "default"  # resources.<family>
    env: str = "data"  # envs/<env>.yaml (:data:`ENVS`)
    each: tuple[str, tuple[str, ...]] | None = None  # (wildcard, values): one job per value
    program: str = "b2txt"  # or "bash" (scripts/build_kenlm.sh)
    threads_flag: str | None = None  # Snakemake passes its job's threads with this flag
    threads_per: int = 1  # ... shared out over this many processes (train --nproc)
    local: bool = False  # Snakemake localrules: the submitting host (network, compilers)
    stdout_to_log: bool = False  # the command prints its result on stdout
    starts: tuple[str, ...] = ()  # b2txt commands it runs as child processes (code it depends on too)
    snakemake_only: bool = False  # DVC has no such stage: its output is a file `b2txt dvc-pin` pins (dvc pull)

    @property
    def _words(self) -> int:
        """How many of ``args`` name the command: ``lm ngram`` is two words, the rest one."""
        return 2 if self.args[0] == "lm" else 1

    @property
    def command(self) -> str:
        """The CLI command (``decode``, ``lm ngram``), for its code dependencies."""
        return " ".join(self.args[: self._words])

    def argv(self, config: list[str]) -> list[str]:
        """The command line, with ``config`` (``--config FILE`` arguments) after the command's name."""
        return [self.program, *self.args[: self._words], *(config if self.sections else []),
                *self.args[self._words:]]


# ----------------------------------------------------------------------------- the table

def _run(cfg: PipelineConfig) -> str:
    return f"results/{cfg.run}"


def stages(cfg: PipelineConfig) -> list[Stage]:
    """The pipeline's stages for this config, in order."""
    run, data = _run(cfg), cfg.data.dir
    simulated, pretrained = cfg.data.source == "simulated", cfg.model.source == "pretrained"
    decode_lm = lm_dir(cfg)
    model_dir = cfg.model.model_dir if pretrained else f"{run}/model"
    model_input = Input(cfg.model.dir if pretrained else f"{run}/model")
    train_env = "xla" if cfg.train.device == "xla" else "train"
    decode_env = "rescore" if cfg.rescore.enabled else "lm"
    out: list[Stage] = []

    if simulated:
        out.append(Stage("corpus", ("corpus", "--out", "{output.sentences}"),
                         outputs={"sentences": Output(cfg.corpus.out)}, sections=("corpus",)))
    if cfg.data.source != "dir":  # dir: the data are there already, no stage makes them
        out.append(Stage(
            "data", ("data", *(("--sentences", "{input.sentences}") if simulated else ()), "--out", "{output.data}"),
            inputs={"sentences": Input(cfg.corpus.out)} if simulated else {},
            outputs={"data": Output(data, directory=True, persist=True)},
            sections=("data", "simulate", "corpus", "download"), local=not simulated))
    out += [
        Stage("validate", ("validate", "{input.data}", "--report", "{output.report}"),
              inputs={"data": Input(data)}, outputs={"report": Output(f"{run}/validation.txt")},
              # the model's patch: every trial must give output frames (nothing else of train)
              sections=("train.model.patch_size", "train.model.patch_stride")),
        Stage("preprocess", ("preprocess", "--data", "{input.data}", "--out", "{output.manifest}"),
              inputs={"data": Input(data), "validated": Input(f"{run}/validation.txt")},
              outputs={"manifest": Output(f"{run}/manifest.csv")}),
    ]
    manifest = Input(f"{run}/manifest.csv")
    if pretrained:  # the published archive: pinned for DVC (`b2txt dvc-pin`), fetched by Snakemake; unpacked
        archive = f"{cfg.download.archive_dir.rstrip('/')}/{cfg.model.file}"
        out += [
            Stage("fetch_model", ("download", "--dataset", "data", "--files", "{params.file}", "--no-unpack",
                                  "--out", "{params.dir}"),
                  outputs={"archive": Output(archive)}, params={"file": cfg.model.file, "dir": cfg.download.archive_dir},
                  sections=("download",), local=True, snakemake_only=True),
            Stage("unpack_model", ("unpack", "{input.archive}", "--out", "{output.model}"),
                  inputs={"archive": Input(archive)}, outputs={"model": Output(cfg.model.dir, directory=True)}),
        ]
    members = [m.name for m in cfg.ensemble.members]
    if members:  # calibrate and figures read the first member
        model_dir = f"{run}/members/{members[0]}/model"
        model_input = Input(model_dir)

    def train_stage(name: str, out_dir: str, member: str | None) -> Stage:
        nproc = max(1, cfg.resources.train.gpus)  # one process per GPU
        return Stage(name, ("train", *(("--member", member) if member else ()), "--data", "{input.data}",
                            "--manifest", "{input.manifest}", "--out", "{output.model}",
                            *(("--nproc", str(nproc)) if nproc > 1 else ())),
                     inputs={"data": Input(data), "manifest": manifest},
                     outputs={"model": Output(out_dir, directory=True)},
                     sections=("train", "ensemble.members") if member else ("train",), family="train",
                     env=train_env, threads_flag="--threads", threads_per=nproc)

    def infer_stage(name: str, model_in: Input, model: str, logits: str) -> Stage:
        return Stage(name, ("infer", "--model", "{params.model}", "--data", "{input.data}", "--manifest",
                            "{input.manifest}", "--split", "{wildcards.split}", "--out", "{output.logits}",
                            "--known-sessions-only"),
                     inputs={"model": model_in, "data": Input(data), "manifest": manifest},
                     outputs={"logits": Output(logits)}, params={"model": model},
                     sections=("infer",), family="infer", env="xla" if cfg.infer.device == "xla" else "train",
                     each=("split", tuple(cfg.infer.splits)))

    splits = ("split", tuple(cfg.infer.splits))
    if members:  # each member trained and run alike, then their logits averaged (b2txt ensemble)
        for name in members:
            member = f"{run}/members/{name}"
            out += [train_stage(f"train_{name}", f"{member}/model", name),
                    infer_stage(f"infer_{name}", Input(f"{member}/model"), f"{member}/model",
                                f"{member}/logits/{{split}}.hdf5")]
        inputs = {f"member{i}": Input(f"{run}/members/{name}/logits/{{split}}.hdf5") for i, name in enumerate(members)}
        out.append(Stage("ensemble", ("ensemble", "--logits", *(f"{{input.{k}}}" for k in inputs),
                                      "--out", "{output.logits}"),
                         inputs=inputs, outputs={"logits": Output(f"{run}/logits/{{split}}.hdf5")},
                         sections=("ensemble",), each=splits))
    else:
        if not pretrained:
            out.append(train_stage("train", f"{run}/model", None))
        out.append(infer_stage("infer", model_input, model_dir, f"{run}/logits/{{split}}.hdf5"))
    calibrate = cfg.calibrate.enabled and not pretrained
    if calibrate:
        out.append(Stage("calibrate", ("calibrate", "--model", "{input.model}", "--data", "{input.data}",
                                       "--manifest", "{input.manifest}", "--out", "{output.calibration}"),
                         inputs={"model": model_input, "data": Input(data), "manifest": manifest},
                         outputs={"calibration": Output(f"{run}/calibration", directory=True)},
                         sections=("calibrate",), family="calibrate", env="train", stdout_to_log=True))
    scores = f"{run}/scores/val"
    out.append(Stage("score", ("score", "--logits", "{input.logits}", "--out", "{params.out}", "--split", "val"),
                     inputs={"logits": Input(f"{run}/logits/val.hdf5")},
                     outputs={"metrics": Output(f"{scores}/metrics.json", metric=True),
                              **{n: Output(f"{scores}/{n}.csv") for n in ("per_session", "per_corpus", "trials")}},
                     params={"out": scores}, stdout_to_log=True))

    out += lm_stages(cfg)
    graph = {"tlg": Input(f"{decode_lm}/TLG.fst"), "words": Input(f"{decode_lm}/words.txt")}
    kenlm = {"kenlm": Input(f"{decode_lm}/lm.bin")} if cfg.decode.decoder == "lexicon" else {}
    out += [
        Stage("decode", ("decode", "--logits", "{input.logits}", "--lm", "{params.lm}", "--out", "{output.decoded}"),
              inputs={"logits": Input(f"{run}/logits/val.hdf5"), **graph, **kenlm},
              outputs={"decoded": Output(f"{run}/decode/val", directory=True)},
              params={"lm": decode_lm}, sections=("decode", "rescore"), family="decode", env=decode_env,
              threads_flag="--workers"),
        Stage("score_words", ("score", "--decoded", "{params.decoded}", "--out", "{params.out}", "--split", "val"),
              inputs={"decoded": Input(f"{run}/decode/val")},
              outputs={"metrics": Output(f"{scores}/wer.json", metric=True),
                       **{n: Output(f"{scores}/wer_{n}.csv") for n in ("per_session", "per_corpus", "trials")}},
              params={"decoded": f"{run}/decode/val/decoded.csv", "out": scores}, stdout_to_log=True),
        Stage("evaluate", ("evaluate", "--logits", "{input.logits}", "--lm", "{params.lm}", "--out",
                           "{output.evaluation}", "--split", "{wildcards.split}"),
              inputs={"logits": Input(f"{run}/logits/{{split}}.hdf5"), **graph, **kenlm},
              outputs={"evaluation": Output(f"{run}/evaluate/{{split}}", directory=True)},
              params={"lm": decode_lm}, sections=("decode", "rescore", "server"), family="decode", env=decode_env,
              each=("split", tuple(s for s in ("val", "test") if s in cfg.infer.splits)), threads_flag="--workers",
              starts=("lm-server", "lm-worker")),
    ]
    if not pretrained:  # our training metrics and held-out session: the published model has neither
        out.append(Stage(
            "figures", ("figures", "--model", "{input.model}", "--scores", "{params.scores}", "--logits",
                        "{input.logits}", *(("--calibration", "{params.calibration}") if calibrate else ()),
                        "--out", "{output.figures}"),
            inputs={"model": model_input, "trials": Input(f"{scores}/trials.csv"),
                    "wer_trials": Input(f"{scores}/wer_trials.csv"), "logits": Input(f"{run}/logits/val.hdf5"),
                    **({"calibration": Input(f"{run}/calibration")} if calibrate else {})},
            outputs={"figures": Output(f"{run}/figures", directory=True, report="figures.rst")},
            params={"scores": scores, **({"calibration": f"{run}/calibration/calibration.csv"} if calibrate else {})},
            family="figures", env="figures"))
    return out


def lm_dir(cfg: PipelineConfig) -> str:
    """The LM directory decoding uses: lm.dir as given, the imported ARPA's, or the built decode_order's."""
    if cfg.lm.source == "dir":
        return cfg.lm.dir
    lm = f"{_run(cfg)}/lm"
    return f"{lm}/imported" if cfg.lm.source == "arpa" else f"{lm}/{cfg.lm.decode_order}gram"


def _graph_stage(out: str, each: tuple[str, tuple[str, ...]] | None) -> Stage:
    """``lm graph`` into the LM directory ``out`` (which holds lm.arpa), once or per order."""
    return Stage("lm_graph", ("lm", "graph", "--arpa", "{input.arpa}", "--out", "{params.out}"),
                 inputs={"arpa": Input(f"{out}/lm.arpa")},
                 outputs={"tlg": Output(f"{out}/TLG.fst"), "words": Output(f"{out}/words.txt"),
                          "grammar": Output(f"{out}/G.fst")},
                 params={"out": out}, sections=("lm",), family="lm", env="lm", each=each)


def lm_stages(cfg: PipelineConfig) -> list[Stage]:
    """The stages that make the decoding LM: none for a given graph directory (``lm.source: dir``).

    Both other sources make ``lm.bin`` with KenLM's ``build_binary`` (also from an SRILM or an
    imported ARPA), so both start with ``kenlm_tools``. It builds the tools once outside the
    repository (``lm.kenlm_dir``) and writes their checksums into ``kenlm_tools.json`` under the
    run's results: that file is the stage's output and an input of the stages that run the tools,
    the edge DVC (which tracks nothing outside the repository) and Snakemake both see. The tools
    themselves are no declared output: Snakemake would delete them before rerunning the stage.
    """
    if cfg.lm.source == "dir":
        return []
    lm = f"{_run(cfg)}/lm"
    tools = Input(f"{lm}/kenlm_tools.json")
    out = [Stage("kenlm_tools", ("scripts/build_kenlm.sh", "{params.dest}", "--manifest", "{output.manifest}"),
                 outputs={"manifest": Output(tools.path)}, params={"dest": cfg.lm.kenlm_dir}, env="lm",
                 program="bash", local=True)]
    if cfg.lm.source == "arpa":
        imported = lm_dir(cfg)
        return out + [
            Stage("lm_import", ("lm", "import", "--out", "{params.out}"),  # reads lm.arpa: its errors name the field
                  inputs={"arpa": Input(cfg.lm.arpa), "tools": tools},
                  outputs={"arpa": Output(f"{imported}/lm.arpa"), "binary": Output(f"{imported}/lm.bin")},
                  params={"out": imported}, sections=("lm",), family="lm", env="lm"),
            _graph_stage(imported, None),
        ]
    orders = ("order", tuple(str(o) for o in cfg.lm.orders))
    return out + [
        Stage("lm_text", ("lm", "text", "--data", "{input.data}", "--out", "{output.text}"),
              inputs={"data": Input(cfg.data.dir), **({"corpus": Input(cfg.lm.text)} if cfg.lm.text else {})},
              outputs={"text": Output(f"{lm}/text.txt"), "stats": Output(f"{lm}/text.json")},
              sections=("corpus", "lm"), env="lm"),
        Stage("lm_ngram", ("lm", "ngram", "--text", "{input.text}", "--order", "{wildcards.order}",
                           "--out", "{params.out}"),
              inputs={"text": Input(f"{lm}/text.txt"), "tools": tools},
              outputs={"arpa": Output(f"{lm}/{{order}}gram/lm.arpa"), "binary": Output(f"{lm}/{{order}}gram/lm.bin")},
              params={"out": f"{lm}/{{order}}gram"}, sections=("lm",), family="lm", env="lm", each=orders),
        _graph_stage(f"{lm}/{{order}}gram", orders),
    ]


#: Published language models (REFERENCE §1): the DVC stage key and the Dryad archive.
PUBLISHED_LMS = {"3gram": "languageModel.tar.gz", "5gram": "languageModel_5gram.tar.gz"}


def published_lm_stage(cfg: PipelineConfig) -> Stage:
    """A published language model, unpacked from its pinned archive (DVC's pretrained file runs it per
    model: ``{lm}`` is the key of :data:`PUBLISHED_LMS`, ``{lm_file}`` its archive)."""
    return Stage("unpack_lm", ("unpack", "{input.archive}", "--out", "{output.lm}"),
                 inputs={"archive": Input(f"{cfg.download.archive_dir.rstrip('/')}/{{lm_file}}")},
                 outputs={"lm": Output("data/published-lm/{lm}", directory=True)})


# ----------------------------------------------------------------------------- code dependencies

def _module_file(module: str) -> Path | None:
    rel = Path(*module.split("."))
    for path in (SRC_DIR / rel / "__init__.py", SRC_DIR / rel.with_suffix(".py")):
        if path.is_file():
            return path
    return None


@functools.cache
def _tree(module: str) -> ast.Module:
    """A module's parsed source (each file is read once per process)."""
    return ast.parse(_module_file(module).read_text())


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute b2txt module names an ``ImportFrom`` names (its module, or modules it imports)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("b2txt"):
        return []
    found = [target]
    for alias in node.names:  # `from . import protocol`: a submodule
        if _module_file(f"{target}.{alias.name}") is not None:
            found.append(f"{target}.{alias.name}")
    return found


def _imports_in(tree: ast.AST, module: str, is_package: bool, top_level: bool = False) -> set[str]:
    names: set[str] = set()
    nodes = tree.body if top_level and isinstance(tree, ast.Module) else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            names.update(_resolve(node, module, is_package))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("b2txt"))
    return names


def _closure(roots: Iterable[str]) -> set[str]:
    """Every b2txt module the roots import, at module level or in functions, and their packages.
    The CLI's modules count with their module-level imports only: a command runs only its own
    ``run`` function's imports (:func:`_run_function_imports`), not the other commands'."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        top_level = module == "b2txt.cli" or module.startswith("b2txt.cli.")
        todo += _imports_in(_tree(module), module, path.name == "__init__.py", top_level)
    return seen


@functools.cache
def command_runs() -> dict[str, tuple[str, str]]:
    """Every ``b2txt`` command and where it runs: ``name -> (module, run function)``, read from the
    ``Command(...)`` records of the CLI's modules (their source, not an import of the CLI, which sits
    above this module)."""
    runs: dict[str, tuple[str, str]] = {}
    for path in sorted((PACKAGE_DIR / "cli").glob("*.py")):
        module = f"b2txt.cli.{path.stem}" if path.stem != "__init__" else "b2txt.cli"
        for node in ast.walk(_tree(module)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Command" and len(node.args) >= 5:
                name, run = node.args[0], node.args[4]
                if isinstance(name, ast.Constant) and isinstance(run, ast.Name):
                    runs[name.value] = (module, run.id)
    return runs


def _run_functions(command: str) -> tuple[str, list[ast.FunctionDef]]:
    """The command's CLI module and its ``run`` function with the functions of that module it calls."""
    runs = command_runs()
    if command not in runs:
        raise ConfigError(f"stage command {command!r} is not a b2txt command")
    module, run = runs[command]
    functions = {n.name: n for n in _tree(module).body if isinstance(n, ast.FunctionDef)}
    todo, done = [run], {}
    while todo:
        name = todo.pop()
        if name in done or name not in functions:
            continue
        done[name] = functions[name]
        todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name)]
    return module, list(done.values())


def _run_function_imports(command: str) -> set[str]:
    """What the command's ``run`` function imports, following the functions of its CLI module it calls."""
    module, functions = _run_functions(command)
    return {module}.union(*(_imports_in(f, module, False) for f in functions))


def _third_party_in(nodes: Iterable[ast.AST]) -> set[str]:
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("b2txt", "__future__")}


def third_party_imports(command: str, starts: Iterable[str] = ()) -> set[str]:
    """The top-level names of the packages outside the standard library that a command's code
    imports (its modules, at module level or in functions, and the commands it starts): what its
    environment must hold (tests/test_envs.py checks them against the extras and envs/*.yaml)."""
    found: set[str] = set()
    for cmd in (command, *starts):
        module, functions = _run_functions(cmd)
        found |= _third_party_in(_tree(module).body) | _third_party_in(n for f in functions for n in ast.walk(f))
        for m in _closure(_run_function_imports(cmd)):
            if not (m == "b2txt.cli" or m.startswith("b2txt.cli.")):
                found |= _third_party_in(ast.walk(_tree(m)))
    return found


def code_deps(stage: Stage) -> list[str]:
    """The files of the b2txt modules the stage's command imports (repository-relative), sorted."""
    if stage.program != "b2txt":
        return [stage.args[0]]
    modules = _closure(set().union(*(_run_function_imports(c) for c in (stage.command, *stage.starts))))
    root = SRC_DIR.parent
    return sorted(str(_module_file(m).relative_to(root)) for m in modules)


# ----------------------------------------------------------------------------- DVC

GENERATED = ("# Generated by `b2txt workflow dvc{args}` from the stage table in src/b2txt/workflow.py\n"
             "# (the Snakefile makes its rules from the same table). Do not edit: change the config files\n"
             "# named below or the table, then run the command again (`--check` tells whether this file is\n"
             "# up to date). Every output is DVC-cached: `dvc push` / `dvc pull` carry them (.dvc/config).\n")


def _fill(text: str, stage: Stage, values: Mapping[str, str]) -> str:
    """Snakemake placeholders made concrete: paths, and ``${item}`` for the per-value wildcard."""
    out = text
    for kind, mapping in (("input", {k: v.path for k, v in stage.inputs.items()}),
                          ("output", {k: v.path for k, v in stage.outputs.items()}), ("params", stage.params)):
        for key, value in mapping.items():
            out = out.replace(f"{{{kind}.{key}}}", value)
    if stage.each is not None:
        out = out.replace(f"{{wildcards.{stage.each[0]}}}", "${item}").replace(f"{{{stage.each[0]}}}", "${item}")
    for key, value in values.items():
        out = out.replace(f"{{{key}}}", value)
    return out


def job_commands(stage: Stage, config_files: list[str]) -> list[list[str]]:
    """The concrete command line of each of the stage's jobs (one per split or order), as DVC runs
    them: for running stages outside both tools (tests/test_family_envs.py, each in its own env)."""
    line = _fill(" ".join(stage.argv([x for f in config_files for x in ("--config", f)])), stage, {})
    values = stage.each[1] if stage.each is not None else ("",)
    return [[os.path.expanduser(a) for a in shlex.split(line.replace("${item}", v))] for v in values]


def _sets(raw: Mapping[str, Any], section: str) -> bool:
    """Whether a config file sets a section, or a part of one (``ensemble.members``)."""
    for key in section.split("."):
        if not isinstance(raw, Mapping) or key not in raw:
            return False
        raw = raw[key]
    return True


def _dvc_stage(stage: Stage, config_files: list[str], raw: list[dict[str, Any]], values: Mapping[str, str],
               wdir: str | None = None) -> dict[str, Any]:
    """One DVC stage (a ``foreach`` one when the stage runs per value)."""
    body: dict[str, Any] = {"wdir": wdir} if wdir else {}
    body["cmd"] = _fill(" ".join(stage.argv([x for f in config_files for x in ("--config", f)])), stage, values)
    deps = [_fill(i.path, stage, values) for i in stage.inputs.values()]
    body["deps"] = deps + [d for d in code_deps(stage) if d not in deps]
    params = [{f: [s for s in stage.sections if _sets(sections, s)]} for f, sections in zip(config_files, raw)
              if any(_sets(sections, s) for s in stage.sections)]
    if params:
        body["params"] = params
    outs: list[Any] = []
    metrics: list[Any] = []
    for o in stage.outputs.values():
        path = _fill(o.path, stage, values)
        if os.path.isabs(path):  # outside the repository (an absolute data.dir or model.dir): not DVC's to track
            continue
        (metrics if o.metric else outs).append({path: {"persist": True}} if o.persist else path)
    if outs:
        body["outs"] = outs
    if metrics:
        body["metrics"] = metrics
    return body if stage.each is None else {"foreach": list(stage.each[1]), "do": body}


def _load_stack(config_files: list[str], root: Path) -> tuple[PipelineConfig, list[dict[str, Any]]]:
    """The config the files make (merged in order) and each file's own sections."""
    for f in config_files:
        if Path(f).is_absolute():
            raise ConfigError(f"{f}: give config files relative to the repository root, as DVC runs from there")
    paths = [root / f for f in config_files]
    return load_config(paths), [read_yaml(p) for p in paths]


def dvc_yaml(config_files: list[str], root: Path = Path(".")) -> str:
    """dvc.yaml for the config these files make (merged in order), relative to the repository root."""
    cfg, raw = _load_stack(config_files, root)
    doc: dict[str, Any] = {"stages": {}}
    for stage in stages(cfg):
        if not stage.snakemake_only:
            doc["stages"][stage.name] = _dvc_stage(stage, config_files, raw, {})
    run = _run(cfg)
    doc["plots"] = [
        {f"{run}/scores/val/per_session.csv": {"x": "post_implant_day", "y": "PER",
                                               "title": "Validation PER per session"}},
        {f"{run}/scores/val/wer_per_session.csv": {"x": "post_implant_day", "y": "WER",
                                                   "title": "Validation WER per session (n-gram LM)"}},
    ]
    args = "".join(f" --config {f}" for f in config_files)
    return GENERATED.format(args=args) + yaml.safe_dump(doc, sort_keys=False, width=120)


def pretrained_dvc_yaml(config_files: list[str], root: Path = Path(".")) -> str:
    """pretrained/dvc.yaml: the published checkpoint instead of training (``unpack_model`` -> ``infer`` ->
    ``score``, outputs under ``results/<run>/pretrained/``, data and manifest from dvc.yaml), and the
    published language models (``unpack_lm@3gram``, ``@5gram``). The archives are files that
    ``b2txt dvc-pin`` pinned (``dvc pull`` brings them), not outputs of a stage. Paths relative to
    the repository root (``wdir: ..``)."""
    cfg, raw = _load_stack(config_files, root)
    run = _run(cfg)
    published = cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": "pretrained"})})
    moved = {f"{run}/logits/": f"{run}/pretrained/logits/", f"{run}/scores/": f"{run}/pretrained/scores/"}

    def move(path: str) -> str:
        for a, b in moved.items():
            if path.startswith(a):
                return b + path[len(a):]
        return path

    doc: dict[str, Any] = {"stages": {}}
    for stage in stages(published):
        if stage.name in ("unpack_model", "infer", "score"):
            stage = replace(stage, inputs={k: replace(v, path=move(v.path)) for k, v in stage.inputs.items()},
                            outputs={k: replace(v, path=move(v.path)) for k, v in stage.outputs.items()},
                            params={k: move(v) for k, v in stage.params.items()})
            doc["stages"][stage.name] = _dvc_stage(stage, config_files, raw, {}, wdir="..")
    lm = published_lm_stage(published)
    doc["stages"][lm.name] = {"foreach": dict(PUBLISHED_LMS),
                              "do": _dvc_stage(lm, config_files, raw, {"lm": "${key}", "lm_file": "${item}"}, "..")}
    args = "".join(f" --config {f}" for f in config_files)
    return GENERATED.format(args=f" --pretrained{args}") + yaml.safe_dump(doc, sort_keys=False, width=120)
