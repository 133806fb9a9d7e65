# Logits per split, then greedy-CTC phoneme error rates of the validation split.


rule infer:
    input:
        model=MODEL_INPUT,
        data=DATA,
        manifest=rules.preprocess.output,
    output:
        f"{RUN}/logits/{{split}}.hdf5",
    wildcard_constraints:
        split="train|val|test",
    params:
        model=model_dir,
        batch_size=CFG.infer.batch_size,
        device=CFG.train.device,
    threads: rule_threads("infer")
    resources:
        **rule_resources("infer"),
    log:
        f"{LOGS}/infer_{{split}}.log",
    conda:
        "../../envs/train.yaml"
    shell:
        "b2txt infer --model {params.model} --data {input.data} --manifest {input.manifest}"
        " --split {wildcards.split} --out {output} --device {params.device}"
        " --batch-size {params.batch_size} --known-sessions-only 2> {log}"


rule score:
    input:
        f"{RUN}/logits/val.hdf5",
    output:
        metrics=f"{RUN}/scores/val/metrics.json",
        per_session=f"{RUN}/scores/val/per_session.csv",
        per_corpus=f"{RUN}/scores/val/per_corpus.csv",
        trials=f"{RUN}/scores/val/trials.csv",
    params:
        out=lambda w, output: os.path.dirname(output.metrics),
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        f"{LOGS}/score.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "b2txt score --logits {input} --out {params.out} --split val > {log} 2>&1"
