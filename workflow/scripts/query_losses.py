# Thin adapter: rule query_losses -> playpen_attribution.scores.query_losses_stage
from playpen_attribution.scores import query_losses_stage
from playpen_attribution.stage import run_stage

run_stage(snakemake, query_losses_stage, model_dir=snakemake.input.model, query_tokens_dir=snakemake.input.query,
          out_json=snakemake.output[0], dtype=snakemake.params.dtype)
