# Language-model decoding of the logits. The default path is `evaluate`: a private redis-server
# and the LM server (the published Redis protocol) decode every trial, then WER/PER tables and
# the competition CSV. `decode` + `score_words` decode the same val logits in process (a pool of
# decoder processes) for comparison; both must give the same sentences.

# lm.source dir: a given graph directory (e.g. a published one); otherwise the one built here
DECODE_LM = CFG.lm.dir if CFG.lm.source == "dir" else f"{LM}/{CFG.lm.decode_order}gram"


rule decode:
    input:
        logits=f"{RUN}/logits/{{split}}.hdf5",
        tlg=f"{DECODE_LM}/TLG.fst",
        words=f"{DECODE_LM}/words.txt",
        kenlm=f"{DECODE_LM}/lm.bin" if CFG.decode.decoder == "lexicon" else [],
    output:
        decoded=f"{RUN}/decode/{{split}}/decoded.csv",
        nbest=f"{RUN}/decode/{{split}}/nbest.jsonl",
    wildcard_constraints:
        split="train|val|test",
    params:
        config=config_for("decode", "rescore"),
        lm=lambda w, input: os.path.dirname(input.tlg),
        out=lambda w, output: os.path.dirname(output.decoded),
    threads: rule_threads("decode")
    resources:
        **rule_resources("decode"),
    log:
        f"{LOGS}/decode_{{split}}.log",
    conda:
        "../../envs/lm.yaml"
    shell:
        "b2txt decode --config {params.config} --logits {input.logits} --lm {params.lm}"
        " --out {params.out} --workers {threads} 2> {log}"


rule score_words:
    input:
        f"{RUN}/decode/val/decoded.csv",
    output:
        metrics=f"{RUN}/scores/val/wer.json",
        per_session=f"{RUN}/scores/val/wer_per_session.csv",
        per_corpus=f"{RUN}/scores/val/wer_per_corpus.csv",
        trials=f"{RUN}/scores/val/wer_trials.csv",
    params:
        out=lambda w, output: os.path.dirname(output.metrics),
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        f"{LOGS}/score_words.log",
    conda:
        "../../envs/lm.yaml"
    shell:
        "b2txt score --decoded {input} --out {params.out} --split val > {log} 2>&1"


rule evaluate:
    input:
        logits=f"{RUN}/logits/{{split}}.hdf5",
        tlg=f"{DECODE_LM}/TLG.fst",
        words=f"{DECODE_LM}/words.txt",
    output:
        decoded=f"{RUN}/evaluate/{{split}}/decoded.csv",
        summary=f"{RUN}/evaluate/{{split}}/evaluation.json",
        submission=f"{RUN}/evaluate/{{split}}/submission.csv",
    wildcard_constraints:
        split="train|val|test",
    params:
        config=config_for("decode", "rescore", "server"),
        lm=lambda w, input: os.path.dirname(input.tlg),
        out=lambda w, output: os.path.dirname(output.decoded),
    threads: rule_threads("decode")
    resources:
        **rule_resources("decode"),
    log:
        f"{LOGS}/evaluate_{{split}}.log",
    conda:
        "../../envs/lm.yaml"
    shell:
        "b2txt evaluate --config {params.config} --logits {input.logits} --lm {params.lm}"
        " --out {params.out} --split {wildcards.split} --workers {threads} 2> {log}"
