# Thin adapter: rule damping_sweep -> playpen_attribution.validation.damping_sweep_stage
from playpen_attribution.stage import run_stage
from playpen_attribution.validation import damping_sweep_stage

sweeps = {method: snakemake.input[f"sweep_{method}"] for method in snakemake.params.methods}
run_stage(snakemake, damping_sweep_stage, query_csv=snakemake.input.query, train_csv=snakemake.input.train,
          sweeps=sweeps, out_csv=snakemake.output.table, out_png=snakemake.output.plot, seed=snakemake.params.seed,
          losses_json=snakemake.input.get("losses"), copies_dir=snakemake.input.get("copies"),
          lds_csv=snakemake.input.get("lds"))
