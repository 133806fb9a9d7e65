"""One workflow truth: the stage table (b2txt.workflow) makes the Snakemake rules and dvc.yaml.

The end-to-end runs of both tools are in test_pipeline.py (same results, with a preset) and
check there that every command imported only modules its DVC stage lists in ``deps``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml
from helpers.arpa import HAND_ARPA
from helpers.project import DECODING, ROOT, configure, init_dvc, make_project, planned_rules, ran_stages, run

from b2txt.cli import COMMANDS
from b2txt.ground.config import ResourcesConfig, load_config
from b2txt.workflow import _closure, _run_function_imports, code_deps, command_runs, lm_stages, stages

BASE = [ROOT / "config/config.yaml", ROOT / "config/model/baseline.yaml"]


def config_variants():
    """The default config, and the variants that change the table: pretrained model, Dryad data, a
    given data directory and graph, the lexicon decoder, an ARPA of one's own, SRILM."""
    cfg = load_config(BASE)
    yield "default", cfg
    yield "pretrained", cfg.model_copy(update={"model": cfg.model.model_copy(update={"source": "pretrained"})})
    yield "dryad", cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "dryad"})})
    yield "given", cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "dir"}),
                                          "lm": cfg.lm.model_copy(update={"source": "dir", "dir": "/lm"})})
    yield "lexicon", cfg.model_copy(update={"decode": cfg.decode.model_copy(update={"decoder": "lexicon"})})
    yield "arpa", with_lm(cfg, source="arpa", arpa="/lms/lab.arpa")
    yield "srilm", with_lm(cfg, tool="srilm")


def with_lm(cfg, **lm):
    return cfg.model_copy(update={"lm": cfg.lm.model_copy(update=lm)})


@pytest.mark.parametrize("pretrained", [False, True], ids=["dvc.yaml", "pretrained/dvc.yaml"])
def test_committed_dvc_files_are_what_the_table_gives(pretrained):
    cmd = [sys.executable, "-m", "b2txt", "workflow", "dvc", "--check", *(["--pretrained"] if pretrained else [])]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_table_finds_every_command_where_the_cli_registers_it():
    runs = command_runs()
    assert runs == {c.name: (c.run.__module__, c.run.__name__) for c in COMMANDS}


