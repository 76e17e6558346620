# Thin adapter: rule prepare_data -> playpen_attribution.data.prepare_split
from playpen_attribution.data import prepare_split
from playpen_attribution.stage import run_stage

run_stage(snakemake, prepare_split, cfg=snakemake.params.data, out_rows=snakemake.output.rows,
          out_report=snakemake.output.report)
