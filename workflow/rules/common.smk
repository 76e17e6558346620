# Helpers shared by every stage: the run's config section, paths resolved against the workflow root,
# and wildcard constraints that pick the rule which provides a run's base model.
import copy
import math
import os
import re
import sys
from pathlib import Path

from playpen_attribution.config import ConfigError, run_config
from playpen_attribution.methods import (
    STRATEGY_PATTERN,
    VARIANT_PATTERN,
    damping_sweep_methods,
    is_bergson,
    parse_method,
    gradient_space,
    parse_variant,
)
from playpen_attribution.data import split_config
from playpen_attribution.ensemble import (
    ENSEMBLE_DIR_PATTERN,
    MEMBER_DIR_PATTERN,
    MEMBER_FOLDER_PATTERN,
    member_of,
    member_paths,
    member_seed,
    scored_epochs,
    scoring_overrides,
)
from playpen_attribution.plan import (
    architecture_file,
    architecture_of,
    build_plan,
    check_plan,
    format_plan,
    lengths_of,
)
from playpen_attribution.provenance import script_code_hash
from playpen_attribution.retraining import lds_batches
from playpen_attribution.settings import (
    BergsonGradients,
    BergsonHessian,
    BergsonMix,
    BergsonReduce,
    BergsonScoring,
    BergsonTrak,
    FactorFit,
    KronfluenceScoring,
    KronfluenceSweep,
    LdsSubsets,
    Lora,
    PlantedCopies,
    RemovalChoice,
    Tokenization,
    Training,
    as_params,
)
from playpen_attribution.tables import check_shard_count
from playpen_attribution.tokenization import read_tokens_report

WORKFLOW_ROOT = Path(workflow.basedir)
RUNS = config["runs"]
CONDA_ENV = "../../envs/playpen-attribution.yaml"


def script_code(script):
    """For a rule's `params: code`: the hash of the package code its script (workflow/scripts/<script>) runs, so a
    change to that code reruns the rule (Snakemake tracks params, not the modules a script imports)."""
    return script_code_hash(WORKFLOW_ROOT / "workflow" / "scripts" / script)


def resolve(path):
    """A config path (relative to the workflow root) as a path relative to the working directory: `--directory`
    runs find the bundled inputs, and params, inputs and manifests hold no absolute path, so a copied or moved
    project (its results/ and .snakemake/ with it) reruns nothing. Absolute config paths stay absolute."""
    path = Path(path)
    return str(path) if path.is_absolute() else os.path.relpath(WORKFLOW_ROOT / path)


def run_names(predicate):
    """A regex matching exactly the runs for which `predicate(run_config)` holds (never-matching if none)."""
    names = [name for name, cfg in RUNS.items() if predicate(cfg)]
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


TINY_MODEL_RUNS = run_names(lambda c: "tiny" in c["model"])
RANDOM_MODEL_RUNS = run_names(lambda c: "random" in c["model"])
HUB_MODEL_RUNS = run_names(lambda c: "hub" in c["model"])
PACKAGE_MODEL_RUNS = run_names(lambda c: "package" in c["model"])
ANY_RUN = run_names(lambda c: True)


wildcard_constraints:
    run=ANY_RUN,
    # an attribution stage's adapter: "" for the run's own, "ensemble/member-k/" for member k >= 1, either followed by
    # "checkpoint-e/" for its adapter after an earlier epoch e (attribution.checkpoints)
    member_dir=MEMBER_DIR_PATTERN,


def refuse_unknown_run(wildcards):
    raise ConfigError(f"results/{wildcards.run}/{wildcards.path}: unknown run {wildcards.run!r}; the runs of the "
                      f"config are {sorted(RUNS)} (config/config.yaml, or a --configfile that adds one)")




# The runs whose jobs the DAG holds (every job's params and inputs ask run_cfg while the DAG is built): their memory
# plans are checked before the first job starts (onstart, in the Snakefile).
RUNS_IN_DAG = set()


def run_cfg(wildcards):
    RUNS_IN_DAG.add(wildcards.run)
    return run_config(config, wildcards.run)


def model_threads(wildcards):
    """CPU threads of a model-holding job (resources.threads): torch's intra-op threads, SLURM's --cpus-per-task;
    locally Snakemake lowers it to --cores, so a job that runs alone (the factor fit) uses every core it was given."""
    return run_cfg(wildcards)["resources"]["threads"]


def stage_settings(cls, **overrides):
    """A rule's params: exactly the keys its stage's settings class (playpen_attribution.settings) holds, from the
    run's config (`overrides` replace config values), so a change to any other key does not rerun it."""
    return lambda wildcards: as_params(cls.from_run(run_cfg(wildcards), **overrides))


