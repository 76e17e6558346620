# Thin adapter: rule bergson_trak -> playpen_attribution.bergson_attribution.trak_stage
from playpen_attribution.bergson_attribution import trak_stage
from playpen_attribution.settings import BergsonTrak, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, trak_stage, model_dirs=list(snakemake.input.models), train_tokens_dir=snakemake.input.train,
          query_tokens_dir=snakemake.input.query, out_dir=snakemake.output[0],
          settings=from_params(BergsonTrak, snakemake.params.bergson), aggregation=snakemake.params.aggregation,
          planted_tokens_dir=snakemake.input.get("planted"))
