# Data: corpus -> simulate (simulated data) or download (data.source: dryad) -> validate -> preprocess.

if CFG.data.source == "simulated":

    rule corpus:
        output:
            CFG.corpus.out,
        params:
            config=config_for("corpus"),
        threads: rule_threads("default")
        resources:
            **rule_resources("default"),
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
        threads: rule_threads("default")
        resources:
            **rule_resources("default"),
        log:
            f"{LOGS}/simulate.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "b2txt simulate --config {params.config} --sentences {input} --out {output} 2> {log}"

elif CFG.data.source == "dryad":

    localrules:
        download,  # on a cluster: on the submitting host (compute nodes often have no internet)

    # The published data through the Dryad API (`b2txt download`: checked, resumable, unpacked);
    # download.files selects files (null: all of them, pickles and the pretrained model included).
    rule download:
        output:
            directory(DATA),
        params:
            config=config_for("download"),
            # outside the output directory, which Snakemake empties before a rerun: resumes survive
            partial=partial_download_dir(DATA),
        threads: rule_threads("default")
        resources:
            **rule_resources("default"),
        log:
            f"{LOGS}/download.log",
        conda:
            "../../envs/data.yaml"
        shell:
            "b2txt download --config {params.config} --dataset data --out {output} --partial-dir {params.partial} 2> {log}"


rule validate:
    input:
        DATA,
    output:
        f"{RUN}/validation.txt",
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
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
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        f"{LOGS}/preprocess.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "b2txt preprocess --data {input.data} --out {output} 2> {log}"
