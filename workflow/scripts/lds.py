# Thin adapter: rule lds -> playpen_attribution.validation.lds_stage
from playpen_attribution.stage import run_stage
from playpen_attribution.validation import lds_stage

run_stage(snakemake, lds_stage, query_csv=snakemake.input.query, train_csv=snakemake.input.train,
          influences_csv=snakemake.input.influences, losses_json=snakemake.input.losses,
          out_csv=snakemake.output.lds, out_per_query=snakemake.output.per_query, random_seed=snakemake.params.seed,
          train_scores_csv=snakemake.input.get("train_scores"))
