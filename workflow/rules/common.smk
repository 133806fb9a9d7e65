# Shared names. The config is parsed by the package's typed config (defaults, coercion of
# `--config` strings, clear errors); each rule then hands its command a small file with the
# config sections that command reads (`config_for`), named by its content.
from b2txt.ground.config import parse_config, section_config_file
from b2txt.workflow import announce_checkout

# Where the conda envs' post-deploy script (envs/install-b2txt.sh) finds this checkout.
announce_checkout(workflow.basedir)

CFG = parse_config(config, "snakemake config")
RUN = f"results/{CFG.run}"
LOGS = f"{RUN}/logs"


def config_for(*sections):
    return section_config_file(config, ".snakemake/b2txt", *sections)


# Resources come from the config (`resources:` per rule family, config/config.yaml), never from
# literals in rules. Locally threads are capped at --cores; the slurm executor (profiles/slurm)
# turns them into sbatch options (--cpus-per-task, --mem, -t, --gpus, -p, slurm_extra).
def rule_threads(family):
    return getattr(CFG.resources, family).cpus


def rule_resources(family):
    r = getattr(CFG.resources, family)
    res = {"mem_mb": r.mem_mb, "runtime": r.runtime}
    if r.gpus:
        res["gpu"] = r.gpus
    if r.partition:
        res["slurm_partition"] = r.partition
    if r.slurm_extra:
        res["slurm_extra"] = r.slurm_extra
    return res
