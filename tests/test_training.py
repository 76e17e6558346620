import json
import os

import datasets
import pytest
import torch

from playpen_attribution.config import validate_config
from playpen_attribution.modeling import load_model
from playpen_attribution.tokenization import tokenize_table
from playpen_attribution.training import train_adapter


@pytest.fixture(scope="module")
def train_tokens(demo_tables, tiny_model_dir, tmp_path_factory):
    out, _ = demo_tables
    tokens = tmp_path_factory.mktemp("tokens") / "train"
    tokenize_table(out / "train.parquet", tiny_model_dir, tokens, max_length=256, mode="chat")
    return tokens


def settings():
    run = validate_config({"runs": {"r": {"data": {"source": {"kind": "json", "train": "a", "query": "b"}},
                                          "model": {"tiny": {}},
                                          "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                          "training": {"epochs": 1, "batch_size": 8, "gradient_accumulation": 1,
                                                       "learning_rate": 0.003, "seed": 3}}}})["runs"]["r"]
    return run["lora"], run["training"]


def train(tiny_model_dir, tokens, out):
    lora, training = settings()
    return train_adapter(tiny_model_dir, tokens, out, lora=lora, training=training, max_length=256,
                         base_model_source={"id": "tiny-random-gemma3", "revision": None})


def test_same_seed_same_bytes_and_reload_gives_identical_logits(tiny_model_dir, train_tokens, tmp_path, monkeypatch):
    trained = train(tiny_model_dir, train_tokens, tmp_path / "a")
    train(tiny_model_dir, train_tokens, tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    batch = datasets.load_from_disk(str(train_tokens)).with_format("torch")[:1]
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"]).logits
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the adapter records an absolute base path: loads from any directory
    reloaded = load_model(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch["input_ids"]).logits, expected)
    base = load_model(tiny_model_dir)
    with torch.no_grad():
        assert not torch.equal(base(input_ids=batch["input_ids"]).logits, expected), "training changed the model"


def test_adapter_folder_is_self_contained(tiny_model_dir, train_tokens, tmp_path):
    train(tiny_model_dir, train_tokens, tmp_path / "adapter")
    folder = tmp_path / "adapter"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.json", "manifest.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text"
    manifest = json.loads((folder / "manifest.json").read_text())
    tokens = datasets.load_from_disk(str(train_tokens))
    assert manifest["trained_row_ids"] == tokens["row_id"]
    assert manifest["seed"] == 3 and manifest["base_model"]["id"] == "tiny-random-gemma3"
    assert manifest["versions"]["trl"] and manifest["versions"]["torch"].startswith("2.11")
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert os.path.isabs(adapter_config["base_model_name_or_path"])
    assert not list(tmp_path.glob(".adapter*")), "no scratch or temporary folder left behind"
