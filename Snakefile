# Brain-to-text pipeline. Run: `snakemake --cores all` (config/config.yaml + the baseline
# training preset), or `snakemake --cores all --configfile my.yaml` to override. Each rule calls one `b2txt` command; the
# logic lives in the package (src/b2txt), not here.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"
# The training preset; `--configfile config/model/triple.yaml` (or paper.yaml) overrides it.
configfile: "config/model/baseline.yaml"


# Typed parse first: nested `--config` overrides arrive as strings ('7', 'true') and are
# coerced there; the normalised config is then checked against the JSON schema.
include: "workflow/rules/common.smk"


validate(CFG.model_dump(mode="json"), "workflow/schemas/config.schema.json")


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/lm.smk"
include: "workflow/rules/decode.smk"
include: "workflow/rules/figures.smk"


rule all:
    input:
        f"{RUN}/scores/val/metrics.json",
        expand(f"{RUN}/logits/{{split}}.hdf5", split=CFG.infer.splits),
        rules.figures.output if not PRETRAINED else [],  # figures and calibration need our training
        rules.calibrate.output if CFG.calibrate.enabled and not PRETRAINED else [],
        expand(f"{LM}/{{order}}gram/{{f}}", order=CFG.lm.orders, f=["TLG.fst", "lm.bin"])
        if CFG.lm.source == "build"
        else [],
        rules.score_words.output,
        expand(rules.evaluate.output.summary, split=[s for s in ("val", "test") if s in CFG.infer.splits]),
    default_target: True
