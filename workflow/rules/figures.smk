# Figures (PDF + PNG); the PNGs go into `snakemake --report report.html`.


rule figures:
    input:
        model=rules.train.output,
        trials=rules.score.output.trials,
    output:
        report(
            expand(f"{RUN}/figures/{{name}}.png", name=["training_curve", "per_session_per"]),
            caption="../report/figures.rst",
            category="Results",
        ),
        expand(f"{RUN}/figures/{{name}}.pdf", name=["training_curve", "per_session_per"]),
    params:
        scores=lambda w, input: os.path.dirname(input.trials),
        out=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/figures.log",
    conda:
        "../../envs/figures.yaml"
    shell:
        "b2txt figures --model {input.model} --scores {params.scores} --out {params.out} 2> {log}"
