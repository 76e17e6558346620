# Thin adapter: rule merge_train_scores -> playpen_attribution.bergson_attribution.merge_train_scores_stage
from playpen_attribution.bergson_attribution import merge_train_scores_stage
from playpen_attribution.stage import run_stage

shards = {method: list(snakemake.input[f"shards_{method}"]) for method in snakemake.params.methods}
run_stage(snakemake, merge_train_scores_stage, train_rows=snakemake.input.train_rows,
          train_tokens_dir=snakemake.input.train_tokens, shards_by_method=shards, out_csv=snakemake.output.scores,
          out_report=snakemake.output.report)
