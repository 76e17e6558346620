# Thin adapter: rule tokenize -> playpen_attribution.tokenization.tokenize_table
from playpen_attribution.stage import run_stage
from playpen_attribution.tokenization import tokenize_table

cfg = snakemake.params.tokenization
run_stage(snakemake, tokenize_table, rows_path=snakemake.input.rows, model_dir=snakemake.input.model,
          output_dir=snakemake.output[0], max_length=cfg["max_length"], mode=cfg["render"], loss_on=cfg["loss_on"])
