# Thin adapter: rule bergson_mix -> playpen_attribution.bergson_attribution.mix_stage
from playpen_attribution.bergson_attribution import mix_stage
from playpen_attribution.settings import BergsonMix, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, mix_stage, query_hessian_dir=snakemake.input.query, train_hessian_dir=snakemake.input.train,
          out_dir=snakemake.output[0], settings=from_params(BergsonMix, snakemake.params.bergson))