def variant_settings(cls):
    """Settings of a Bergson variant's stage: no damping for a variant without a preconditioner."""
    return lambda wildcards: as_params(cls.for_variant(run_cfg(wildcards), wildcards.variant))


def data_config(wildcards):
    """The run's data section with local paths made absolute (a hub source is left as it is)."""
    data = copy.deepcopy(run_cfg(wildcards)["data"])
    source = data["source"]
    for key in ("path", "train", "query", "eval"):
        if key in source:
            source[key] = resolve(source[key])
    return data


def data_source_files(wildcards):
    """Local files a run's data (or one split of it) comes from; none for a hub source."""
    source = data_config(wildcards)["source"]
    if source["kind"] == "json":
        split = getattr(wildcards, "split", None)
        return [source[split]] if split else [source[key] for key in ("train", "query", "eval") if key in source]
    if "path" in source:
        return sorted(str(p) for p in Path(source["path"]).rglob("*") if p.is_file())
    return []


def base_model_dir(wildcards):
    """A local model folder from the config, else the folder a rule builds or downloads."""
    model = run_cfg(wildcards)["model"]
    if "path" in model:
        return resolve(model["path"])
    return f"results/{wildcards.run}/base_model"


def base_model_source(wildcards):
    """What the base model is, for manifests: hub id and revision, local path, or tiny config."""
    model = run_cfg(wildcards)["model"]
    if "hub" in model:
        return {"id": model["hub"], "revision": model["revision"]}
    if "path" in model:
        return {"id": resolve(model["path"]), "revision": None}
    if "random" in model:
        return {"id": "random-weights", "revision": None, "random": random_model_settings(wildcards)}
    if "package" in model:
        return {"id": f"{model['package']['name']}/{model['package']['file']}", "revision": model["package"]["version"]}
    return {"id": "tiny-random-gemma3", "revision": None, "tiny": model["tiny"]}


def eval_tokens_input(wildcards):
    """{"eval": tokens} where training evaluates (training.evaluate, and a json source names its eval rows), else {}."""
    run = run_cfg(wildcards)
    if run["training"]["evaluate"] and (run["data"]["source"]["kind"] != "json" or "eval" in run["data"]["source"]):
        return {"eval": f"results/{wildcards.run}/data/tokens/eval"}
    return {}


def random_model_settings(wildcards):
    settings = dict(run_cfg(wildcards)["model"]["random"])
    settings["architecture"] = resolve(settings["architecture"])
    return settings


# Kronfluence inputs by run.


def kronfluence_cfg(wildcards):
    return run_cfg(wildcards)["attribution"]["kronfluence"]


def hessian_dataset(wildcards):
    path = kronfluence_cfg(wildcards)["hessian_dataset"]
    return resolve(path) if path else f"results/{wildcards.run}/data/tokens/train"


# The memory plan, computed while the DAG is built (config and, once they exist, the tokenized data's lengths;
# no torch): printed once per run (twice where the data is tokenized during the run: the config's limits first, then
# the real lengths), refused before any job runs where a stage would not fit the GPU, and the source of the
# model-holding jobs' mem_mb. The memory_plan rule writes the same plan to results/<run>/plan.{txt,json}.
_PLANS = {}


def plan_inputs(wildcards):
    """The files the plan reads: the architecture where the config names one, the tokenized data's reports."""
    inputs = {f"{split}_tokens": f"results/{wildcards.run}/data/tokens/{split}" for split in ("train", "query")}
    config_file = plan_architecture_file(wildcards)
    if config_file:
        inputs["architecture"] = config_file
    return inputs


def plan_architecture_file(wildcards):
    config_file = architecture_file(run_cfg(wildcards)["model"], WORKFLOW_ROOT, Path(base_model_dir(wildcards)))
    return resolve(config_file) if config_file else None


def run_plan(wildcards, keep=True):
    """The run's plan, checked (PlanError where a stage will not fit). `keep=False` (before the first job): kept for
    the jobs' mem_mb only where it already has the tokenized data's lengths; else the plan is computed again when the
    first model-holding job is scheduled, once the data is tokenized."""
    name = wildcards.run
    if name not in _PLANS:
        run = run_cfg(wildcards)
        arch = architecture_of(run["model"], plan_architecture_file(wildcards))
        tokens = Path(f"results/{name}/data/tokens")
        lengths = lengths_of(run, tokens / "train", tokens / "query")
        plan = build_plan(run, arch, lengths, run["resources"]["gpu_mem_gb"])
        print(format_plan(plan, name), file=sys.stderr)
        check_plan(plan, run, name)
        if not keep and lengths["source"] != "tokenized data":
            return plan
        _PLANS[name] = plan
    return _PLANS[name]


