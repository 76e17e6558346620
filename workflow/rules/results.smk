# The user-facing tables: every method's shards merged into the if-query tools' three CSVs, and Bergson's
# reduced-query scores into one ranked score per training row and variant.


# The queries' losses need the model: a GPU rule of their own, so the merges below only read tables.
rule query_losses:
    input:
        model="results/{run}/adapter",
        query="results/{run}/data/tokens/query",
    output:
        "results/{run}/query_losses.json",
    params:
        dtype=lambda wc: kronfluence_cfg(wc)["dtype"],
        code=script_code("query_losses.py"),
    log:
        "logs/{run}/query_losses.log",
    benchmark:
        "benchmarks/{run}/query_losses.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("query_losses"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/query_losses.py"


# An ensemble (attribution.ensemble): the members' score shards (the run's own and each member's) averaged into the
# one the merges read, for every method but TRAK (which averages in its own job). A table job.
rule ensemble_mean_scores:
    input:
        ensemble_member_scores,
    output:
        "results/{run}/ensemble/mean/{path}",
    wildcard_constraints:
        path=MEMBER_SHARD_PATTERN,
    params:
        code=script_code("ensemble_mean_scores.py"),
    log:
        "logs/{run}/ensemble_mean_scores/{path}.log",
    benchmark:
        "benchmarks/{run}/ensemble_mean_scores/{path}.tsv"
    resources:
        # the plan's sum and one member's per-token scores, at least resources.table_mem_mb
        mem_mb=planned_mem_mb("ensemble_mean_scores", lambda run: run["resources"]["table_mem_mb"]),
    conda:
        CONDA_ENV
    script:
        "../scripts/ensemble_mean_scores.py"


rule merge_influences:
    input:
        unpack(lambda wc: {f"shards_{m}": paths for m, paths in method_shards(wc).items()}),
        query_rows="results/{run}/data/query.parquet",
        train_rows="results/{run}/data/train.parquet",
        query_tokens="results/{run}/data/tokens/query",
        train_tokens="results/{run}/data/tokens/train",
        query_losses="results/{run}/query_losses.json",
    output:
        query="results/{run}/query.csv",
        train="results/{run}/train.csv",
        influences="results/{run}/influences.csv",
    params:
        methods=lambda wc: run_cfg(wc)["attribution"]["methods"],
        code=script_code("merge_influences.py"),
    log:
        "logs/{run}/merge_influences.log",
    benchmark:
        "benchmarks/{run}/merge_influences.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/merge_influences.py"


rule merge_train_scores:
    input:
        unpack(lambda wc: {f"shards_{m}": paths for m, paths in method_shards(wc, bergson_only=True).items()}),
        train_rows="results/{run}/data/train.parquet",
        train_tokens="results/{run}/data/tokens/train",
    output:
        scores="results/{run}/train_scores.csv",
        report="results/{run}/train_scores.report.json",
    params:
        methods=lambda wc: list(method_shards(wc, bergson_only=True)),
        code=script_code("merge_train_scores.py"),
    log:
        "logs/{run}/merge_train_scores.log",
    benchmark:
        "benchmarks/{run}/merge_train_scores.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/merge_train_scores.py"
