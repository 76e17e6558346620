# Thin adapter: rule bergson_query_gradients -> playpen_attribution.bergson_attribution.query_gradients_stage
from playpen_attribution.bergson_attribution import query_gradients_stage
from playpen_attribution.settings import BergsonGradients, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, query_gradients_stage, model_dir=snakemake.input.model, query_tokens_dir=snakemake.input.query,
          out_dir=snakemake.output[0], settings=from_params(BergsonGradients, snakemake.params.bergson),
          normalize=getattr(snakemake.params, "normalize", "raw"))
