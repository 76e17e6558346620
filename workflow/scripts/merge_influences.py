# Thin adapter: rule merge_influences -> playpen_attribution.influence.merge_stage
from playpen_attribution.influence import merge_stage
from playpen_attribution.stage import run_stage

shards = {method: list(snakemake.input[f"shards_{method}"]) for method in snakemake.params.methods}
run_stage(snakemake, merge_stage, query_rows=snakemake.input.query_rows, train_rows=snakemake.input.train_rows,
          query_tokens_dir=snakemake.input.query_tokens, train_tokens_dir=snakemake.input.train_tokens,
          model_dir=snakemake.input.model, shards_by_method=shards, out_query=snakemake.output.query,
          out_train=snakemake.output.train, out_influences=snakemake.output.influences,
          dtype=snakemake.params.dtype)
