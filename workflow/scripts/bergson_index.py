# Thin adapter: rule bergson_index -> playpen_attribution.bergson_attribution.index_stage
from playpen_attribution.bergson_attribution import index_stage
from playpen_attribution.settings import BergsonGradients, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, index_stage, model_dir=snakemake.input.model, train_tokens_dir=snakemake.input.train,
          out_dir=snakemake.output[0], shard=int(snakemake.wildcards.shard), shards=snakemake.params.shards,
          settings=from_params(BergsonGradients, snakemake.params.bergson),
          normalize=getattr(snakemake.params, "normalize", "raw"))
