# Thin adapter: rule report -> playpen_attribution.report.build_report
from pathlib import Path

from playpen_attribution.report import build_report
from playpen_attribution.stage import run_stage

run_stage(snakemake, build_report, query_csv=snakemake.input.query, train_csv=snakemake.input.train,
          influences_csv=snakemake.input.influences, out_dir=Path(snakemake.output.page).parent,
          train_scores_csv=snakemake.input.get("train_scores"), train_tokens_dir=snakemake.input.train_tokens,
          tokenizer_file=Path(snakemake.input.model) / "tokenizer.json", top_k=snakemake.params.top_k,
          queries_shown=snakemake.params.queries_shown, words_k=snakemake.params.words_k, title=snakemake.params.title,
          planted_summary_csv=snakemake.input.get("planted"), lds_csv=snakemake.input.get("lds"),
          damping_csv=snakemake.input.get("damping"), damping_png=snakemake.input.get("damping_plot"),
          removal_csv=snakemake.input.get("removal"), removal_png=snakemake.input.get("removal_plot"),
          adapter_manifest=Path(snakemake.input.model) / "manifest.json", ensemble=snakemake.params.ensemble,
          training_seed=snakemake.params.training_seed, checkpoints=snakemake.params.checkpoints,
          epochs=snakemake.params.epochs, scoring_training=snakemake.params.scoring_training)
