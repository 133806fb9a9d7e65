# Shared names. The config is parsed by the package's typed config (defaults, coercion of
# `--config` strings, clear errors); each rule then hands its command a small file with the
# config sections that command reads (`config_for`), named by its content.
import os

from b2txt.config import parse_config, section_config_file

CFG = parse_config(config, "snakemake config")
RUN = f"results/{CFG.run}"
LOGS = f"{RUN}/logs"
DATA = CFG.data.dir
PRETRAINED = CFG.model.source == "pretrained"  # no training: calibrate and figures are skipped


def config_for(*sections):
    return section_config_file(config, ".snakemake/b2txt", *sections)


def model_dir(wildcards, input):
    """The model directory of `infer`: ours, or the unpacked archive inside the download directory."""
    return CFG.model.model_dir if PRETRAINED else input.model
