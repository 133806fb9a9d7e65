# Train the GRU phoneme decoder, or (model.source: pretrained) fetch the published checkpoint.
# MODEL_INPUT is what `infer` depends on; model_dir() (common.smk) the directory it reads.


rule train:
    input:
        data=DATA,
        manifest=rules.preprocess.output,
    output:
        directory(f"{RUN}/model"),
    params:
        config=config_for("train"),
    threads: workflow.cores
    log:
        f"{LOGS}/train.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "b2txt train --config {params.config} --data {input.data} --manifest {input.manifest}"
        " --out {output} --threads {threads} 2> {log}"


if PRETRAINED:

    rule download_model:
        output:
            directory(CFG.model.dir),
        params:
            config=config_for("download"),
            file=CFG.model.file,
        log:
            f"{LOGS}/download_model.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "b2txt download --config {params.config} --dataset data --files {params.file} --out {output} 2> {log}"

    MODEL_INPUT = rules.download_model.output
else:
    MODEL_INPUT = rules.train.output

