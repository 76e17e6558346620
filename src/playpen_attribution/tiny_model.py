"""A tiny random Gemma 3 causal LM with a locally trained tokenizer, for the demo and the tests.

No machine here reaches the hub, so the demo builds its own base model: the real Gemma 3 architecture
(`Gemma3ForCausalLM`) at a toy size, a byte-level BPE tokenizer trained on the run's own text, and the
stock Gemma 3 chat template (the copy TRL ships), so every later stage takes the same code path as
`google/gemma-3-1b-it`. Deterministic: same corpus and seed, same files.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from pathlib import Path
from typing import Iterable

from playpen_attribution.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def gemma3_chat_template() -> str:
    return importlib.resources.files("trl").joinpath("chat_templates/gemma3.jinja").read_text()


def corpus_from_source(source: dict) -> list[str]:
    """Every message text of a data source (all splits, all games), in a fixed order."""
    from playpen_attribution.data import load_pair_json, load_playpen_split

    texts: list[str] = []
    if source["kind"] == "json":
        for key in ("train", "query"):
            frame = load_pair_json(source[key])
            texts += list(frame["prompt"]) + list(frame["completion"])
    else:
        for split in ("train", "validation"):
            for row in load_playpen_split(source, split):
                texts += [m["content"] for m in row["messages"]]
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (any text encodes, nothing maps to <unk>) wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=gemma3_chat_template(),
        model_max_length=2048,
    )


def build_tiny_model(texts: list[str], output_dir: str | Path, *, hidden_size: int = 64,
                     intermediate_size: int = 128, num_layers: int = 2, num_attention_heads: int = 2,
                     vocab_size: int = 1024, initializer_range: float = 0.2, seed: int = 0) -> Path:
    """Write a random `Gemma3ForCausalLM` and its tokenizer to `output_dir` (atomically)."""
    from transformers import Gemma3TextConfig

    tokenizer = train_tokenizer(texts, vocab_size)
    head_dim = max(8, hidden_size // num_attention_heads)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=2048,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    return _save_random_model(config, tokenizer, output_dir, seed, {"kind": "tiny", "corpus_texts": len(texts)})


def _save_random_model(config, tokenizer, output_dir, seed: int, source: dict) -> Path:
    import torch
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with atomic_path(output_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic({**source, "seed": seed, "n_parameters": sum(p.numel() for p in model.parameters())},
                          tmp / "source.json")
    log.info("random Gemma 3: %s", json.dumps(config.to_diff_dict())[:400])
    return Path(output_dir)


def gemma3_text_config(fields: dict, num_layers: int | None = None):
    """A Gemma 3 text config from the fields of a published `config.json` (no weights; comments and the
    architecture's name left out), optionally with fewer layers: the first `num_layers` of its sliding/full
    attention pattern."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(**{k: v for k, v in fields.items()
                                 if not k.startswith("_") and k not in ("architectures", "model_type")})
    if num_layers is not None:
        config.layer_types = config.layer_types[:num_layers]
        config.num_hidden_layers = num_layers
    return config


def build_random_model(texts: list[str], output_dir: str | Path, *, architecture: str | Path,
                       num_layers: int | None = None, tokenizer_vocab_size: int = 8192, seed: int = 0) -> Path:
    """A random-weight model of a published architecture (the rehearsal of a real run: every shape, the
    vocabulary included, is the real model's), with a tokenizer trained on the run's text. The tokenizer's
    ids are a subset of the model's vocabulary; the logits keep the architecture's full width."""
    from playpen_attribution.plan import read_architecture

    tokenizer = train_tokenizer(texts, tokenizer_vocab_size)
    config = gemma3_text_config(read_architecture(architecture), num_layers)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens does not fit the architecture's vocabulary of "
                         f"{config.vocab_size}; lower model.random.tokenizer_vocab_size")
    return _save_random_model(config, tokenizer, output_dir, seed,
                              {"kind": "random", "architecture": str(architecture), "num_layers": num_layers,
                               "corpus_texts": len(texts)})
