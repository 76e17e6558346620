"""Size on disk (fp32) of Kronfluence factors for the `taboo` run's model, by module choice and layer stride.

No download and no GPU: Gemma 3 1B's architecture is built on the meta device from its config values, the
run's LoRA adapter is applied with PEFT, and the tracked modules are chosen by the same `select_modules` the
workflow uses. Per tracked Linear (in -> out), Kronfluence keeps
  diagonal: the lambda matrix (out x in)
  kfac:     activation and gradient covariances (in^2 + out^2), their eigenvectors (in^2 + out^2), eigenvalues
  ekfac:    as kfac, plus the corrected eigenvalues (out x in)
so a LoRA layer costs as much as its base layer's width, not its rank.

    uv run python bench/factor_sizes.py            # taboo run (config/config.yaml)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# google/gemma-3-1b-it config.json (the revision pinned in config/config.yaml)
GEMMA3_1B = dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="taboo")
    parser.add_argument("--strides", default="1,2,4,13")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from playpen_attribution.config import validate_config
    from playpen_attribution.influence import select_modules
    from playpen_attribution.plan import factor_floats

    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    lora = config["runs"][args.run]["lora"]
    with torch.device("meta"):
        model = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_1B))
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                             target_modules=list(lora["target_modules"])))
    modules = dict(model.named_modules())
    print(f"Gemma 3 1B ({GEMMA3_1B['num_hidden_layers']} layers), LoRA r={lora['r']} on "
          f"{', '.join(lora['target_modules'])}; GB of fp32 factors")
    print(f"{'modules':8} {'stride':>6} {'layers':>6} {'tracked':>8} {'diagonal':>9} {'kfac':>7} {'ekfac':>7}")
    for kind in ("lora", "mlp"):
        for stride in map(int, args.strides.split(",")):
            names = select_modules(model, kind, stride)
            shapes = [(modules[n].in_features, modules[n].out_features) for n in names]
            layers = len(range(0, GEMMA3_1B["num_hidden_layers"], stride))
            sizes = [factor_floats(shapes, s) * 4 / 1e9 for s in ("diagonal", "kfac", "ekfac")]
            print(f"{kind:8} {stride:>6} {layers:>6} {len(names):>8} " + " ".join(f"{g:>8.2f}" for g in sizes))


if __name__ == "__main__":
    main()
