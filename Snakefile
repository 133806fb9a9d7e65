# Brain-to-text pipeline. Run: `snakemake --cores all` (config/config.yaml + the baseline
# training preset), or `snakemake --cores all --configfile my.yaml` to override. The rules are
# the stage table of the package (src/b2txt/workflow.py), each one `b2txt` command; `dvc.yaml`
# is written from the same table (`b2txt workflow dvc`).
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"
# The training preset; `--configfile config/model/triple.yaml` (or paper.yaml) overrides it.
configfile: "config/model/baseline.yaml"


# Typed parse first: nested `--config` overrides arrive as strings ('7', 'true') and are
# coerced there; the normalised config is then checked against the JSON schema.
include: "workflow/rules/common.smk"


validate(CFG.model_dump(mode="json"), "workflow/schemas/config.schema.json")


include: "workflow/rules/stages.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
