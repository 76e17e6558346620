# Audits of the attribution. Planted copies: copies of some queries are scored as training rows by every method,
# through the same scoring scripts as the training rows (one shard holding only the copies), with the adapter,
# factors and preconditioners already built; nothing is retrained or refitted.


rule planted_copies:
    input:
        query="results/{run}/data/tokens/query",
    output:
        directory("results/{run}/validation/planted/tokens"),
    params:
        planted=stage_settings(PlantedCopies),
        code=script_code("planted_copies.py"),
    log:
        "logs/{run}/planted_copies.log",
    benchmark:
        "benchmarks/{run}/planted_copies.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/planted_copies.py"


use rule kronfluence_scores as planted_kronfluence_scores with:
    input:
        model="results/{run}/{member_dir}adapter",
        factors="results/{run}/{member_dir}kronfluence/factors/{strategy}",
        query="results/{run}/data/tokens/query",
        train="results/{run}/validation/planted/tokens",
    output:
        "results/{run}/{member_dir}validation/planted/kronfluence/{strategy}/shard-{shard}.npz",
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
        shard="0",
    params:
        shards=1,
        # per-token scores of the copies are not needed for their rank
        kronfluence=stage_settings(KronfluenceScoring, per_token_scores=False),
        code=script_code("kronfluence_scores.py"),
    log:
        "logs/{run}/{member_dir}planted_kronfluence_scores_{strategy}_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}planted_kronfluence_scores_{strategy}_{shard}.tsv"
    # the plan's own figure for the copies' job (no per-token scores), as the removed member copy of this rule asked
    resources:
        gpu=1,
        mem_mb=score_mem("planted_kronfluence_scores"),
        runtime=attribution_runtime,


use rule bergson_index as planted_bergson_index with:
    input:
        model="results/{run}/{member_dir}adapter",
        train="results/{run}/validation/planted/tokens",
    output:
        directory("results/{run}/{member_dir}validation/planted/bergson/index/shard-{shard}"),
    wildcard_constraints:
        shard="0",
    params:
        shards=1,
        bergson=stage_settings(BergsonGradients),
        code=script_code("bergson_index.py"),
    log:
        "logs/{run}/{member_dir}planted_bergson_index_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}planted_bergson_index_{shard}.tsv"


use rule bergson_adam_index as planted_bergson_adam_index with:
    input:
        model="results/{run}/{member_dir}adapter",
        train="results/{run}/validation/planted/tokens",
    output:
        directory("results/{run}/{member_dir}validation/planted/bergson/adam/index/shard-{shard}"),
    wildcard_constraints:
        shard="0",
    params:
        shards=1,
        bergson=stage_settings(BergsonGradients),
        normalize="adam",
        code=script_code("bergson_index.py"),
    log:
        "logs/{run}/{member_dir}planted_bergson_adam_index_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}planted_bergson_adam_index_{shard}.tsv"


use rule bergson_scores as planted_bergson_scores with:
    input:
        index=planted_shard_index,
        query="results/{run}/data/tokens/query",
        reduced="results/{run}/{member_dir}bergson/query/{variant}",
        per_query=bergson_per_query,
        hessian=bergson_hessian,
    output:
        "results/{run}/{member_dir}validation/planted/bergson/{variant}/shard-{shard}.npz",
    wildcard_constraints:
        variant=VARIANT_PATTERN,
        shard="0",
    params:
        bergson=variant_settings(BergsonScoring),
        code=script_code("bergson_scores.py"),
    log:
        "logs/{run}/{member_dir}planted_bergson_scores_{variant}_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}planted_bergson_scores_{variant}_{shard}.tsv"


# TRAK scored the copies in its one job (rule bergson_trak): its planted shard is a slice of that.
rule planted_bergson_trak:
    input:
        "results/{run}/bergson/trak",
    output:
        "results/{run}/validation/planted/bergson/trak/shard-0.npz",
    params:
        code=script_code("bergson_trak_shard.py"),
    log:
        "logs/{run}/planted_bergson_trak.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_trak_shard.py"


rule planted_audit:
    input:
        unpack(planted_shards),
        unpack(train_scores_input),
        query="results/{run}/query.csv",
        train="results/{run}/train.csv",
        influences="results/{run}/influences.csv",
        copies="results/{run}/validation/planted/tokens",
    output:
        planted="results/{run}/validation/planted.csv",
        summary=report("results/{run}/validation/planted_summary.csv", caption="../report/planted.rst",
                       category="Validation", labels={"run": "{run}", "what": "planted-copy recall"}),
    params:
        methods=lambda wc: run_cfg(wc)["attribution"]["methods"],
        # the random baseline's seed
        seed=lambda wc: run_cfg(wc)["validation"]["planted"]["seed"],
        code=script_code("planted_audit.py"),
    log:
        "logs/{run}/planted_audit.log",
    benchmark:
        "benchmarks/{run}/planted_audit.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/planted_audit.py"


