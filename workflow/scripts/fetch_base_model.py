# Thin adapter: rule fetch_base_model -> playpen_attribution.model_sources.fetch_base_model
from playpen_attribution.model_sources import fetch_base_model
from playpen_attribution.stage import run_stage

model = snakemake.params.model
run_stage(snakemake, fetch_base_model, hub_id=model["hub"], revision=model["revision"],
          output_dir=snakemake.output[0])
