# Train the GRU phoneme decoder.


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
