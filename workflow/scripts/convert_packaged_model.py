# Thin adapter: rule convert_packaged_model -> playpen_attribution.model_sources.convert_packaged_model
from playpen_attribution.model_sources import convert_packaged_model
from playpen_attribution.stage import run_stage

package = snakemake.params.package
run_stage(snakemake, convert_packaged_model, package=package["name"], file=package["file"], version=package["version"],
          output_dir=snakemake.output[0])
