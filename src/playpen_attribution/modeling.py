"""Running models: one loader for base and adapter folders (wherever `model_sources` got the base from), and
the summed completion loss every attribution stage measures.

An adapter records its base model relative to its own folder where both live in one project
(`../base_model`), so a moved or copied project still loads; `load_for_attribution` resolves it there.
Libraries that read `adapter_config.json` themselves (Bergson) get a view with the absolute path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

from playpen_attribution.tokenization import IGNORE_INDEX

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose float32, float16 or bfloat16") from None


def is_adapter(model_ref: str | Path) -> bool:
    return Path(model_ref).is_dir() and (Path(model_ref) / ADAPTER_CONFIG).is_file()


def portable_base_path(base_model_dir: str | Path, adapter_dir: str | Path) -> str:
    """What an adapter records as its base: the path relative to the adapter folder when both lie under the
    working directory (the project), so the project can move; the absolute path otherwise."""
    base, adapter, here = (Path(p).resolve() for p in (base_model_dir, adapter_dir, Path.cwd()))
    if base.is_relative_to(here) and adapter.is_relative_to(here):
        return os.path.relpath(base, adapter)
    return str(base)


def adapter_base_path(adapter_dir: str | Path) -> str:
    """The base model of an adapter folder: a relative path is resolved against the adapter folder (where
    `portable_base_path` put it); an absolute path or a hub id is returned as it is."""
    recorded = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    if not os.path.isabs(recorded):
        beside = Path(adapter_dir) / recorded
        if beside.exists():
            return str(beside.resolve())
    return recorded


@contextlib.contextmanager
def adapter_view_with_absolute_base(adapter_dir: str | Path) -> Iterator[Path]:
    """A temporary folder of links to the adapter's files whose `adapter_config.json` names the base by its
    absolute path: Bergson (and PEFT's own loaders) resolve the base from the working directory."""
    adapter_dir = Path(adapter_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="adapter-view-", dir=os.environ.get("TMPDIR")) as scratch:
        view = Path(scratch) / adapter_dir.name
        view.mkdir()
        for item in adapter_dir.iterdir():
            if item.name != ADAPTER_CONFIG:
                (view / item.name).symlink_to(item)
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = adapter_base_path(adapter_dir)
        (view / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        yield view


def model_type_of(model_ref: str | Path, revision: str | None = None) -> str:
    """The architecture (`model_type`) of a hub id or local folder; an adapter's is its base model's."""
    from transformers import AutoConfig

    base = adapter_base_path(model_ref) if is_adapter(model_ref) else str(model_ref)
    return AutoConfig.from_pretrained(base, **({"revision": revision} if revision else {})).model_type


def refuse_float16_for_gemma3(model_type: str, dtype, where: str) -> None:
    """Gemma 3's activations overflow float16's range (Google's advice: bf16 or fp32)."""
    if model_type.startswith("gemma3") and str(dtype).removeprefix("torch.") in ("float16", "fp16"):
        raise ValueError(f"{where}: Gemma 3 overflows in float16 (its activations exceed float16's range); use "
                         f"bfloat16 (bf16) or float32")


def load_causal_lm(model_ref: str | Path, revision: str | None = None, dtype="float32"):
    """A hub id or local folder (base model, or LoRA adapter on its base) with eager attention (Gemma 3's advice
    for training); `dtype` a name or a torch dtype. The one loader: training, attribution and inference."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype) if isinstance(dtype, str) else dtype, "attn_implementation": "eager"}
    refuse_float16_for_gemma3(model_type_of(model_ref, revision), kwargs["dtype"], f"loading {model_ref}")
    if revision:
        kwargs["revision"] = revision
    if is_adapter(model_ref):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(adapter_base_path(model_ref), **kwargs)
        return PeftModel.from_pretrained(base, str(model_ref))
    return AutoModelForCausalLM.from_pretrained(str(model_ref), **kwargs)


def load_for_attribution(model_ref: str | Path, revision: str | None = None, dtype: str = "float32",
                         device: str | None = None):
    """Load a hub id or local folder (base model or LoRA adapter) in eval mode, on the GPU where there is one
    (or on `device`)."""
    import torch

    model = load_causal_lm(model_ref, revision, dtype)
    model.eval()
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device:
        model.to(device)
    return model


def load_model(model_dir: str | Path, dtype=None, device: str | None = None):
    """A base model or LoRA adapter folder for inference (fp32 on the CPU unless told otherwise)."""
    return load_for_attribution(model_dir, dtype=dtype or "float32", device=device or "cpu")


def load_tokenizer(model_ref: str | Path, revision: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_ref), **({"revision": revision} if revision else {}))


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(rows: list[dict], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad a list of tokenized rows into tensors (attention 0 and labels -100 on padding)."""
    import torch

    width = max(max(len(r["input_ids"]) for r in rows), pad_to or 0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loss(model, batch: dict, reduction: str = "sum", sample: bool = False):
    """Summed cross-entropy on the completion tokens (labels != -100), next-token shifted.

    Logits are computed only at the positions that predict a completion token (`logits_to_keep`): with
    Gemma 3's 262,144-token vocabulary the full [batch, tokens, vocab] logits of a 1,024-token row are 1 GB
    in fp32, while a completion is a few tokens. The loss is the same. With `sample=True`, labels are drawn
    from the model's own distribution (true Fisher).
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    # position p predicts token p + 1: keep the positions before every labelled token of any row of the batch
    keep = torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()
    if len(keep) == 0:
        keep = torch.zeros(1, dtype=torch.long, device=device)  # a batch without completion tokens: loss 0
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   logits_to_keep=keep).logits.float()
    targets = labels[:, keep + 1]
    if sample:
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1).view(targets.shape)
        targets = torch.where(targets == IGNORE_INDEX, targets, sampled)
    if reduction == "per_example":
        token_losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        return token_losses.sum(dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
