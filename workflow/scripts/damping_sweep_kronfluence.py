# Thin adapter: rule damping_sweep_kronfluence -> playpen_attribution.influence.damping_sweep_stage
from playpen_attribution.influence import damping_sweep_stage
from playpen_attribution.settings import KronfluenceSweep, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, damping_sweep_stage, model_dir=snakemake.input.model, factors_dir=snakemake.input.factors,
          query_tokens_dir=snakemake.input.query, train_tokens_dir=snakemake.input.train,
          copies_dir=snakemake.input.copies[0] if snakemake.input.copies else None, out_path=snakemake.output[0],
          damping=snakemake.params.damping, settings=from_params(KronfluenceSweep, snakemake.params.kronfluence))
