# Thin adapter: rule damping_sweep_bergson -> playpen_attribution.bergson_attribution.damping_sweep_stage
from playpen_attribution.bergson_attribution import damping_sweep_stage
from playpen_attribution.stage import run_stage

run_stage(snakemake, damping_sweep_stage, index_dirs=list(snakemake.input.index), query_tokens_dir=snakemake.input.query,
          query_gradients_dir=snakemake.input.per_query,
          hessian_dir=snakemake.input.hessian[0] if snakemake.input.hessian else None, out_path=snakemake.output[0],
          variant=snakemake.wildcards.variant, damping=snakemake.params.damping)
