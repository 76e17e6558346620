# Thin adapter: rule memory_plan -> playpen_attribution.plan.plan_stage
from playpen_attribution.plan import architecture_of, lengths_of, plan_stage
from playpen_attribution.stage import run_stage

run, inputs = snakemake.params.run, snakemake.input
arch = architecture_of(run["model"], inputs.get("architecture"))
lengths = lengths_of(run, inputs.train_tokens, inputs.query_tokens)
run_stage(snakemake, plan_stage, run=run, run_name=snakemake.wildcards.run, arch=arch, lengths=lengths,
          gpu_mem_gb=snakemake.params.gpu_mem_gb, out_txt=snakemake.output.txt, out_json=snakemake.output.json)
