# Thin adapter: rule kronfluence_scores -> playpen_attribution.influence.score_shard_stage
from playpen_attribution.influence import score_shard_stage
from playpen_attribution.stage import run_stage

kf = snakemake.params.kronfluence
run_stage(snakemake, score_shard_stage, model_dir=snakemake.input.model, factors_dir=snakemake.input.factors,
          query_tokens_dir=snakemake.input.query, train_tokens_dir=snakemake.input.train,
          out_path=snakemake.output[0], shard=int(snakemake.wildcards.shard), shards=snakemake.params.shards,
          train_batch_size=kf["train_batch_size"], query_batch_size=kf["query_batch_size"],
          query_gradient_rank=kf["query_gradient_rank"], per_token=kf["per_token_scores"],
          per_token_max_gb=kf["per_token_max_gb"], dtype=kf["dtype"], damping_factor=kf["damping_factor"])
