# Thin adapter: rule bergson_scores -> playpen_attribution.bergson_attribution.score_shard_stage
from playpen_attribution.bergson_attribution import score_shard_stage
from playpen_attribution.settings import BergsonScoring, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, score_shard_stage, index_dir=snakemake.input.index, query_tokens_dir=snakemake.input.query,
          reduced_dir=snakemake.input.reduced, query_gradients_dir=snakemake.input.per_query,
          hessian_dir=snakemake.input.hessian[0] if snakemake.input.hessian else None, out_path=snakemake.output[0],
          variant=snakemake.wildcards.variant, settings=from_params(BergsonScoring, snakemake.params.bergson))
