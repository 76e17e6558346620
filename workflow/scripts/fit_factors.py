# Thin adapter: rule fit_factors -> playpen_attribution.influence.fit_factors
from playpen_attribution.influence import fit_factors
from playpen_attribution.stage import run_stage

kf = snakemake.params.kronfluence
run_stage(snakemake, fit_factors, model_ref=snakemake.input.model, dataset_dir=snakemake.input.data,
          output_dir=snakemake.output[0], strategy=snakemake.wildcards.strategy, modules=kf["modules"],
          layer_stride=kf["layer_stride"], covariance_batch_size=kf["covariance_batch_size"],
          lambda_batch_size=kf["lambda_batch_size"], max_examples=kf["max_examples"], dtype=kf["dtype"],
          fisher=kf["fisher"], seed=kf["seed"])
