# Thin adapter: rule kronfluence_scores -> playpen_attribution.influence.score_shard_stage
from playpen_attribution.influence import score_shard_stage
from playpen_attribution.settings import KronfluenceScoring, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, score_shard_stage, model_dir=snakemake.input.model, factors_dir=snakemake.input.factors,
          query_tokens_dir=snakemake.input.query, train_tokens_dir=snakemake.input.train,
          out_path=snakemake.output[0], shard=int(snakemake.wildcards.shard), shards=snakemake.params.shards,
          settings=from_params(KronfluenceScoring, snakemake.params.kronfluence))