def planned_mem_mb(job, configured):
    """mem_mb of a model-holding job: the plan's estimate of the job on a CPU (fp32, the whole process: an upper
    bound of a GPU job's host memory) with 20% headroom, at least the configured value; doubles per retry."""

    def mem_mb(wildcards, attempt):
        estimate = run_plan(wildcards)["cpu_jobs"][job]["total_gb"] * 1.2 * 1000
        return capped_mem(wildcards, max(int(math.ceil(estimate)), configured(run_cfg(wildcards))) * attempt)

    return mem_mb


def capped_mem(wildcards, mem_mb):
    """A memory request no larger than the nodes have (resources.max_mem_mb): a retry never asks for more."""
    cap = run_cfg(wildcards)["resources"]["max_mem_mb"]
    return min(mem_mb, cap) if cap else mem_mb


def capped_runtime(wildcards, minutes):
    """A time limit no longer than the partition allows (resources.max_runtime_min)."""
    cap = run_cfg(wildcards)["resources"]["max_runtime_min"]
    return min(minutes, cap) if cap else minutes


def train_runtime(wildcards, attempt):
    """Time limit (minutes) of the training job; grows with each retry, up to resources.max_runtime_min."""
    return capped_runtime(wildcards, run_cfg(wildcards)["resources"]["train_runtime_min"] * attempt)


def score_mem(job):
    return planned_mem_mb(job, lambda run: run["attribution"]["score_mem_mb"])


def train_mem(job):
    return planned_mem_mb(job, lambda run: run["resources"]["train_mem_mb"])


def table_mem_mb(wildcards, attempt):
    """Memory of a CPU job that reads the merged tables (merges, audits' statistics, report); grows with retries."""
    return capped_mem(wildcards, run_cfg(wildcards)["resources"]["table_mem_mb"] * attempt)


def attribution_runtime(wildcards, attempt):
    """Time limit (minutes) of a factor, gradient or score job; grows with each retry."""
    return capped_runtime(wildcards, run_cfg(wildcards)["attribution"]["score_runtime_min"] * attempt)


def shard_count(wildcards):
    """attribution.shards, refused while the DAG is built once the training rows are known to be fewer."""
    shards = run_cfg(wildcards)["attribution"]["shards"]
    tokens = f"results/{wildcards.run}/data/tokens/train"
    tokenized = read_tokens_report(tokens)
    if tokenized:
        check_shard_count(shards, tokenized["rows_tokenized"], where=f"run {wildcards.run}'s training set ({tokens})")
    return shards


def ensemble_size(wildcards):
    return run_cfg(wildcards)["attribution"]["ensemble"]


def scored_paths(wildcards, path):
    """`path` under the folder of every adapter the methods score (attribution.ensemble x attribution.checkpoints,
    under scoring/ where attribution.scoring_training is set), the run's own first."""
    return member_paths(wildcards.run, path, run_cfg(wildcards))


def ensemble_adapters(wildcards):
    """The ensemble's adapters: the run's own (member 0), then members 1..K-1, each at every scored epoch."""
    return scored_paths(wildcards, "adapter")


def ensemble_scores(wildcards, path, method):
    """A score file of `method` under results/<run>/ (`path`, e.g. kronfluence/scores/ekfac/shard-0.npz): the mean over
    the scored adapters where there is more than one (rule ensemble_mean_scores), else the one adapter's."""
    if method.is_trak:  # TRAK averages over the adapters in its own job
        return f"results/{wildcards.run}/{path}"
    paths = scored_paths(wildcards, path)
    return f"results/{wildcards.run}/ensemble/mean/{path}" if len(paths) > 1 else paths[0]


def method_shards(wildcards, bergson_only=False):
    """Every score shard of every configured method, by method."""
    shards = {}
    for method in map(parse_method, run_cfg(wildcards)["attribution"]["methods"]):
        if bergson_only and not method.is_bergson:
            continue
        scores = f"{method.family}/scores/{method.kind}"
        shards[method.name] = [ensemble_scores(wildcards, f"{scores}/shard-{i}.npz", method)
                               for i in range(shard_count(wildcards))]
    return shards


