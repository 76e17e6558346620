# Thin adapter: rule planted_copies -> playpen_attribution.validation.plant_copies_stage
from playpen_attribution.settings import PlantedCopies, from_params
from playpen_attribution.stage import run_stage
from playpen_attribution.validation import plant_copies_stage

run_stage(snakemake, plant_copies_stage, query_tokens_dir=snakemake.input.query, out_dir=snakemake.output[0],
          settings=from_params(PlantedCopies, snakemake.params.planted))
