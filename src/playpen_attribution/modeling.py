"""Getting models: a pinned hub download into the run's folder, and loading a base or adapter folder."""

from __future__ import annotations

import logging
from pathlib import Path

from playpen_attribution.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

# Weights, configs and tokenizer files; no original checkpoints or GGUF copies.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def fetch_base_model(hub_id: str, revision: str, output_dir: str | Path) -> Path:
    """Download `hub_id` at `revision` into `output_dir` (atomically), recording the resolved commit."""
    from huggingface_hub import HfApi, snapshot_download

    with atomic_path(output_dir, directory=True) as tmp:
        snapshot_download(repo_id=hub_id, revision=revision, local_dir=str(tmp),
                          allow_patterns=MODEL_FILE_PATTERNS)
        try:
            sha = HfApi().model_info(hub_id, revision=revision).sha
        except Exception as err:  # offline mirrors still give a usable folder
            log.warning("could not resolve the commit of %s@%s: %s", hub_id, revision, err)
            sha = None
        write_json_atomic({"kind": "hub", "id": hub_id, "revision": revision, "commit": sha}, Path(tmp) / "source.json")
    return Path(output_dir)


def load_model(model_dir: str | Path, dtype=None, device: str | None = None):
    """Load a base model folder or a LoRA adapter folder (whose base path is absolute) for inference."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    dtype = dtype or torch.float32
    if (model_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager")
    model.eval()
    if device:
        model.to(device)
    return model
