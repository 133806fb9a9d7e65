# Data: corpus -> simulate (simulated data) or download (data.source: dryad) -> validate -> preprocess.

if CFG.data.source == "simulated":

    rule corpus:
        output:
            CFG.corpus.out,
        params:
            config=config_for("corpus"),
        log:
            f"{LOGS}/corpus.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "b2txt corpus --config {params.config} --out {output} 2> {log}"

    rule simulate:
        input:
            CFG.corpus.out,
        output:
            directory(DATA),
        params:
            config=config_for("simulate"),
        log:
            f"{LOGS}/simulate.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "b2txt simulate --config {params.config} --sentences {input} --out {output} 2> {log}"

elif CFG.data.source == "dryad":

    # The published data through the Dryad API (`b2txt download`: checked, resumable, unpacked);
    # download.files selects files (null: all of them, pickles and the pretrained model included).
    rule download:
        output:
            directory(DATA),
        params:
            config=config_for("download"),
        log:
            f"{LOGS}/download.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "b2txt download --config {params.config} --dataset data --out {output} 2> {log}"


rule validate:
    input:
        DATA,
    output:
        f"{RUN}/validation.txt",
    log:
        f"{LOGS}/validate.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "b2txt validate {input} --report {output} 2> {log}"


rule preprocess:
    input:
        data=DATA,
        validated=rules.validate.output,
    output:
        f"{RUN}/manifest.csv",
    log:
        f"{LOGS}/preprocess.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "b2txt preprocess --data {input.data} --out {output} 2> {log}"