@pytest.mark.parametrize("name,cfg", list(config_variants()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_stage_is_a_b2txt_command_with_a_resource_family_and_an_env(name, cfg):
    families = set(ResourcesConfig.model_fields)
    runs = command_runs()
    for stage in stages(cfg):
        assert stage.family in families, stage.name
        assert (ROOT / "envs" / f"{stage.env}.yaml").is_file(), stage.name
        assert stage.program == "bash" or stage.command in runs, stage.name
        placeholders = {p for a in stage.args for p in _placeholders(a)}
        known = ({f"input.{k}" for k in stage.inputs} | {f"output.{k}" for k in stage.outputs}
                 | {f"params.{k}" for k in stage.params} | ({f"wildcards.{stage.each[0]}"} if stage.each else set()))
        assert placeholders <= known, (stage.name, placeholders - known)


def _placeholders(text: str) -> list[str]:
    import re

    return re.findall(r"\{([\w.]+)\}", text)


def test_code_deps_are_the_import_closure_of_what_each_command_runs():
    """The deps follow the import graph (grimp, which import-linter uses), function-level imports
    included: from the modules a command's run function imports, everything they import."""
    graph = grimp.build_graph("b2txt")

    def with_packages(modules: set[str]) -> set[str]:
        return modules | {".".join(m.split(".")[:i]) for m in modules for i in range(1, len(m.split(".")))}

    prelude = _closure({"b2txt.cli"})  # what `b2txt` imports before any command runs (module level)
    cfg = load_config(BASE)
    for stage in [*stages(cfg), *lm_stages(with_lm(cfg, source="arpa", arpa="lab.arpa"))]:
        if stage.program != "b2txt":
            continue
        roots = set().union(*(_run_function_imports(c) for c in (stage.command, *stage.starts)))
        below = {m for m in roots if not m.startswith("b2txt.cli")}
        expected = with_packages(below | set().union(*(graph.find_upstream_modules(m) for m in below))) | prelude
        declared = _closure(roots)
        assert {m for m in declared if not m.startswith("b2txt.cli")} == {
            m for m in expected if not m.startswith("b2txt.cli")}, stage.name
        files = code_deps(stage)
        assert all((ROOT / f).is_file() for f in files) and f"src/b2txt/cli/{_family(stage.command)}.py" in files


def _family(command: str) -> str:
    module, _ = command_runs()[command]
    return module.rsplit(".", 1)[1]


def test_evaluate_depends_on_the_lm_server_it_starts():
    cfg = load_config(BASE)
    evaluate = next(s for s in stages(cfg) if s.name == "evaluate")
    deps = code_deps(evaluate)
    assert "src/b2txt/server/router.py" in deps and "src/b2txt/server/lm_worker.py" in deps


def test_dvc_stages_pass_the_config_files_and_list_the_sections_they_set(tmp_path):
    """A preset's sections reach DVC: each stage gets every config file and lists, per file, the
    sections of its command that the file sets (DVC reruns it when they change)."""
    from b2txt.workflow import dvc_yaml

    (tmp_path / "Snakefile").write_text("")
    (tmp_path / "config" / "model").mkdir(parents=True)
    for f in ("config/config.yaml", "config/model/baseline.yaml", "config/model/paper.yaml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    files = ["config/config.yaml", "config/model/baseline.yaml", "config/model/paper.yaml"]
    doc = yaml.safe_load(dvc_yaml(files, tmp_path))["stages"]
    decode = doc["decode"]
    assert decode["cmd"].startswith("b2txt decode --config config/config.yaml --config config/model/baseline.yaml "
                                    "--config config/model/paper.yaml ")
    assert decode["params"] == [{"config/config.yaml": ["decode", "rescore"]}, {"config/model/paper.yaml": ["decode"]}]
    assert doc["train"]["params"] == [{"config/model/baseline.yaml": ["train"]}, {"config/model/paper.yaml": ["train"]}]
    assert "calibrate" not in doc  # the paper preset holds no session out
    assert doc["data"]["outs"] == [{"data/simulated": {"persist": True}}]


def test_snakemake_rules_come_from_the_table(tmp_path):
    """The dry run's jobs are the table's stages, with the table's command lines."""
    project = tmp_path / "p"
    project.mkdir()
    for name in ("Snakefile", "workflow", "config", "scripts", "envs"):
        src = ROOT / name
        (__import__("shutil").copytree if src.is_dir() else __import__("shutil").copy)(src, project / name)
    snakemake = Path(sys.executable).parent / "snakemake"
    r = subprocess.run([str(snakemake), "-n", "-p", "--forceall", "--cores", "2"], cwd=project,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = load_config(BASE)
    for stage in stages(cfg):
        assert f"rule {stage.name}:" in r.stdout, stage.name
    assert "b2txt decode --config .snakemake/b2txt/decode-rescore-" in r.stdout
    assert "--logits results/default/logits/val.hdf5 --lm results/default/lm/3gram --out results/default/decode/val" \
        in r.stdout


def test_workflow_dvc_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    """--out onto a config file (an input) or any other file is refused and leaves it as it was."""
    from b2txt.cli import main

    for name in ("Snakefile", "config/config.yaml", "config/model/baseline.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    before = (tmp_path / "config/config.yaml").read_bytes()
    assert main(["workflow", "dvc", "--root", str(tmp_path), "--out", "config/config.yaml"]) == 2
    assert "not written by `b2txt workflow dvc`" in capsys.readouterr().err
    assert (tmp_path / "config/config.yaml").read_bytes() == before
    assert main(["workflow", "dvc", "--root", str(tmp_path)]) == 0  # new file
    assert main(["workflow", "dvc", "--root", str(tmp_path)]) == 0  # its own file: replaced
    assert main(["workflow", "dvc", "--root", str(tmp_path), "--check"]) == 0


# ----------------------------------------------------------------------------- the LM stages of each lm.source

def _by_name(cfg) -> dict:
    return {s.name: s for s in stages(cfg)}


@pytest.mark.parametrize("tool", ["kenlm", "srilm"])
def test_both_ngram_tools_build_the_kenlm_tools_first(tool):
    """lm.bin is KenLM's build_binary with either estimator: the tools stage is there in both modes,
    its in-repository manifest is an input of lm_ngram, and lm_ngram declares the ARPA and the binary."""
    table = _by_name(with_lm(load_config(BASE), tool=tool))
    manifest = "results/default/lm/kenlm_tools.json"
    assert [o.path for o in table["kenlm_tools"].outputs.values()] == [manifest]
    assert table["lm_ngram"].inputs["tools"].path == manifest
    assert {o.path.rsplit("/", 1)[1] for o in table["lm_ngram"].outputs.values()} == {"lm.arpa", "lm.bin"}


def test_an_arpa_of_ones_own_is_imported_instead_of_built():
    table = _by_name(with_lm(load_config(BASE), source="arpa", arpa="/lms/lab.arpa"))
    assert not {"lm_text", "lm_ngram"} & set(table)
    names = list(table)
    assert names.index("kenlm_tools") < names.index("lm_import") < names.index("lm_graph") < names.index("decode")
    imported = "results/default/lm/imported"
    lm_import, graph = table["lm_import"], table["lm_graph"]
    assert {k: i.path for k, i in lm_import.inputs.items()} == {"arpa": "/lms/lab.arpa",
                                                                 "tools": "results/default/lm/kenlm_tools.json"}
    assert [o.path for o in lm_import.outputs.values()] == [f"{imported}/lm.arpa", f"{imported}/lm.bin"]
    assert graph.each is None and graph.inputs["arpa"].path == f"{imported}/lm.arpa"
    assert {o.path for o in graph.outputs.values()} == {f"{imported}/{f}" for f in ("TLG.fst", "words.txt", "G.fst")}
    for name in ("decode", "evaluate"):
        assert table[name].params["lm"] == imported and table[name].inputs["tlg"].path == f"{imported}/TLG.fst"


def test_committed_dvc_file_has_the_kenlm_tools_edge():
    """DVC tracks nothing outside the repository: the tools stage outputs its manifest under
    results/, and every lm_ngram depends on it."""
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    manifest = "results/default/lm/kenlm_tools.json"
    assert doc["kenlm_tools"]["outs"] == [manifest] and manifest in doc["kenlm_tools"]["cmd"]
    assert manifest in doc["lm_ngram"]["do"]["deps"]


def test_both_tools_plan_the_import_of_an_arpa(tmp_path):
    """lm.source arpa: Snakemake plans kenlm_tools -> lm_import -> lm_graph and decodes with the
    imported directory; DVC's own graph has the same edges (and, building, kenlm_tools -> lm_ngram)."""
    project = make_project(tmp_path / "p")
    init_dvc(project)
    assert '"kenlm_tools" -> "lm_ngram@2"' in run(["dvc", "dag", "--dot"], project).stdout
    arpa = tmp_path / "lab.arpa"
    arpa.write_text("\\data\\\n")  # only its existence matters to the plan
    configure(project, lm={"source": "arpa", "arpa": str(arpa)})
    r = run(["snakemake", "-n", "-p", "--cores", "1"], project)
    assert planned_rules(r.stdout) == {"corpus", "data", "validate", "preprocess", "train", "calibrate", "infer",
                                       "score", "kenlm_tools", "lm_import", "lm_graph"} | DECODING
    assert "b2txt lm import --config .snakemake/b2txt/lm-" in r.stdout
    assert "--lm results/tiny/lm/imported --out results/tiny/decode/val" in r.stdout
    dag = run(["dvc", "dag", "--dot"], project).stdout
    for edge in ('"kenlm_tools" -> "lm_import"', '"lm_import" -> "lm_graph"', '"lm_graph" -> "decode"'):
        assert edge in dag, edge
    assert "lm_ngram" not in dag and "lm_text" not in dag
    arpa.unlink()
    r = run(["snakemake", "-n", "--cores", "1"], project, check=False)
    assert r.returncode != 0 and str(arpa) in r.stdout + r.stderr
    r = run(["snakemake", "-n", "--cores", "1", "--config", "lm={source: arpa, arpa: null}"], project, check=False)
    assert r.returncode != 0 and "lm.arpa" in r.stdout + r.stderr


@pytest.mark.slow
def test_both_tools_turn_an_arpa_into_binary_and_graph(tmp_path, kenlm_dir):
    """The LM part of the DAG with lm.source arpa, run: Snakemake and `dvc repro` import a
    published-style ARPA (upper case) into the same lm.arpa, lm.bin and TLG.fst; then both are done."""
    arpa = tmp_path / "published.arpa"
    arpa.write_text(HAND_ARPA)
    lm, target = {"source": "arpa", "arpa": str(arpa), "memory": "5%"}, "results/tiny/lm/imported/TLG.fst"
    smk, dvc = make_project(tmp_path / "smk"), make_project(tmp_path / "dvc")
    configure(smk, lm=lm)
    configure(dvc, lm=lm)
    r = run(["snakemake", "--cores", "1", target], smk)
    assert planned_rules(r.stdout + r.stderr) == {"kenlm_tools", "lm_import", "lm_graph"}
    r = run(["snakemake", "--cores", "1", target], smk)
    assert "Nothing to be done" in r.stdout + r.stderr
    init_dvc(dvc)
    assert ran_stages(run(["dvc", "repro", "lm_graph"], dvc).stdout) == {"kenlm_tools", "lm_import", "lm_graph"}
    assert "up to date" in run(["dvc", "status", "lm_graph"], dvc).stdout.lower()
    for name in ("kenlm_tools.json", "imported/lm.arpa", "imported/lm.bin", "imported/words.txt", "imported/TLG.fst"):
        assert (smk / "results/tiny/lm" / name).read_bytes() == (dvc / "results/tiny/lm" / name).read_bytes(), name
