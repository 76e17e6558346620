# Thin adapter: rule merge_influences -> playpen_attribution.scores.merge_influences_stage
from playpen_attribution.scores import merge_influences_stage
from playpen_attribution.stage import run_stage

shards = {method: list(snakemake.input[f"shards_{method}"]) for method in snakemake.params.methods}
run_stage(snakemake, merge_influences_stage, query_rows=snakemake.input.query_rows,
          train_rows=snakemake.input.train_rows, query_tokens_dir=snakemake.input.query_tokens,
          train_tokens_dir=snakemake.input.train_tokens, query_losses_json=snakemake.input.query_losses,
          shards_by_method=shards, out_query=snakemake.output.query, out_train=snakemake.output.train,
          out_influences=snakemake.output.influences)
