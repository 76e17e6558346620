# Thin adapter: rule bergson_reduce -> playpen_attribution.bergson_attribution.reduce_stage
from playpen_attribution.bergson_attribution import reduce_stage
from playpen_attribution.settings import BergsonReduce, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, reduce_stage, model_dir=snakemake.input.model, query_tokens_dir=snakemake.input.query,
          out_dir=snakemake.output[0], variant=snakemake.wildcards.variant,
          hessian_dir=snakemake.input.hessian[0] if snakemake.input.hessian else None,
          settings=from_params(BergsonReduce, snakemake.params.bergson))
