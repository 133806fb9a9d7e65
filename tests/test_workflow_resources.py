"""Every rule's threads and resources come from config `resources:` (no literals in rules)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from b2txt.ground.config import ResourcesConfig

ROOT = Path(__file__).resolve().parents[1]
RULES = sorted((ROOT / "workflow/rules").glob("*.smk"))


def rule_blocks():
    """(file, rule name, text of the rule) for every rule in workflow/rules."""
    for path in RULES:
        text = path.read_text()
        starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\s*rule (\w+):", text, flags=re.MULTILINE)]
        for i, (start, name) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
            yield path.name, name, text[start:end]


def test_every_rule_takes_threads_and_resources_from_one_config_family():
    families = set(ResourcesConfig.model_fields)
    seen = set()
    for file, name, block in rule_blocks():
        seen.add(name)
        threads = re.findall(r"^\s*threads:\s*(.+)$", block, flags=re.MULTILINE)
        assert len(threads) == 1, f"{file}: rule {name} needs one `threads: rule_threads(...)`"
        t = re.fullmatch(r'rule_threads\("(\w+)"\)', threads[0].strip())
        r = re.search(r'^\s*resources:\s*\n\s*\*\*rule_resources\("(\w+)"\),', block, flags=re.MULTILINE)
        assert t and r, f"{file}: rule {name}: threads/resources not from rule_threads/rule_resources"
        assert t.group(1) == r.group(1) in families, f"{file}: rule {name}: families {t.group(1)}, {r.group(1)}"
        assert not re.search(r"\b(mem_mb|runtime|gpu|slurm_partition)\s*=", block), f"{file}: rule {name}: literal"
    assert {"train", "evaluate", "decode", "lm_ngram", "lm_graph", "infer", "figures"} <= seen


def dry_run(tmp_path: Path, *config: str) -> str:
    project = tmp_path / "p"
    if not project.exists():
        project.mkdir()
        for name in ("Snakefile", "workflow", "config", "scripts", "envs"):
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, project / name)
    snakemake = Path(sys.executable).parent / "snakemake"
    r = subprocess.run([str(snakemake), "-n", "-p", "--forceall", "--cores", "16", "--config", *config],
                       cwd=project, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def job(out: str, rule: str) -> str:
    """The dry-run block of the first job of `rule`: its properties and its shell command."""
    m = re.search(rf"^(?:local)?rule {rule}:\n(.*?)(?=^\[|\Z)", out, flags=re.MULTILINE | re.DOTALL)
    assert m, f"no job of rule {rule} in:\n{out[-2000:]}"
    return m.group(1)


def test_config_resources_reach_the_jobs_and_gpus_launch_nproc(tmp_path):
    out = dry_run(tmp_path, "resources={train: {cpus: 8, mem_mb: 1234, runtime: 77, gpus: 4, partition: gpu}, "
                            "decode: {cpus: 3, slurm_extra: '--qos=long'}}")
    train = job(out, "train")
    assert "threads: 8" in train and "gpu=4" in train and "mem_mb=1234" in train and "runtime=77" in train
    assert "slurm_partition=gpu" in train
    assert re.search(r"b2txt train .*--threads 2 --nproc 4", train), train  # 8 cores over 4 processes
    evaluate = job(out, "evaluate")
    assert "threads: 3" in evaluate and "--workers 3" in evaluate and "slurm_extra=--qos=long" in evaluate
    one = job(dry_run(tmp_path, "resources={train: {cpus: 8, gpus: 1}}"), "train")
    assert "gpu=1" in one and "--nproc" not in one and "--threads 8" in one  # one GPU: today's command
