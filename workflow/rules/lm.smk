# Language models: KenLM tools (built once, cached outside results/) -> LM text -> n-gram -> graph.
# Each order in lm.orders gets results/<run>/lm/<order>gram/ with lm.arpa, lm.bin (KenLM),
# TLG.fst and words.txt (the decoding graph in the published layout).

KENLM_BIN = os.path.join(os.path.expanduser(CFG.lm.kenlm_dir), "bin")
LM = f"{RUN}/lm"


# On a cluster (profiles/slurm) these run on the submitting host, not in a Slurm job: the build
# downloads the pinned kenlm sdist and needs cmake/Boost, which compute nodes often lack.
localrules:
    kenlm_tools,


rule kenlm_tools:
    output:
        lmplz=os.path.join(KENLM_BIN, "lmplz"),
        build_binary=os.path.join(KENLM_BIN, "build_binary"),
    params:
        dest=lambda w, output: os.path.dirname(os.path.dirname(output.lmplz)),
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        f"{LOGS}/kenlm_tools.log",
    conda:
        "../../envs/lm.yaml"
    shell:
        "bash scripts/build_kenlm.sh {params.dest} > {log} 2>&1"


rule lm_text:
    input:
        data=DATA,
        corpus=CFG.lm.text or [],
    output:
        text=f"{LM}/text.txt",
        stats=f"{LM}/text.json",
    params:
        config=config_for("corpus", "lm"),
    threads: rule_threads("default")
    resources:
        **rule_resources("default"),
    log:
        f"{LOGS}/lm_text.log",
    conda:
        "../../envs/lm.yaml"
    shell:
        "b2txt lm text --config {params.config} --data {input.data} --out {output.text} 2> {log}"


rule lm_ngram:
    input:
        text=rules.lm_text.output.text,
        tools=ancient(rules.kenlm_tools.output.lmplz) if CFG.lm.tool == "kenlm" else [],
    output:
        arpa=f"{LM}/{{order}}gram/lm.arpa",
        binary=f"{LM}/{{order}}gram/lm.bin",
    wildcard_constraints:
        order=r"\d",
    params:
        config=config_for("lm"),
        out=lambda w, output: os.path.dirname(output.arpa),
    threads: rule_threads("lm")
    resources:
        **rule_resources("lm"),
    log:
        f"{LOGS}/lm_ngram_{{order}}.log",
    conda:
        "../../envs/lm.yaml"
    shell:
        "b2txt lm ngram --config {params.config} --text {input.text} --order {wildcards.order}"
        " --out {params.out} 2> {log}"


rule lm_graph:
    input:
        arpa=rules.lm_ngram.output.arpa,
    output:
        tlg=f"{LM}/{{order}}gram/TLG.fst",
        words=f"{LM}/{{order}}gram/words.txt",
        grammar=f"{LM}/{{order}}gram/G.fst",
    wildcard_constraints:
        order=r"\d",
    params:
        config=config_for("lm"),
        out=lambda w, output: os.path.dirname(output.tlg),
    threads: rule_threads("lm")
    resources:
        **rule_resources("lm"),
    log:
        f"{LOGS}/lm_graph_{{order}}.log",
    conda:
        "../../envs/lm.yaml"
    shell:
        "b2txt lm graph --config {params.config} --arpa {input.arpa} --out {params.out} 2> {log}"
