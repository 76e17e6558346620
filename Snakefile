# playpen-attribution: from playpen transcripts to a LoRA adapter and influence scores.
# Usage: snakemake --cores 2 results/demo/influences.csv      (see README.md and config/README.md)
import os
import sys

from snakemake.utils import min_version

from playpen_attribution.config import validate_config
from playpen_attribution.locks import clear_owner, record_owner, remove_stale_locks
from playpen_attribution.plan import local_gpu_count, local_memory_mb

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config", "config.yaml")


# After a kill (SIGKILL, the OOM killer, a lost node) Snakemake's locks stay and the same command would be refused
# until --unlock: they are removed here when the process recorded as their owner (onstart) died on this host. A live
# owner keeps them, so a second invocation on the same results is still refused with Snakemake's lock message.
# Interrupted jobs' outputs are marked incomplete and rerun (rerun-incomplete in the profiles).
if (stale := remove_stale_locks()) is not None:
    print(stale, file=sys.stderr)


# Defaults filled in, unknown keys refused with their path named (a typo never trains with a default).
validate_config(config, source="the workflow config (config/config.yaml and any --configfile/--config)")


# Run here, the `gpu=1` rules share this machine's GPUs: one such job at a time where it has one (two models on one
# GPU can run out of memory; jobs do not pick a device). With no GPU they are CPU jobs, limited only by --cores.
# `--resources gpu=N` overrides; on a cluster each job gets its own GPU from the scheduler.
if workflow.local_exec and "gpu" not in workflow.global_resources and local_gpu_count():
    workflow.register_resource("gpu", 1)
# Run here, the jobs share this machine's memory: together they may ask for at most what it has (each job's mem_mb;
# the model-holding jobs' from the memory plan), so two large score jobs queue instead of being killed side by side.
# `--resources mem_mb=N` overrides.
if workflow.local_exec and "mem_mb" not in workflow.global_resources:
    workflow.register_resource("mem_mb", local_memory_mb())


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/kronfluence.smk"
include: "workflow/rules/bergson.smk"
include: "workflow/rules/results.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/validate.smk"


# A dry run shows every job's resources, so the memory plan is checked while it prints them; a real run evaluates a
# job's resources only when the job is about to start, after earlier jobs (a download, training) have run. So the
# plan of every run in the DAG is checked here, after the DAG is built and before any job starts.
onstart:
    from types import SimpleNamespace

    record_owner()  # this process holds the locks now (remove_stale_locks, above)
    for name in sorted(RUNS_IN_DAG):
        run_plan(SimpleNamespace(run=name), keep=False)


onsuccess:
    clear_owner()


onerror:
    clear_owner()


rule all:
    default_target: True
    input:
        f"results/{config['default_run']}/influences.csv",
        f"results/{config['default_run']}/report/index.html",
        # one ranked score per training row, where the run has Bergson variants
        (
            [f"results/{config['default_run']}/train_scores.csv"]
            if any(map(is_bergson, RUNS[config["default_run"]]["attribution"]["methods"]))
            else []
        ),


# A target under results/ of a run the config does not define: refused by name (Snakemake would only say that no rule
# produces the file).
rule unknown_run:
    input:
        refuse_unknown_run,
    output:
        "results/{run}/{path}",
    wildcard_constraints:
        run=f"(?!(?:{ANY_RUN})/)[^/]+",
        path=".+",
