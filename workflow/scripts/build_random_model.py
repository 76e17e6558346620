# Thin adapter: rule build_random_model -> playpen_attribution.model_sources.build_random_model
from playpen_attribution.stage import run_stage
from playpen_attribution.model_sources import build_random_model, corpus_from_source


def build(source, settings, output_dir):
    return build_random_model(corpus_from_source(source), output_dir, **settings)


run_stage(snakemake, build, source=snakemake.params.source, settings=snakemake.params.random,
          output_dir=snakemake.output[0])