# A score shard under results/<run>/ that each member of an ensemble has and ensemble_mean_scores averages, of any
# method but TRAK, for the training rows or the planted copies; or a damping sweep's scores.
MEMBER_SHARD_PATTERN = (rf"(validation/planted/)?(kronfluence/(scores/)?({STRATEGY_PATTERN})|bergson/(scores/)?"
                        rf"({VARIANT_PATTERN}))/shard-\d+\.npz|validation/damping/(kronfluence/({STRATEGY_PATTERN})|"
                        rf"bergson/({VARIANT_PATTERN}))\.npz")


def ensemble_member_scores(wildcards):
    """The inputs of ensemble_mean_scores, the members' files it averages: the run's own, then each member's."""
    return scored_paths(wildcards, wildcards.path)


def member_training(wildcards):
    """Training settings of ensemble member k: the run's, with its seed (`ensemble.member_seed`)."""
    run = run_cfg(wildcards)
    return as_params(Training.from_run(run, seed=member_seed(run["training"]["seed"], int(wildcards.member))))


def scoring_adapter_training(wildcards):
    """Training settings of a scored adapter with a schedule of its own (attribution.scoring_training): the run's
    with that schedule's keys, and member k's seed in member k's folder (wildcard own_dir)."""
    # scoring_overrides(run_cfg(...)) spelled out: the configuration reference reads its keys from that call
    return as_params(Training.from_run(run_cfg(wildcards),
                                       **scoring_overrides(run_cfg(wildcards), member_of(wildcards.own_dir))))


# Bergson inputs by run.
def bergson_space(wildcards, area="bergson"):
    """Where a variant's gradients live under results/<run>/<member_dir><area>: `bergson` for raw gradients,
    `bergson/adam` for TrackStar's (normalised by the adapter's Adam second moments). The member's folder where the
    job scores an ensemble member's adapter (wildcard member_dir), else the run's own."""
    space = f"results/{wildcards.run}/{getattr(wildcards, 'member_dir', '')}{area}"
    return f"{space}/adam" if gradient_space(wildcards.variant) == "adam" else space


def bergson_hessian(wildcards):
    """The preconditioner folder a variant uses (in its gradient space), or none."""
    _, side = parse_variant(wildcards.variant)
    return [f"{bergson_space(wildcards)}/hessian/{side}"] if side else []


def bergson_shard_index(wildcards):
    return f"{bergson_space(wildcards)}/index/shard-{wildcards.shard}"


def bergson_per_query(wildcards):
    return f"{bergson_space(wildcards)}/query/per_query"


def planted_shard_index(wildcards):
    return f"{bergson_space(wildcards, 'validation/planted/bergson')}/index/shard-{wildcards.shard}"


# Report inputs by run.
def train_scores_input(wildcards):
    """{"train_scores": path} where the run has Bergson variants (their reduced-query scores), else {}."""
    if any(map(is_bergson, run_cfg(wildcards)["attribution"]["methods"])):
        return {"train_scores": f"results/{wildcards.run}/train_scores.csv"}
    return {}


def report_inputs(wildcards):
    inputs = {
        "query": f"results/{wildcards.run}/query.csv",
        "train": f"results/{wildcards.run}/train.csv",
        "influences": f"results/{wildcards.run}/influences.csv",
        # decoded tokens for per-token scores
        "train_tokens": f"results/{wildcards.run}/data/tokens/train",
        "model": f"results/{wildcards.run}/adapter",
        # the memory plan is part of every run's record (the page does not show it)
        "plan": f"results/{wildcards.run}/plan.json",
    }
    inputs.update(train_scores_input(wildcards))
    if planted_count(wildcards):
        inputs["planted"] = f"results/{wildcards.run}/validation/planted_summary.csv"
    if lds_cfg(wildcards)["subsets"]:
        inputs["lds"] = f"results/{wildcards.run}/validation/lds.csv"
    if removal_cfg(wildcards)["fractions"]:
        inputs["removal"] = f"results/{wildcards.run}/validation/removal.csv"
        inputs["removal_plot"] = f"results/{wildcards.run}/validation/removal.png"
    if damping_sweep_methods(run_cfg(wildcards)):
        inputs["damping"] = f"results/{wildcards.run}/validation/damping.csv"
        inputs["damping_plot"] = f"results/{wildcards.run}/validation/damping.png"
    return inputs


# Planted-copy audit inputs by run.
def planted_count(wildcards):
    return run_cfg(wildcards)["validation"]["planted"]["queries"]


def planted_shards(wildcards):
    """The copies' scores, one file per method, scored by the same stages as the training rows (and averaged over
    the ensemble as they are)."""
    return {f"planted_{m.name}": ensemble_scores(wildcards, f"{m.folder('validation/planted')}/shard-0.npz", m)
            for m in map(parse_method, run_cfg(wildcards)["attribution"]["methods"])}


