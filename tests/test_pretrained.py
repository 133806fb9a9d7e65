"""model.source: pretrained and data.source: dryad, end to end against a local Dryad-shaped server.

The server of tests/test_download.py serves the tiny simulated data as the published data zip and
a checkpoint in the published layout (``t15_pretrained_rnn_baseline/checkpoint/best_checkpoint``
+ ``args.yaml``) built here; Snakemake and `dvc repro pretrained/dvc.yaml` then run the same
stages the README documents for the real Dryad files, without training (DVC from the archives
`b2txt dvc-pin` pinned, Snakemake through its fetch_model rule).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers.dryad_server import DATA_DOI, LM_DOI, Blob, zip_bytes
from helpers.project import (
    LM_BUILD,
    RUN,
    configure,
    init_dvc,
    make_project,
    planned_rules,
    ran_stages,
    regenerate_dvc,
    run,
)

from b2txt.data.dryad import DATA_SUBDIR
from b2txt.ground.config import ModelConfig
from b2txt.ground.fileio import OWNER_MARK  # download marks the directory it unpacked
from b2txt.models.checkpoint import build_model

pytestmark = [pytest.mark.slow, pytest.mark.kenlm]

MODEL_ZIP = "t15_pretrained_rnn_baseline.zip"
DATA_ZIP = "t15_copyTask_neuralData.zip"
DESCRIPTION = "t15_copyTaskData_description.csv"


def published_checkpoint_zip(sessions: list[str]) -> bytes:
    """A small GRU in the published layout, wrapped in its directory as the Dryad zip is."""
    mcfg = ModelConfig(n_units=16, n_layers=1)
    torch.manual_seed(0)
    model = build_model(mcfg, len(sessions))
    buf = io.BytesIO()
    torch.save({"model_state_dict": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
                "optimizer_state_dict": {}, "scheduler_state_dict": {}, "val_PER": 0.5, "val_loss": 1.0}, buf)
    args = {"model": {"n_input_features": 512, "n_units": mcfg.n_units, "n_layers": mcfg.n_layers,
                      "rnn_dropout": 0.4, "patch_size": mcfg.patch_size, "patch_stride": mcfg.patch_stride,
                      "input_network": {"input_layer_dropout": 0.2}},
            "dataset": {"sessions": sessions, "n_classes": 41,
                        "data_transforms": {"smooth_data": True, "smooth_kernel_std": 2, "smooth_kernel_size": 100}}}
    return zip_bytes({"t15_pretrained_rnn_baseline/checkpoint/best_checkpoint": buf.getvalue(),
                      "t15_pretrained_rnn_baseline/checkpoint/args.yaml": yaml.safe_dump(args).encode()})


def serve(dryad, data: Path) -> list[str]:
    """Put the data (zip + description CSV), the checkpoint and a small LM archive on the server."""
    sessions = sorted(p.name for p in (data / DATA_SUBDIR).iterdir() if p.is_dir())
    members = {str(p.relative_to(data)): p.read_bytes() for p in sorted((data / DATA_SUBDIR).rglob("*")) if p.is_file()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in {"languageModel/TLG.fst": b"fst", "languageModel/words.txt": b"<eps> 0\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    dryad.datasets[DATA_DOI] = {DATA_ZIP: Blob(zip_bytes(members)),
                                DESCRIPTION: Blob((data / DESCRIPTION).read_bytes()),
                                MODEL_ZIP: Blob(published_checkpoint_zip(sessions))}
    dryad.datasets[LM_DOI] = {"languageModel.tar.gz": Blob(buf.getvalue())}
    return sessions


def fast_download(dryad) -> dict:
    return {"api_root": dryad.url, "files": [DATA_ZIP, DESCRIPTION], "retries": 1, "timeout_s": 20}


def test_pretrained_plan_skips_training_calibration_and_figures(tmp_path):
    project = make_project(tmp_path)
    r = run(["snakemake", "-n", "--cores", "1", "--config", "model={source: pretrained}"], project)
    assert planned_rules(r.stdout) == {"corpus", "data", "validate", "preprocess", "fetch_model", "unpack_model",
                                       "infer", "score", "decode", "score_words", "evaluate", "kenlm_tools"} | LM_BUILD
    r = run(["snakemake", "-n", "--cores", "1", "--config", "data={source: dryad, dir: data/pretrained}",
             "model={source: pretrained}"], project, check=False)
    assert r.returncode != 0 and "must not contain each other" in r.stdout + r.stderr


def test_snakemake_downloads_data_and_published_model_then_infers(tmp_path, tiny_sim, dryad):
    sessions = serve(dryad, tiny_sim)
    project = make_project(tmp_path)
    configure(project, data={"source": "dryad", "dir": "data/dryad"}, model={"source": "pretrained"},
              download=fast_download(dryad))
    r = run(["snakemake", "-n", "--cores", "1"], project)
    assert planned_rules(r.stdout) == {"data", "fetch_model", "unpack_model", "validate", "preprocess", "infer",
                                       "score", "decode", "score_words", "evaluate", "kenlm_tools"} | LM_BUILD
    target = f"{RUN}/scores/val/metrics.json"
    run(["snakemake", "--cores", "1", target, f"{RUN}/logits/test.hdf5"], project)
    assert sorted(p.name for p in (project / "data/dryad" / DATA_SUBDIR).iterdir() if p.name != OWNER_MARK) == sessions
    assert (project / "data/pretrained/t15_pretrained_rnn_baseline/checkpoint/best_checkpoint").is_file()
    assert (project / target).is_file() and (project / RUN / "logits/test.hdf5").is_file()
    assert not (project / RUN / "model").exists()  # nothing was trained
    assert dryad.blob_requests(MODEL_ZIP) and dryad.blob_requests(DATA_ZIP)
    r = run(["snakemake", "-n", "--cores", "1", target], project)
    assert "Nothing to be done" in r.stdout + r.stderr


def test_dvc_repro_of_the_pretrained_pipeline_unpacks_the_pinned_model_instead_of_training(tmp_path, tiny_sim, dryad):
    serve(dryad, tiny_sim)
    project = make_project(tmp_path)
    configure(project, download=fast_download(dryad))
    regenerate_dvc(project, pretrained=True)
    init_dvc(project)
    run(["b2txt", "dvc-pin", "--api-root", dryad.url, "--files", MODEL_ZIP, "languageModel.tar.gz"], project)
    requests = len(dryad.requests)
    r = run(["dvc", "repro", "pretrained/dvc.yaml:score"], project)
    assert ran_stages(r.stdout) == {"corpus", "data", "validate", "preprocess", "pretrained/dvc.yaml:unpack_model",
                      "pretrained/dvc.yaml:infer@val", "pretrained/dvc.yaml:score"}
    assert (project / RUN / "pretrained/scores/val/metrics.json").is_file()
    assert not (project / RUN / "model").exists()
    run(["dvc", "repro", "pretrained/dvc.yaml:unpack_lm@3gram"], project)
    assert (project / "data/published-lm/3gram/languageModel/words.txt").read_bytes() == b"<eps> 0\n"
    assert len(dryad.requests) == requests  # the stages read the pinned archives: nothing downloaded again
    assert "up to date" in run(["dvc", "status", "pretrained/dvc.yaml:score"], project).stdout.lower()


def test_dvc_data_stage_follows_data_source(tmp_path, tiny_sim, dryad):
    """dvc.yaml follows data.source as Snakemake does: dryad makes the data stage a download; dir (after
    `b2txt workflow dvc`) has no data stage, and the directory is left as it is."""
    sessions = serve(dryad, tiny_sim)
    project = make_project(tmp_path)
    configure(project, data={"source": "dryad", "dir": "data/dryad"}, download=fast_download(dryad))
    init_dvc(project)
    r = run(["dvc", "repro", "preprocess"], project)
    assert ran_stages(r.stdout) == {"data", "validate", "preprocess"}
    data = project / "data/dryad"
    assert sorted(p.name for p in (data / DATA_SUBDIR).iterdir() if p.name != OWNER_MARK) == sessions
    assert dryad.blob_requests(DATA_ZIP) and not dryad.blob_requests(MODEL_ZIP)
    assert "data:" in (project / "dvc.yaml").read_text()
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*.hdf5")}
    configure(project, data={"source": "dir", "dir": "data/dryad"})
    assert "\n  data:\n" not in (project / "dvc.yaml").read_text()  # no stage makes a given directory
    r = run(["dvc", "repro", "preprocess"], project)
    assert ran_stages(r.stdout) == set()  # same data: nothing to do
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*.hdf5")} == before
