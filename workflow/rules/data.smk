# Data stage: raw transcripts -> filtered prompt/completion tables -> the one tokenization.


# Hub downloads happen on the submit host: compute nodes are often offline.
localrules:
    prepare_data,


rule prepare_data:
    input:
        data_source_files,
    output:
        rows="results/{run}/data/{split}.parquet",
        report="results/{run}/data/{split}.report.json",
    wildcard_constraints:
        split="train|query|eval",
    params:
        # only what decides this split: a new query set never rewrites the training table, nor the eval rows that
        # training evaluates on (data.splits.eval, uncapped)
        data=lambda wc: split_config(data_config(wc), wc.split),
        code=script_code("prepare_data.py"),
    log:
        "logs/{run}/prepare_data_{split}.log",
    benchmark:
        "benchmarks/{run}/prepare_data_{split}.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/prepare_data.py"


rule tokenize:
    input:
        rows="results/{run}/data/{split}.parquet",
        model=base_model_dir,
    output:
        directory("results/{run}/data/tokens/{split}"),
    wildcard_constraints:
        split="train|query|eval",
    params:
        tokenization=stage_settings(Tokenization),
        code=script_code("tokenize.py"),
    log:
        "logs/{run}/tokenize_{split}.log",
    benchmark:
        "benchmarks/{run}/tokenize_{split}.tsv"
    conda:
        CONDA_ENV
    script:
        "../scripts/tokenize.py"
