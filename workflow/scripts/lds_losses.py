# Thin adapter: rule lds_losses -> playpen_attribution.validation.lds_losses_stage
from playpen_attribution.stage import run_stage
from playpen_attribution.validation import lds_losses_stage

run_stage(snakemake, lds_losses_stage, retrain_dirs=list(snakemake.input.retrains),
          query_tokens_dir=snakemake.input.query, out_json=snakemake.output[0], dtype=snakemake.params.dtype)
