# Influence functions with Kronfluence: factors fitted once per model and data, then pairwise scores of
# every query against contiguous shards of the training rows, merged into the seed's three CSVs. Each rule serves
# every ensemble member (attribution.ensemble), as Bergson's do: {member_dir} is "" for the run's own adapter,
# "ensemble/member-k/" for member k >= 1, each with its own factors and scores; the merges read the members' mean
# (rule ensemble_mean_scores).

rule fit_factors:
    input:
        model="results/{run}/{member_dir}adapter",
        data=hessian_dataset,
    output:
        directory("results/{run}/{member_dir}kronfluence/factors/{strategy}"),
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
    params:
        kronfluence=stage_settings(FactorFit),
        code=script_code("fit_factors.py"),
    log:
        "logs/{run}/{member_dir}fit_factors_{strategy}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}fit_factors_{strategy}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("fit_factors"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/fit_factors.py"


rule kronfluence_scores:
    input:
        model="results/{run}/{member_dir}adapter",
        factors="results/{run}/{member_dir}kronfluence/factors/{strategy}",
        query="results/{run}/data/tokens/query",
        train="results/{run}/data/tokens/train",
    output:
        "results/{run}/{member_dir}kronfluence/scores/{strategy}/shard-{shard}.npz",
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
        shard=r"\d+",
    params:
        shards=shard_count,
        kronfluence=stage_settings(KronfluenceScoring),
        code=script_code("kronfluence_scores.py"),
    log:
        "logs/{run}/{member_dir}kronfluence_scores_{strategy}_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}kronfluence_scores_{strategy}_{shard}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("kronfluence_scores"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/kronfluence_scores.py"
