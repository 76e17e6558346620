# Thin adapter: rule fit_factors -> playpen_attribution.influence.fit_factors_stage
from playpen_attribution.influence import fit_factors_stage
from playpen_attribution.settings import FactorFit, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, fit_factors_stage, model_ref=snakemake.input.model, dataset_dir=snakemake.input.data,
          output_dir=snakemake.output[0], strategy=snakemake.wildcards.strategy,
          settings=from_params(FactorFit, snakemake.params.kronfluence))