# LDS: retrain on random subsets (one job per `subsets_per_job` subsets and repeat), every query's loss under each
# retrain (averaged over the repeats), then the Spearman correlation over subsets between predicted and actual
# effects, per method and baseline, beside the noise ceiling the repeats allow.
rule lds_retrain:
    input:
        model=base_model_dir,
        train="results/{run}/data/tokens/train",
    output:
        directory("results/{run}/validation/lds/repeat-{repeat}/retrain-{batch}"),
    wildcard_constraints:
        batch=r"\d+",
        repeat=r"\d+",
    params:
        # only this job's subsets and repeat: adding subsets or repeats never retrains the earlier ones
        subsets=lds_batch_subsets,
        # trains with training.seed + repeat
        repeat=lambda wc: int(wc.repeat),
        lds=stage_settings(LdsSubsets),
        lora=stage_settings(Lora),
        # the retrains are not evaluated (Training has no `evaluate`): only their query losses count
        training=stage_settings(Training),
        max_length=lambda wc: run_cfg(wc)["tokenization"]["max_length"],
        dtype=lambda wc: run_cfg(wc)["model"]["dtype"],
        base_model=base_model_source,
        code=script_code("lds_retrain.py"),
    log:
        "logs/{run}/lds_retrain_{repeat}_{batch}.log",
    benchmark:
        "benchmarks/{run}/lds_retrain_{repeat}_{batch}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=train_mem("lds_retrain"),
        runtime=lambda wc, attempt: capped_runtime(
            wc, run_cfg(wc)["resources"]["train_runtime_min"] * len(lds_batch_subsets(wc)) * attempt
        ),
    conda:
        CONDA_ENV
    script:
        "../scripts/lds_retrain.py"


rule lds_losses:
    input:
        retrains=lds_retrain_dirs,
        query="results/{run}/data/tokens/query",
    output:
        "results/{run}/validation/lds/query_losses.json",
    params:
        dtype=lambda wc: kronfluence_cfg(wc)["dtype"],
        code=script_code("lds_losses.py"),
    log:
        "logs/{run}/lds_losses.log",
    benchmark:
        "benchmarks/{run}/lds_losses.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("lds_losses"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/lds_losses.py"


rule lds:
    input:
        unpack(train_scores_input),
        losses="results/{run}/validation/lds/query_losses.json",
        query="results/{run}/query.csv",
        train="results/{run}/train.csv",
        influences="results/{run}/influences.csv",
    output:
        lds=report("results/{run}/validation/lds.csv", caption="../report/lds.rst", category="Validation",
                   labels={"run": "{run}", "what": "linear datamodeling score"}),
        per_query="results/{run}/validation/lds_per_query.csv",
    params:
        # the random baseline's and the bootstrap's seed
        seed=lambda wc: lds_cfg(wc)["seed"],
        code=script_code("lds.py"),
    log:
        "logs/{run}/lds.log",
    benchmark:
        "benchmarks/{run}/lds.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/lds.py"


# Removal check: each selection (a method's top rows for the query set, TF-IDF's, random draws', and the reference that
# removes nothing) chooses the rows to remove at each fraction; one retraining job per selection and repeat trains
# without them and records the query losses; then the loss rise over the reference per selection and fraction.
rule removal_rows:
    input:
        unpack(removal_rows_input),
    output:
        "results/{run}/validation/removal/rows/{selection}.json",
    wildcard_constraints:
        selection=r"[A-Za-z0-9_-]+",
    params:
        removal=selection_settings(RemovalChoice),
        code=script_code("removal_rows.py"),
    log:
        "logs/{run}/removal_rows_{selection}.log",
    benchmark:
        "benchmarks/{run}/removal_rows_{selection}.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/removal_rows.py"


