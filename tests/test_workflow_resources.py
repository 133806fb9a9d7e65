"""Every rule's threads and resources come from config `resources:` (no literals in rules)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from b2txt.ground.config import ResourcesConfig

ROOT = Path(__file__).resolve().parents[1]


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


def test_every_job_takes_threads_and_resources_from_its_family(tmp_path):
    """Each rule family gets its own cpus and memory here: every job of the dry run shows its family's."""
    from b2txt.ground.config import load_config
    from b2txt.workflow import stages

    families = list(ResourcesConfig.model_fields)
    cpus = {f: 2 + i for i, f in enumerate(families)}
    mem = {f: 1000 + 7 * i for i, f in enumerate(families)}
    spec = ", ".join(f"{f}: {{cpus: {cpus[f]}, mem_mb: {mem[f]}}}" for f in families)
    out = dry_run(tmp_path, f"resources={{{spec}}}")
    cfg = load_config([ROOT / "config/config.yaml", ROOT / "config/model/baseline.yaml"])
    seen = set()
    for stage in stages(cfg):
        block = job(out, stage.name)
        threads = min(cpus[stage.family], 16)
        assert (f"threads: {threads}" in block) == (threads > 1), (stage.name, block)
        assert f"mem_mb={mem[stage.family]}" in block, (stage.name, block)
        seen.add(stage.name)
    assert {"train", "evaluate", "decode", "lm_ngram", "lm_graph", "infer", "figures"} <= seen
    rules = (ROOT / "workflow/rules/stages.smk").read_text()
    assert not re.search(r"\b(mem_mb|runtime|gpu|slurm_partition)\s*=", rules)  # no literals in the rules


def test_config_resources_reach_the_jobs_and_gpus_launch_nproc(tmp_path):
    out = dry_run(tmp_path, "resources={train: {cpus: 8, mem_mb: 1234, runtime: 77, gpus: 4, partition: gpu}, "
                            "decode: {cpus: 3, slurm_extra: '--qos=long'}}")
    train = job(out, "train")
    assert "threads: 8" in train and "gpu=4" in train and "mem_mb=1234" in train and "runtime=77" in train
    assert "slurm_partition=gpu" in train
    assert re.search(r"b2txt train .*--nproc 4", train) and "--threads 2 " in train, train  # 8 cores over 4 processes
    evaluate = job(out, "evaluate")
    assert "threads: 3" in evaluate and "--workers 3" in evaluate and "slurm_extra=--qos=long" in evaluate
    one = job(dry_run(tmp_path, "resources={train: {cpus: 8, gpus: 1}}"), "train")
    assert "gpu=1" in one and "--nproc" not in one and "--threads 8" in one  # one GPU: today's command
