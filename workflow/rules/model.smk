# Model stage: the base model (tiny random Gemma 3 for the demo, a random model of a published architecture, a pinned
# hub download, or a model shipped in an installed package; playpen_attribution.model_sources) and LoRA SFT.


localrules:
    fetch_base_model,
    checkpoint_adapter,


rule build_tiny_model:
    input:
        data_source_files,
    output:
        directory("results/{run}/base_model"),
    wildcard_constraints:
        run=TINY_MODEL_RUNS,
    params:
        tiny=lambda wc: run_cfg(wc)["model"]["tiny"],
        source=lambda wc: data_config(wc)["source"],
        code=script_code("build_tiny_model.py"),
    log:
        "logs/{run}/build_tiny_model.log",
    benchmark:
        "benchmarks/{run}/build_tiny_model.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/build_tiny_model.py"


rule build_random_model:
    input:
        data_source_files,
        architecture=lambda wc: random_model_settings(wc)["architecture"],
    output:
        directory("results/{run}/base_model"),
    wildcard_constraints:
        run=RANDOM_MODEL_RUNS,
    params:
        random=random_model_settings,
        source=lambda wc: data_config(wc)["source"],
        code=script_code("build_random_model.py"),
    log:
        "logs/{run}/build_random_model.log",
    benchmark:
        "benchmarks/{run}/build_random_model.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/build_random_model.py"


rule fetch_base_model:
    output:
        directory("results/{run}/base_model"),
    wildcard_constraints:
        run=HUB_MODEL_RUNS,
    params:
        model=lambda wc: run_cfg(wc)["model"],
        code=script_code("fetch_base_model.py"),
    log:
        "logs/{run}/fetch_base_model.log",
    benchmark:
        "benchmarks/{run}/fetch_base_model.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_base_model.py"


rule convert_packaged_model:
    output:
        directory("results/{run}/base_model"),
    wildcard_constraints:
        run=PACKAGE_MODEL_RUNS,
    params:
        package=lambda wc: run_cfg(wc)["model"]["package"],
        code=script_code("convert_packaged_model.py"),
    log:
        "logs/{run}/convert_packaged_model.log",
    benchmark:
        "benchmarks/{run}/convert_packaged_model.tsv"
    resources:
        # the dequantized model twice (as loaded, and the fresh copy that is saved), float32
        mem_mb=4000,
    conda:
        CONDA_ENV
    script:
        "../scripts/convert_packaged_model.py"


rule train_adapter:
    input:
        unpack(eval_tokens_input),
        model=base_model_dir,
        # no query tokens: a new query set must never retrain (query.csv has the queries' losses); the eval rows have
        # their own setting (data.splits.eval), which no query selection changes
        train="results/{run}/data/tokens/train",
    output:
        directory("results/{run}/adapter"),
    params:
        lora=stage_settings(Lora),
        training=stage_settings(Training),
        max_length=lambda wc: run_cfg(wc)["tokenization"]["max_length"],
        dtype=lambda wc: run_cfg(wc)["model"]["dtype"],
        base_model=base_model_source,
        code=script_code("train_adapter.py"),
    log:
        "logs/{run}/train_adapter.log",
    benchmark:
        "benchmarks/{run}/train_adapter.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=train_mem("train_adapter"),
        runtime=train_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/train_adapter.py"


# Ensemble member k >= 1 (attribution.ensemble): the run's training on every training row with seed training.seed + k.
use rule train_adapter as train_ensemble_member with:
    output:
        directory("results/{run}/ensemble/member-{member}/adapter"),
    wildcard_constraints:
        member=r"[1-9]\d*",
    params:
        lora=stage_settings(Lora),
        training=member_training,
        max_length=lambda wc: run_cfg(wc)["tokenization"]["max_length"],
        dtype=lambda wc: run_cfg(wc)["model"]["dtype"],
        base_model=base_model_source,
        code=script_code("train_adapter.py"),
    log:
        "logs/{run}/train_ensemble_member_{member}.log",
    benchmark:
        "benchmarks/{run}/train_ensemble_member_{member}.tsv"
    resources:
        gpu=1,
        mem_mb=train_mem("train_ensemble_member"),
        runtime=train_runtime,


# A scored adapter with a schedule of its own (attribution.scoring_training, a proxy model): the run's training on every
# training row with that schedule's keys, member k's seed in member k's folder; the scoring rules read it from
# results/<run>/scoring/<member folder>adapter like any adapter.
use rule train_adapter as train_scoring_adapter with:
    output:
        directory("results/{run}/scoring/{own_dir}adapter"),
    wildcard_constraints:
        own_dir=MEMBER_FOLDER_PATTERN,
    params:
        lora=stage_settings(Lora),
        training=scoring_adapter_training,
        max_length=lambda wc: run_cfg(wc)["tokenization"]["max_length"],
        dtype=lambda wc: run_cfg(wc)["model"]["dtype"],
        base_model=base_model_source,
        code=script_code("train_adapter.py"),
    log:
        "logs/{run}/scoring/{own_dir}train_scoring_adapter.log",
    benchmark:
        "benchmarks/{run}/scoring/{own_dir}train_scoring_adapter.tsv"
    resources:
        gpu=1,
        mem_mb=train_mem("train_scoring_adapter"),
        runtime=train_runtime,


# An adapter as it was after an earlier epoch (attribution.checkpoints), out of the folder its training kept it in:
# the scoring rules read it from results/<run>/<member folder>checkpoint-<epoch>/adapter like any adapter.
rule checkpoint_adapter:
    input:
        "results/{run}/{own_dir}adapter",
    output:
        directory("results/{run}/{own_dir}checkpoint-{epoch}/adapter"),
    wildcard_constraints:
        own_dir=ENSEMBLE_DIR_PATTERN,
        epoch=r"[1-9]\d*",
    params:
        code=script_code("checkpoint_adapter.py"),
    log:
        "logs/{run}/{own_dir}checkpoint_adapter_{epoch}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/checkpoint_adapter.py"
