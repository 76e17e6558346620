# Thin adapter: rule tokenize -> playpen_attribution.tokenization.tokenize_table
from playpen_attribution.settings import Tokenization, from_params
from playpen_attribution.stage import run_stage
from playpen_attribution.tokenization import tokenize_table

settings = from_params(Tokenization, snakemake.params.tokenization)
run_stage(snakemake, tokenize_table, rows_path=snakemake.input.rows, model_dir=snakemake.input.model,
          output_dir=snakemake.output[0], max_length=settings.max_length, mode=settings.render,
          loss_on=settings.loss_on)
