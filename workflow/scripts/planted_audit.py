# Thin adapter: rule planted_audit -> playpen_attribution.validation.planted_audit_stage
from playpen_attribution.stage import run_stage
from playpen_attribution.validation import planted_audit_stage

shards = {method: [snakemake.input[f"planted_{method}"]] for method in snakemake.params.methods}
run_stage(snakemake, planted_audit_stage, query_csv=snakemake.input.query, train_csv=snakemake.input.train,
          influences_csv=snakemake.input.influences, copies_dir=snakemake.input.copies, shards_by_method=shards,
          out_csv=snakemake.output.planted, out_summary=snakemake.output.summary,
          random_seed=snakemake.params.seed, train_scores_csv=snakemake.input.get("train_scores"))
