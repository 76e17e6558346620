# Thin adapter: rule removal -> playpen_attribution.removal.removal_stage
from playpen_attribution.removal import removal_stage
from playpen_attribution.stage import run_stage

run_stage(snakemake, removal_stage, query_csv=snakemake.input.query, train_csv=snakemake.input.train,
          rows_jsons=list(snakemake.input.rows), loss_jsons=list(snakemake.input.losses),
          out_csv=snakemake.output.table, out_png=snakemake.output.plot, seed=snakemake.params.seed)
