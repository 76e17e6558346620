# Audits of the attribution. Planted copies: copies of some queries are scored as training rows by every method,
# through the same scoring scripts as the training rows (one shard holding only the copies), with the adapter,
# factors and preconditioners already built; nothing is retrained or refitted.


rule planted_copies:
    input:
        query="results/{run}/data/tokens/query",
    output:
        directory("results/{run}/validation/planted/tokens"),
    params:
        planted=lambda wc: run_cfg(wc)["validation"]["planted"],
        code=code_hash("validation", "io"),
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
        model="results/{run}/adapter",
        factors="results/{run}/kronfluence/factors/{strategy}",
        query="results/{run}/data/tokens/query",
        train="results/{run}/validation/planted/tokens",
    output:
        "results/{run}/validation/planted/kronfluence/{strategy}/shard-{shard}.npz",
    wildcard_constraints:
        strategy=STRATEGY_PATTERN,
        shard="0",
    params:
        shards=1,
        # per-token scores of the copies are not needed for their rank
        kronfluence=lambda wc: {
            **{k: kronfluence_cfg(wc)[k] for k in ("train_batch_size", "dtype", "damping_factor")},
            "per_token_scores": False,
        },
        code=code_hash("influence", "tables", "io"),
    log:
        "logs/{run}/planted_kronfluence_scores_{strategy}_{shard}.log",
    benchmark:
        "benchmarks/{run}/planted_kronfluence_scores_{strategy}_{shard}.tsv"


use rule bergson_scores as planted_bergson_scores with:
    input:
        model="results/{run}/adapter",
        train="results/{run}/validation/planted/tokens",
        query="results/{run}/data/tokens/query",
        reduced="results/{run}/bergson/query/{variant}",
        per_query="results/{run}/bergson/query/per_query",
        hessian=bergson_hessian,
    output:
        "results/{run}/validation/planted/bergson/{variant}/shard-{shard}.npz",
    wildcard_constraints:
        variant=VARIANT_PATTERN,
        shard="0",
    params:
        shards=1,
        bergson=lambda wc: bergson_cfg(wc),
        code=code_hash("bergson_attribution", "tables", "io"),
    log:
        "logs/{run}/planted_bergson_scores_{variant}_{shard}.log",
    benchmark:
        "benchmarks/{run}/planted_bergson_scores_{variant}_{shard}.tsv"


rule planted_audit:
    input:
        unpack(planted_shards),
        query="results/{run}/query.csv",
        train="results/{run}/train.csv",
        influences="results/{run}/influences.csv",
        copies="results/{run}/validation/planted/tokens",
        train_scores=lambda wc: report_inputs(wc).get("train_scores", []),
    output:
        planted="results/{run}/validation/planted.csv",
        summary=report("results/{run}/validation/planted_summary.csv", caption="../report/planted.rst",
                       category="Validation", labels={"run": "{run}", "what": "planted-copy recall"}),
    params:
        methods=lambda wc: run_cfg(wc)["attribution"]["methods"],
        code=code_hash("validation", "report", "tables", "io"),
    log:
        "logs/{run}/planted_audit.log",
    benchmark:
        "benchmarks/{run}/planted_audit.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/planted_audit.py"
