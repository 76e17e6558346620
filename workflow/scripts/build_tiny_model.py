# Thin adapter: rule build_tiny_model -> playpen_attribution.model_sources.build_tiny_model
from playpen_attribution.stage import run_stage
from playpen_attribution.model_sources import build_tiny_model, corpus_from_source


def build(source, tiny, output_dir):
    return build_tiny_model(corpus_from_source(source), output_dir, **tiny)


run_stage(snakemake, build, source=snakemake.params.source, tiny=snakemake.params.tiny,
          output_dir=snakemake.output[0])
