# Thin adapter: rule removal_retrain -> playpen_attribution.removal.removal_retrain_stage
from playpen_attribution.removal import removal_retrain_stage
from playpen_attribution.settings import Lora, Training, from_params
from playpen_attribution.stage import run_stage

params = snakemake.params
run_stage(snakemake, removal_retrain_stage, base_model_dir=snakemake.input.model,
          train_tokens_dir=snakemake.input.train, query_tokens_dir=snakemake.input.query, rows_json=snakemake.input.rows,
          out_json=snakemake.output[0], selection=params.selection, repeat=params.repeat,
          lora=from_params(Lora, params.lora), training=from_params(Training, params.training),
          max_length=params.max_length, dtype=params.dtype, loss_dtype=params.loss_dtype,
          base_model_source=params.base_model)
