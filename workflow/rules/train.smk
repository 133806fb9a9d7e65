# Train the GRU phoneme decoder, or (model.source: pretrained) fetch the published checkpoint.
# MODEL_INPUT is what `infer` depends on; model_dir() (common.smk) the directory it reads.

TRAIN_NPROC = max(1, CFG.resources.train.gpus)  # `b2txt train --nproc`: one process per GPU


rule train:
    input:
        data=DATA,
        manifest=rules.preprocess.output,
    output:
        directory(f"{RUN}/model"),
    params:
        config=config_for("train"),
        # resources.train.gpus > 1: N data-parallel processes (DDP, one GPU each) in the one job
        nproc=f"--nproc {TRAIN_NPROC}" if TRAIN_NPROC > 1 else "",
    threads: rule_threads("train")
    resources:
        **rule_resources("train"),
        # torch threads per training process: the job's cores shared by its processes
        torch_threads=lambda w, threads: max(1, threads // TRAIN_NPROC),
    log:
        f"{LOGS}/train.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "b2txt train --config {params.config} --data {input.data} --manifest {input.manifest}"
        " --out {output} --threads {resources.torch_threads} {params.nproc} 2> {log}"


if PRETRAINED:

    localrules:
        download_model,  # on a cluster: on the submitting host (compute nodes often have no internet)

    rule download_model:
        output:
            directory(CFG.model.dir),
        params:
            config=config_for("download"),
            file=CFG.model.file,
            partial=partial_download_dir(CFG.model.dir),
        threads: rule_threads("default")
        resources:
            **rule_resources("default"),
        log:
            f"{LOGS}/download_model.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "b2txt download --config {params.config} --dataset data --files {params.file} --out {output} --partial-dir {params.partial} 2> {log}"

    MODEL_INPUT = rules.download_model.output
else:
    MODEL_INPUT = rules.train.output

