# Rapid calibration of the trained model to the held-out session (train.holdout_sessions).


rule calibrate:
    input:
        model=rules.train.output,
        data=DATA,
        manifest=rules.preprocess.output,
    output:
        table=f"{RUN}/calibration/calibration.csv",
    params:
        config=config_for("calibrate"),
        out=lambda w, output: os.path.dirname(output.table),
    threads: rule_threads("calibrate")
    resources:
        **rule_resources("calibrate"),
    log:
        f"{LOGS}/calibrate.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "b2txt calibrate --config {params.config} --model {input.model} --data {input.data}"
        " --manifest {input.manifest} --out {params.out} > {log} 2>&1"
