"""A copy of the repository's workflow files in a temporary directory, run with the real tools.

``make_project`` writes the tiny config's values into the files both tools read
(``config/config.yaml`` and the training preset) and generates ``dvc.yaml`` and
``pretrained/dvc.yaml`` for them, so Snakemake and ``dvc repro`` run the same configuration
without flags.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from b2txt.ground.config import merge, read_yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
RUN = "results/tiny"
#: Rules downstream of the logits and of the LM graph; rules that build the LM from the data's text.
DECODING = {"decode", "score_words", "evaluate", "figures"}
LM_BUILD = {"lm_text", "lm_ngram", "lm_graph"}
#: The files a project needs (the package comes from the environment, src/ is there for DVC's deps).
FILES = ("Snakefile", "workflow", "src", "envs", "config", "scripts")


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 900,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "B2TXT_PROGRESS": "0", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           **(env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def regenerate_dvc(project: Path, *config_files: str, pretrained: bool = False) -> None:
    """dvc.yaml (and pretrained/dvc.yaml when asked for, or already there) for the project's config
    files (``b2txt workflow dvc``)."""
    args = [x for f in config_files for x in ("--config", f)]
    run(["b2txt", "workflow", "dvc", *args], project)
    if pretrained or (project / "pretrained" / "dvc.yaml").is_file():
        (project / "pretrained").mkdir(exist_ok=True)
        run(["b2txt", "workflow", "dvc", "--pretrained", *args], project)


def make_project(dest: Path) -> Path:
    """The workflow files with the tiny config's values in config/config.yaml and the baseline preset."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    tiny = read_yaml(TINY)
    base = dest / "config" / "config.yaml"
    preset = dest / "config" / "model" / "baseline.yaml"
    base.write_text(yaml.safe_dump(merge(read_yaml(base), {k: v for k, v in tiny.items() if k != "train"})))
    preset.write_text(yaml.safe_dump(merge(read_yaml(preset), {"train": tiny["train"]})))
    regenerate_dvc(dest)
    return dest


def configure(project: Path, **sections) -> None:
    """Merge ``sections`` into the project's config/config.yaml; dvc.yaml follows."""
    base = project / "config" / "config.yaml"
    base.write_text(yaml.safe_dump(merge(read_yaml(base), sections)))
    regenerate_dvc(project)


def init_dvc(project: Path, *git: str) -> None:
    """git and DVC in the project, with the repository's own cache settings (.dvc/config: outputs
    linked from the cache), so the stages run as they do for users; no remote (tests add their own)."""
    run([*(git or ("git",)), "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "config", "core.analytics", "false"], project)
    committed = configparser.ConfigParser()
    committed.read(ROOT / ".dvc" / "config")
    run(["dvc", "config", "cache.type", committed["cache"]["type"]], project)


def planned_rules(out: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", out, flags=re.MULTILINE)) - {"all"}


def ran_stages(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w@/.:]+)'", out))