def trak_inputs(wildcards):
    """Rule bergson_trak's rows: the training rows, and the planted copies where the run plants some (scored in the
    same job, with the same Gram and queries)."""
    inputs = {"train": f"results/{wildcards.run}/data/tokens/train"}
    if planted_count(wildcards):
        inputs["planted"] = f"results/{wildcards.run}/validation/planted/tokens"
    return inputs


# LDS inputs by run.
def lds_cfg(wildcards):
    return run_cfg(wildcards)["validation"]["lds"]


def lds_batch_subsets(wildcards):
    """The subset indices one retraining job trains."""
    cfg = lds_cfg(wildcards)
    return lds_batches(cfg["subsets"], cfg["subsets_per_job"])[int(wildcards.batch)]


def lds_retrain_dirs(wildcards):
    """Every retraining job's folder: each batch of subsets once per repeat (a new repeat or subset is a new job)."""
    cfg = lds_cfg(wildcards)
    return [f"results/{wildcards.run}/validation/lds/repeat-{r}/retrain-{b}" for r in range(cfg["repeats"])
            for b in range(len(lds_batches(cfg["subsets"], cfg["subsets_per_job"])))]


# Removal check inputs by run.
def removal_cfg(wildcards):
    return run_cfg(wildcards)["validation"]["removal"]


def removal_selections(wildcards):
    """What chooses the removed rows: the reference (nothing removed), TF-IDF, the random draws, every method."""
    cfg = removal_cfg(wildcards)
    return ["none", "tfidf", *(f"random-{i}" for i in range(cfg["controls"])),
            *run_cfg(wildcards)["attribution"]["methods"]]


def removal_rows_input(wildcards):
    """A method's selection reads the scores; the controls read the tables alone."""
    inputs = {"query": f"results/{wildcards.run}/query.csv", "train": f"results/{wildcards.run}/train.csv"}
    if wildcards.selection in run_cfg(wildcards)["attribution"]["methods"]:
        inputs["influences"] = f"results/{wildcards.run}/influences.csv"
        inputs.update(train_scores_input(wildcards))
    return inputs


def selection_settings(cls):
    """A removal selection's settings: the seed only for a random draw (the one selection it chooses), so a new
    seed never re-chooses, and retrains, a method's or TF-IDF's rows."""
    def params(wildcards):
        overrides = {} if wildcards.selection.startswith("random-") else {"seed": None}
        return as_params(cls.from_run(run_cfg(wildcards), **overrides))
    return params


def removal_inputs(wildcards):
    run, selections = wildcards.run, removal_selections(wildcards)
    return {"query": f"results/{run}/query.csv", "train": f"results/{run}/train.csv",
            "rows": [f"results/{run}/validation/removal/rows/{s}.json" for s in selections],
            "losses": [f"results/{run}/validation/removal/losses/{s}/repeat-{r}.json" for s in selections
                       for r in range(removal_cfg(wildcards)["repeats"])]}


# Damping sweep inputs by run.
def sweep_factors(wildcards):
    return run_cfg(wildcards)["validation"]["damping"]["factors"]


def sweep_copies(wildcards):
    """The planted copies, scored by the sweep beside the training rows where the run plants any."""
    return [f"results/{wildcards.run}/validation/planted/tokens"] if planted_count(wildcards) else []


def sweep_files(wildcards):
    """One scores file per swept method, by method: the members' mean in an ensemble."""
    return {f"sweep_{m.name}": ensemble_scores(wildcards, f"{m.folder('validation/damping')}.npz", m)
            for m in map(parse_method, damping_sweep_methods(run_cfg(wildcards)))}


def sweep_index_dirs(wildcards):
    """Every training shard's Bergson index in the variant's gradient space, then the planted copies' (the sweep's
    row order)."""
    dirs = [f"{bergson_space(wildcards)}/index/shard-{i}" for i in range(shard_count(wildcards))]
    if planted_count(wildcards):
        dirs.append(f"{bergson_space(wildcards, 'validation/planted/bergson')}/index/shard-0")
    return dirs


def sweep_table_inputs(wildcards):
    inputs = {"query": f"results/{wildcards.run}/query.csv", "train": f"results/{wildcards.run}/train.csv",
              **sweep_files(wildcards)}
    if lds_cfg(wildcards)["subsets"]:
        inputs["losses"] = f"results/{wildcards.run}/validation/lds/query_losses.json"
        inputs["lds"] = f"results/{wildcards.run}/validation/lds.csv"
    if planted_count(wildcards):
        inputs["copies"] = f"results/{wildcards.run}/validation/planted/tokens"
    return inputs
