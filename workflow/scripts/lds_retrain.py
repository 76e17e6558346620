# Thin adapter: rule lds_retrain -> playpen_attribution.retraining.lds_retrain_stage
from playpen_attribution.retraining import lds_retrain_stage
from playpen_attribution.settings import LdsSubsets, Lora, Training, from_params
from playpen_attribution.stage import run_stage

params = snakemake.params
run_stage(snakemake, lds_retrain_stage, base_model_dir=snakemake.input.model, train_tokens_dir=snakemake.input.train,
          out_dir=snakemake.output[0], subsets=params.subsets, settings=from_params(LdsSubsets, params.lds),
          lora=from_params(Lora, params.lora), training=from_params(Training, params.training),
          max_length=params.max_length, dtype=params.dtype, base_model_source=params.base_model,
          repeat=params.repeat)
