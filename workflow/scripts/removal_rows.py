# Thin adapter: rule removal_rows -> playpen_attribution.removal.removal_rows_stage
from playpen_attribution.removal import removal_rows_stage
from playpen_attribution.settings import RemovalChoice, from_params
from playpen_attribution.stage import run_stage

run_stage(snakemake, removal_rows_stage, query_csv=snakemake.input.query, train_csv=snakemake.input.train,
          out_json=snakemake.output[0], selection=snakemake.wildcards.selection,
          settings=from_params(RemovalChoice, snakemake.params.removal),
          influences_csv=snakemake.input.get("influences"), train_scores_csv=snakemake.input.get("train_scores"))