rule removal_retrain:
    input:
        model=base_model_dir,
        train="results/{run}/data/tokens/train",
        query="results/{run}/data/tokens/query",
        rows="results/{run}/validation/removal/rows/{selection}.json",
    output:
        "results/{run}/validation/removal/losses/{selection}/repeat-{repeat}.json",
    wildcard_constraints:
        selection=r"[A-Za-z0-9_-]+",
        repeat=r"\d+",
    params:
        selection=lambda wc: wc.selection,
        # trains with training.seed + repeat
        repeat=lambda wc: int(wc.repeat),
        lora=stage_settings(Lora),
        training=stage_settings(Training),
        max_length=lambda wc: run_cfg(wc)["tokenization"]["max_length"],
        dtype=lambda wc: run_cfg(wc)["model"]["dtype"],
        # the query losses load the adapter as lds_losses does
        loss_dtype=lambda wc: kronfluence_cfg(wc)["dtype"],
        base_model=base_model_source,
        code=script_code("removal_retrain.py"),
    log:
        "logs/{run}/removal_retrain_{selection}_{repeat}.log",
    benchmark:
        "benchmarks/{run}/removal_retrain_{selection}_{repeat}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=train_mem("removal_retrain"),
        runtime=lambda wc, attempt: capped_runtime(
            wc, run_cfg(wc)["resources"]["train_runtime_min"] * max(1, len(removal_cfg(wc)["fractions"])) * attempt
        ),
    conda:
        CONDA_ENV
    script:
        "../scripts/removal_retrain.py"


rule removal:
    input:
        unpack(removal_inputs),
    output:
        table=report("results/{run}/validation/removal.csv", caption="../report/removal.rst", category="Validation",
                     labels={"run": "{run}", "what": "removal check"}),
        plot=report("results/{run}/validation/removal.png", caption="../report/removal.rst", category="Validation",
                    labels={"run": "{run}", "what": "removal check plot"}),
    params:
        # the intervals' bootstrap
        seed=lambda wc: removal_cfg(wc)["seed"],
        code=script_code("removal.py"),
    log:
        "logs/{run}/removal.log",
    benchmark:
        "benchmarks/{run}/removal.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/removal.py"


# Damping sweep: each preconditioned method rescored at relative damping factors c (1/(lambda + c mean lambda) for
# both families) with the run's adapter, factors, preconditioners and Bergson index (nothing refitted or retrained),
# the training rows and planted copies together; then its LDS and planted recall against c. In an ensemble every
# member rescores with its own and the table reads the members' mean (rule ensemble_mean_scores), as lds.csv does.
rule damping_sweep_kronfluence:
    input:
        model="results/{run}/{member_dir}adapter",
        factors="results/{run}/{member_dir}kronfluence/factors/{strategy}",
        query="results/{run}/data/tokens/query",
        train="results/{run}/data/tokens/train",
        copies=sweep_copies,
    output:
        "results/{run}/{member_dir}validation/damping/kronfluence/{strategy}.npz",
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
    params:
        damping=sweep_factors,
        kronfluence=stage_settings(KronfluenceSweep),
        code=script_code("damping_sweep_kronfluence.py"),
    log:
        "logs/{run}/{member_dir}damping_sweep_kronfluence_{strategy}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}damping_sweep_kronfluence_{strategy}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("kronfluence_scores"),
        runtime=lambda wc, attempt: capped_runtime(wc, attribution_runtime(wc, attempt) * len(sweep_factors(wc))),
    conda:
        CONDA_ENV
    script:
        "../scripts/damping_sweep_kronfluence.py"


# Matrix products on stored gradients, like bergson_scores: a CPU job.
rule damping_sweep_bergson:
    input:
        index=sweep_index_dirs,
        query="results/{run}/data/tokens/query",
        per_query=bergson_per_query,
        hessian=bergson_hessian,
    output:
        "results/{run}/{member_dir}validation/damping/bergson/{variant}.npz",
    wildcard_constraints:
        variant=VARIANT_PATTERN,
    params:
        damping=sweep_factors,
        code=script_code("damping_sweep_bergson.py"),
    log:
        "logs/{run}/{member_dir}damping_sweep_bergson_{variant}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}damping_sweep_bergson_{variant}.tsv"
    resources:
        mem_mb=score_mem("bergson_scores"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/damping_sweep_bergson.py"


rule damping_sweep:
    input:
        unpack(sweep_table_inputs),
    output:
        table=report("results/{run}/validation/damping.csv", caption="../report/damping.rst", category="Validation",
                     labels={"run": "{run}", "what": "damping sweep"}),
        plot=report("results/{run}/validation/damping.png", caption="../report/damping.rst", category="Validation",
                    labels={"run": "{run}", "what": "damping sweep plot"}),
    params:
        methods=lambda wc: damping_sweep_methods(run_cfg(wc)),
        seed=lambda wc: lds_cfg(wc)["seed"],
        code=script_code("damping_sweep.py"),
    log:
        "logs/{run}/damping_sweep.log",
    benchmark:
        "benchmarks/{run}/damping_sweep.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/damping_sweep.py"
