# Thin adapter: rule ensemble_mean_scores -> playpen_attribution.ensemble.mean_of_member_shards
from playpen_attribution.ensemble import mean_of_member_shards
from playpen_attribution.stage import run_stage

run_stage(snakemake, mean_of_member_shards, member_paths=list(snakemake.input), out_path=snakemake.output[0])
