# Thin adapter: rules bergson_trak_shard, planted_bergson_trak -> playpen_attribution.bergson_attribution.trak_shard_stage
from playpen_attribution.bergson_attribution import trak_shard_stage
from playpen_attribution.stage import run_stage

planted = snakemake.rule == "planted_bergson_trak"
run_stage(snakemake, trak_shard_stage, trak_dir=snakemake.input[0], out_path=snakemake.output[0],
          shard=0 if planted else int(snakemake.wildcards.shard), shards=1 if planted else snakemake.params.shards,
          planted=planted)
