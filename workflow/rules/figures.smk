# Figures (PDF + PNG); the PNGs go into `snakemake --report report.html`.

FIGURES = ["training_curve", "per_session_per", "figure2"] + (["calibration_curve"] if CFG.calibrate.enabled else [])


rule figures:
    input:
        model=rules.train.output,
        trials=rules.score.output.trials,
        wer_trials=rules.score_words.output.trials,
        logits=f"{RUN}/logits/val.hdf5",
        calibration=rules.calibrate.output.table if CFG.calibrate.enabled else [],
    output:
        report(
            expand(f"{RUN}/figures/{{name}}.png", name=FIGURES),
            caption="../report/figures.rst",
            category="Results",
        ),
        expand(f"{RUN}/figures/{{name}}.pdf", name=FIGURES),
    params:
        scores=lambda w, input: os.path.dirname(input.trials),
        out=lambda w, output: os.path.dirname(output[0]),
        calibration=lambda w, input: f"--calibration {input.calibration}" if input.calibration else "",
    threads: rule_threads("figures")
    resources:
        **rule_resources("figures"),
    log:
        f"{LOGS}/figures.log",
    conda:
        "../../envs/figures.yaml"
    shell:
        "b2txt figures --model {input.model} --scores {params.scores} --logits {input.logits}"
        " {params.calibration} --out {params.out} 2> {log}"
