# Influence functions with Kronfluence: factors fitted once per model and data, then pairwise scores of
# every query against contiguous shards of the training rows, merged into the seed's three CSVs.

rule fit_factors:
    input:
        model="results/{run}/adapter",
        data=hessian_dataset,
    output:
        directory("results/{run}/kronfluence/factors/{strategy}"),
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
    params:
        kronfluence=stage_settings(FactorFit),
        code=script_code("fit_factors.py"),
    log:
        "logs/{run}/fit_factors_{strategy}.log",
    benchmark:
        "benchmarks/{run}/fit_factors_{strategy}.tsv"
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
        model="results/{run}/adapter",
        factors="results/{run}/kronfluence/factors/{strategy}",
        query="results/{run}/data/tokens/query",
        train="results/{run}/data/tokens/train",
    output:
        "results/{run}/kronfluence/scores/{strategy}/shard-{shard}.npz",
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
        shard=r"\d+",
    params:
        shards=shard_count,
        kronfluence=stage_settings(KronfluenceScoring),
        code=script_code("kronfluence_scores.py"),
    log:
        "logs/{run}/kronfluence_scores_{strategy}_{shard}.log",
    benchmark:
        "benchmarks/{run}/kronfluence_scores_{strategy}_{shard}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("kronfluence_scores"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/kronfluence_scores.py"


# Ensemble members k >= 1 (attribution.ensemble): each member's own factors and scores, under ensemble/member-k/; the
# merges read their mean (rule ensemble_mean_scores).
use rule fit_factors as member_fit_factors with:
    input:
        model="results/{run}/ensemble/member-{member}/adapter",
        data=hessian_dataset,
    output:
        directory("results/{run}/ensemble/member-{member}/kronfluence/factors/{strategy}"),
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
        member=r"[1-9]\d*",
    log:
        "logs/{run}/member_fit_factors_{member}_{strategy}.log",
    benchmark:
        "benchmarks/{run}/member_fit_factors_{member}_{strategy}.tsv"
    resources:
        gpu=1,
        mem_mb=score_mem("fit_factors"),
        runtime=attribution_runtime,


use rule kronfluence_scores as member_kronfluence_scores with:
    input:
        model="results/{run}/ensemble/member-{member}/adapter",
        factors="results/{run}/ensemble/member-{member}/kronfluence/factors/{strategy}",
        query="results/{run}/data/tokens/query",
        train="results/{run}/data/tokens/train",
    output:
        "results/{run}/ensemble/member-{member}/kronfluence/scores/{strategy}/shard-{shard}.npz",
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
        shard=r"\d+",
        member=r"[1-9]\d*",
    log:
        "logs/{run}/member_kronfluence_scores_{member}_{strategy}_{shard}.log",
    benchmark:
        "benchmarks/{run}/member_kronfluence_scores_{member}_{strategy}_{shard}.tsv"
    resources:
        gpu=1,
        mem_mb=score_mem("kronfluence_scores"),
        runtime=attribution_runtime,
