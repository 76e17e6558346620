# Thin adapter: rule train_adapter -> playpen_attribution.training.train_adapter
from playpen_attribution.settings import Lora, Training, from_params
from playpen_attribution.stage import run_stage
from playpen_attribution.training import train_adapter

params = snakemake.params
run_stage(snakemake, train_adapter, base_model_dir=snakemake.input.model, train_tokens_dir=snakemake.input.train,
          output_dir=snakemake.output[0], lora=from_params(Lora, params.lora),
          training=from_params(Training, params.training), max_length=params.max_length, dtype=params.dtype,
          base_model_source=params.base_model, eval_tokens_dir=snakemake.input.get("eval"),
          save_optimizer_state=True, keep_epochs=True)
