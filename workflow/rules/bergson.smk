# Bergson: the training rows' gradients collected once per contiguous shard (an index), the query set reduced to one
# gradient per variant, optional dense preconditioners, and every variant's scores computed from the index (no model):
# each row against the reduced query and against each query on its own. Every stage runs per adapter of the ensemble
# (attribution.ensemble): {member_dir} is "" for the run's own, "ensemble/member-k/" for member k >= 1; the merges
# read the mean of the members' score shards (rule ensemble_mean_scores).


rule bergson_query_gradients:
    input:
        model="results/{run}/{member_dir}adapter",
        query="results/{run}/data/tokens/query",
    output:
        directory("results/{run}/{member_dir}bergson/query/per_query"),
    params:
        bergson=stage_settings(BergsonGradients),
        code=script_code("bergson_query_gradients.py"),
    log:
        "logs/{run}/{member_dir}bergson_query_gradients.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_query_gradients.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_query_gradients"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_query_gradients.py"


rule bergson_hessian:
    input:
        model="results/{run}/{member_dir}adapter",
        tokens="results/{run}/data/tokens/{side}",
    output:
        directory("results/{run}/{member_dir}bergson/hessian/{side}"),
    wildcard_constraints:
        side="train|query",
    params:
        bergson=stage_settings(BergsonHessian),
        code=script_code("bergson_hessian.py"),
    log:
        "logs/{run}/{member_dir}bergson_hessian_{side}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_hessian_{side}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_hessian"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_hessian.py"


rule bergson_mix:
    input:
        query="results/{run}/{member_dir}bergson/hessian/query",
        train="results/{run}/{member_dir}bergson/hessian/train",
    output:
        directory("results/{run}/{member_dir}bergson/hessian/mixed"),
    params:
        bergson=stage_settings(BergsonMix),
        code=script_code("bergson_mix.py"),
    log:
        "logs/{run}/{member_dir}bergson_mix.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_mix.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_mix.py"


rule bergson_reduce:
    input:
        model="results/{run}/{member_dir}adapter",
        query="results/{run}/data/tokens/query",
        hessian=bergson_hessian,
    output:
        directory("results/{run}/{member_dir}bergson/query/{variant}"),
    wildcard_constraints:
        variant=VARIANT_PATTERN,
    params:
        bergson=variant_settings(BergsonReduce),
        # raw gradients, or TrackStar's Adam-normalised ones
        normalize=lambda wc: gradient_space(wc.variant),
        code=script_code("bergson_reduce.py"),
    log:
        "logs/{run}/{member_dir}bergson_reduce_{variant}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_reduce_{variant}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_reduce"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_reduce.py"


# The one pass over a shard's training tokens: every variant (and a new one) is scored from this index.
rule bergson_index:
    input:
        model="results/{run}/{member_dir}adapter",
        train="results/{run}/data/tokens/train",
    output:
        directory("results/{run}/{member_dir}bergson/index/shard-{shard}"),
    wildcard_constraints:
        shard=r"\d+",
    params:
        shards=shard_count,
        bergson=stage_settings(BergsonGradients),
        code=script_code("bergson_index.py"),
    log:
        "logs/{run}/{member_dir}bergson_index_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_index_{shard}.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_index"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_index.py"


# Matrix products on stored gradients: a CPU job (no model, no GPU).
rule bergson_scores:
    input:
        index=bergson_shard_index,
        query="results/{run}/data/tokens/query",
        reduced="results/{run}/{member_dir}bergson/query/{variant}",
        per_query=bergson_per_query,
        hessian=bergson_hessian,
    output:
        "results/{run}/{member_dir}bergson/scores/{variant}/shard-{shard}.npz",
    wildcard_constraints:
        variant=VARIANT_PATTERN,
        shard=r"\d+",
    params:
        bergson=variant_settings(BergsonScoring),
        code=script_code("bergson_scores.py"),
    log:
        "logs/{run}/{member_dir}bergson_scores_{variant}_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_scores_{variant}_{shard}.tsv"
    resources:
        mem_mb=score_mem("bergson_scores"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_scores.py"


# TrackStar's gradient space: the same collections of gradients divided by the square root of the adapter's Adam
# second moments (training saves them as adapter/optimizer.pt), under bergson/adam/. Only bergson_trackstar reads them.
use rule bergson_query_gradients as bergson_adam_query_gradients with:
    output:
        directory("results/{run}/{member_dir}bergson/adam/query/per_query"),
    params:
        bergson=stage_settings(BergsonGradients),
        normalize="adam",
        code=script_code("bergson_query_gradients.py"),
    log:
        "logs/{run}/{member_dir}bergson_adam_query_gradients.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_adam_query_gradients.tsv"
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_adam_query_gradients"),
        runtime=attribution_runtime,


use rule bergson_hessian as bergson_adam_hessian with:
    output:
        directory("results/{run}/{member_dir}bergson/adam/hessian/{side}"),
    params:
        bergson=stage_settings(BergsonHessian),
        normalize="adam",
        code=script_code("bergson_hessian.py"),
    log:
        "logs/{run}/{member_dir}bergson_adam_hessian_{side}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_adam_hessian_{side}.tsv"
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_adam_hessian"),
        runtime=attribution_runtime,


use rule bergson_mix as bergson_adam_mix with:
    input:
        query="results/{run}/{member_dir}bergson/adam/hessian/query",
        train="results/{run}/{member_dir}bergson/adam/hessian/train",
    output:
        directory("results/{run}/{member_dir}bergson/adam/hessian/mixed"),
    log:
        "logs/{run}/{member_dir}bergson_adam_mix.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_adam_mix.tsv"


use rule bergson_index as bergson_adam_index with:
    output:
        directory("results/{run}/{member_dir}bergson/adam/index/shard-{shard}"),
    params:
        shards=shard_count,
        bergson=stage_settings(BergsonGradients),
        normalize="adam",
        code=script_code("bergson_index.py"),
    log:
        "logs/{run}/{member_dir}bergson_adam_index_{shard}.log",
    benchmark:
        "benchmarks/{run}/{member_dir}bergson_adam_index_{shard}.tsv"
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_adam_index"),
        runtime=attribution_runtime,


# TRAK through Bergson's own pipeline (bergson.cli.trak): per ensemble member its Gram, its whitened queries and the
# scores of every training row (and planted copy), then the members' average; one job, since the Gram needs every
# training row's gradient. The shards the merges read are slices of its scores.
rule bergson_trak:
    input:
        unpack(trak_inputs),
        models=ensemble_adapters,
        query="results/{run}/data/tokens/query",
    output:
        directory("results/{run}/bergson/trak"),
    params:
        bergson=stage_settings(BergsonTrak),
        aggregation=lambda wc: run_cfg(wc)["attribution"]["bergson"]["aggregation"],
        code=script_code("bergson_trak.py"),
    log:
        "logs/{run}/bergson_trak.log",
    benchmark:
        "benchmarks/{run}/bergson_trak.tsv"
    threads: model_threads
    resources:
        gpu=1,
        mem_mb=score_mem("bergson_trak"),
        runtime=attribution_runtime,
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_trak.py"


rule bergson_trak_shard:
    input:
        "results/{run}/bergson/trak",
    output:
        "results/{run}/bergson/scores/trak/shard-{shard}.npz",
    wildcard_constraints:
        shard=r"\d+",
    params:
        shards=shard_count,
        code=script_code("bergson_trak_shard.py"),
    log:
        "logs/{run}/bergson_trak_shard_{shard}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/bergson_trak_shard.py"
