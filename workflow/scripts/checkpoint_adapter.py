# Thin adapter: rule checkpoint_adapter -> playpen_attribution.training.checkpoint_adapter
from playpen_attribution.stage import run_stage
from playpen_attribution.training import checkpoint_adapter

run_stage(snakemake, checkpoint_adapter, adapter_dir=snakemake.input[0], epoch=int(snakemake.wildcards.epoch),
          output_dir=snakemake.output[0])
