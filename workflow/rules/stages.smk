# Every stage of the pipeline's stage table (src/b2txt/workflow.py) as a rule. `b2txt workflow dvc`
# writes the same stages into dvc.yaml, so Snakemake and DVC run the same command lines: change a
# stage there, not here. This file only adds what is Snakemake's own: the per-rule config file
# (config_for), threads and resources from config `resources:` (common.smk), logs, the conda env
# of the rule's family, localrule, and the report.
from b2txt.workflow import stages

STAGES = stages(CFG)


def _formatted(value):
    """A param holding wildcards (`results/x/lm/{order}gram`) filled in per job; a function, also
    so that `snakemake --lint` sees no hard-coded path prefixes."""
    return lambda wildcards: value.format(**wildcards)


def _output(o):
    path = directory(o.path) if o.directory else o.path
    if o.report:
        path = report(path, patterns=["{name}.png"], caption=f"../report/{o.report}", category="Results")
    return path


def _shell(stage):
    cmd = stage.argv(["--config", "{params.config}"])
    if stage.threads_flag:
        cmd += [stage.threads_flag, "{resources.cmd_threads}"]
    return " ".join(cmd) + (" > {log} 2>&1" if stage.stdout_to_log else " 2> {log}")


def _resources(stage):
    res = rule_resources(stage.family)
    if stage.threads_flag:  # the job's cores, shared by its processes (train --nproc N)
        res["cmd_threads"] = lambda wildcards, threads, n=stage.threads_per: max(1, threads // n)
    return res


def stage_rule(stage):
    """The rule of one stage. A function, so that each rule's shell command (evaluated again when
    its job runs) sees its own stage, not the loop's last one."""

    rule:
        name:
            stage.name
        input:
            **{k: i.path for k, i in stage.inputs.items()},
        output:
            **{k: _output(o) for k, o in stage.outputs.items()},
        params:
            **{k: _formatted(v) for k, v in stage.params.items()},
            **({"config": config_for(*stage.sections)} if stage.sections else {}),
        wildcard_constraints:
            **({stage.each[0]: "|".join(stage.each[1])} if stage.each else {}),
        threads: rule_threads(stage.family)
        resources:
            **_resources(stage),
        log:
            f"{LOGS}/{stage.name}" + (f"_{{{stage.each[0]}}}" if stage.each else "") + ".log",
        localrule: stage.local
        conda:
            f"../../envs/{stage.env}.yaml"
        shell:
            _shell(stage)


for stage in STAGES:
    stage_rule(stage)


def all_outputs():
    """Every output of every stage, one per value of the stages run per split or order."""
    paths = []
    for s in STAGES:
        for o in s.outputs.values():
            paths += expand(o.path, **{s.each[0]: s.each[1]}) if s.each else [o.path]
    return paths
