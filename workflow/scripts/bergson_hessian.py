# Thin adapter: rule bergson_hessian -> playpen_attribution.bergson_attribution.hessian_stage
from playpen_attribution.bergson_attribution import hessian_stage
from playpen_attribution.settings import BergsonHessian, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, hessian_stage, model_dir=snakemake.input.model, tokens_dir=snakemake.input.tokens,
          out_dir=snakemake.output[0], settings=from_params(BergsonHessian, snakemake.params.bergson),
          normalize=getattr(snakemake.params, "normalize", "raw"))
