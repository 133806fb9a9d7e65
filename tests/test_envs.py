"""The environments users build: the extras of pyproject.toml and envs/*.yaml, checked against the
code (the packages each command imports, from its import graph), the stage table (which env each
rule runs in) and requirements.lock (the versions). Conda channels are unreachable on our
machines, so the conda files are checked here and their pip twins run in tests/test_family_envs.py.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from helpers.project import ROOT

from b2txt.cli import COMMANDS
from b2txt.ground.config import load_config
from b2txt.ground.extras import CORE, distribution_of, extras
from b2txt.workflow import ENVS, stages, third_party_imports

ENV_DIR = ROOT / "envs"
#: conda-forge names of PyPI distributions, where they differ.
CONDA_TO_PYPI = {"pytorch": "torch", "redis-py": "redis", "matplotlib-base": "matplotlib"}
#: conda packages that are tools, not Python distributions of the lock: unpinned there.
TOOLS = {"python", "pip", "kenlm", "redis-server"}
#: xla.yaml's torch 2.9 + torch_xla 2.9 differ from the lock's torch on purpose (torch_xla needs its torch).
XLA_OWN = {"torch", "torch-xla"}


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_packages(env: str) -> dict[str, str | None]:
    """PyPI name -> pinned version of what envs/<env>.yaml installs (conda and pip), tools by conda name."""
    doc = yaml.safe_load((ENV_DIR / f"{env}.yaml").read_text())
    found: dict[str, str | None] = {}
    for dep in doc["dependencies"]:
        if isinstance(dep, dict):
            for spec in dep["pip"]:
                m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s]+)", spec)
                assert m, f"envs/{env}.yaml: pip entry {spec!r} is not a pinned PyPI name"
                found[_norm(m.group(1))] = m.group(2)
        else:
            name, _, version = dep.partition("=")
            found[CONDA_TO_PYPI.get(name, name)] = version or None
    return found


def test_every_env_of_the_table_has_a_file_and_no_file_is_unused():
    assert sorted(p.stem for p in ENV_DIR.glob("*.yaml")) == sorted(ENVS)


@pytest.mark.parametrize("env", sorted(ENVS))
def test_env_file_parses_and_names_no_path_beside_it(env):
    """Snakemake copies the file to .snakemake/conda/<hash>.yaml: nothing may depend on its folder."""
    text = (ENV_DIR / f"{env}.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["channels"][0] == "conda-forge" and "defaults" not in doc["channels"]
    pip = [spec for dep in doc["dependencies"] if isinstance(dep, dict) for spec in dep["pip"]]
    assert not [s for s in pip if s.startswith(("-e", ".", "/", "file:", "git+")) or "/" in s]
    # the package itself comes from the post-deploy script, which finds the checkout without $0
    deploy = ENV_DIR / f"{env}.post-deploy.sh"
    assert deploy.resolve() == (ENV_DIR / "install-b2txt.sh").resolve()
    script = deploy.read_text()
    assert "B2TXT_SOURCE" in script and "$0" not in script and "dirname" not in script


@pytest.mark.parametrize("env", sorted(ENVS))
def test_env_file_pins_what_the_lock_pins(env):
    pins = lock()
    for name, version in env_packages(env).items():
        if name in TOOLS:
            continue
        if env == "xla" and name in XLA_OWN:
            assert version == "2.9.0", f"envs/xla.yaml: {name} must be 2.9.0 (torch_xla's torch)"
            continue
        assert version is not None, f"envs/{env}.yaml: {name} is not pinned"
        assert pins.get(name) == version, f"envs/{env}.yaml: {name} {version}, requirements.lock {pins.get(name)}"


@pytest.mark.parametrize("env", sorted(ENVS))
def test_env_file_holds_the_core_and_its_extras(env):
    table = extras()
    want = table[CORE].union(*(table[e] for e in ENVS[env]))
    have = set(env_packages(env))
    assert want <= have, f"envs/{env}.yaml lacks {sorted(want - have)}"
    if env == "xla":
        assert "torch-xla" in have


def test_each_command_imports_only_the_core_and_its_extras():
    """The packages every command's code imports (computed from its import graph) belong to the
    core or to the extras its Command record names, and each extra it names is really used."""
    table = extras()
    for cmd in COMMANDS:
        dists = {distribution_of(m) for m in third_party_imports(cmd.name)} - {"torch-xla"}  # own message
        allowed = table[CORE].union(*(table[e] for e in cmd.extras))
        assert dists <= allowed, f"b2txt {cmd.name} imports {sorted(dists - allowed)} beyond its extras {cmd.extras}"
        for e in cmd.extras:
            assert dists & table[e], f"b2txt {cmd.name} names the '{e}' extra but imports none of it"


def test_core_commands_and_the_decoding_commands_need_no_torch():
    by_name = {c.name: c for c in COMMANDS}
    for name in ("corpus", "simulate", "data", "download", "validate", "preprocess", "score", "submission",
                 "lm text", "lm ngram", "workflow dvc"):
        assert by_name[name].extras == (), name
    for name in ("decode", "evaluate", "lm-server", "lm-worker", "lm graph", "figures"):
        assert "train" not in by_name[name].extras


CONFIGS = {
    "default": {},
    "rescore": {"rescore": {"enabled": True}},
    "xla": {"train": {"device": "xla"}, "infer": {"device": "xla"}},
    "lexicon": {"decode": {"decoder": "lexicon"}},
    "pretrained": {"model": {"source": "pretrained"}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_rule_runs_in_an_env_that_holds_its_command(name, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIGS[name]))
    cfg = load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "model" / "baseline.yaml", path])
    by_name = {c.name: c for c in COMMANDS}
    for stage in stages(cfg):
        assert stage.env in ENVS, stage.name
        if stage.program != "b2txt":
            continue
        needed = set(by_name[stage.command].extras)
        for started in stage.starts:
            needed |= set(by_name[started].extras)
        if not cfg.rescore.enabled:
            needed.discard("rescore")  # the LLM is loaded only when rescoring is on
        assert needed <= set(ENVS[stage.env]), f"{name}: rule {stage.name} runs in {stage.env}, needs {needed}"
    envs = {s.name: s.env for s in stages(cfg)}
    if "evaluate" in envs:
        assert "redis-server" in env_packages(envs["evaluate"])
    if "kenlm_tools" in envs:
        assert "kenlm" in env_packages(envs["kenlm_tools"])  # conda-forge's lmplz/build_binary
    if name == "xla":
        assert envs["train"] == "xla" and envs["infer"] == "xla"


def test_a_command_without_its_extra_names_the_extra(tmp_path):
    """With matplotlib unimportable, `b2txt figures` exits 2 with one line naming the 'figures' extra."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from b2txt.cli import main\n"
            f"sys.exit(main(['figures', '--model', {str(tmp_path / 'm')!r}, '--scores', {str(tmp_path / 's')!r}, "
            f"'--out', {str(tmp_path / 'f')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "'figures' extra" in r.stderr and "pip install 'b2txt[figures]'" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "f").exists()
