# The memory plan as an artifact: the same estimate the DAG checks (see common.smk), checked against the
# architecture built on the meta device, as text and JSON. A CPU job: it needs the model's config, not its weights.


rule memory_plan:
    input:
        unpack(plan_inputs),
    output:
        txt="results/{run}/plan.txt",
        json="results/{run}/plan.json",
    params:
        run=lambda wc: {k: run_cfg(wc)[k] for k in ("model", "lora", "training", "tokenization", "attribution", "data")},
        gpu_mem_gb=lambda wc: run_cfg(wc)["resources"]["gpu_mem_gb"],
        code=script_code("memory_plan.py"),
    log:
        "logs/{run}/memory_plan.log",
    benchmark:
        "benchmarks/{run}/memory_plan.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/memory_plan.py"
