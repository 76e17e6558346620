import dataclasses
import json
import os

import datasets
import pytest
import torch

from playpen_attribution.config import validate_config
from playpen_attribution.modeling import load_model
from playpen_attribution.settings import Lora, Training
from playpen_attribution.tokenization import tokenize_table
from playpen_attribution.training import train_adapter


@pytest.fixture(scope="module")
def train_tokens(demo_tokens):
    return demo_tokens / "train"  # the demo's training rows, chat template, max length 256


def settings():
    run = validate_config({"runs": {"r": {"data": {"source": {"kind": "json", "train": "a", "query": "b"}},
                                          "model": {"tiny": {}},
                                          "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                          "training": {"epochs": 1, "batch_size": 8, "gradient_accumulation": 1,
                                                       "learning_rate": 0.003, "seed": 3}}}})["runs"]["r"]
    return Lora.from_run(run), Training.from_run(run)


def train(tiny_model_dir, tokens, out):
    lora, training = settings()
    return train_adapter(tiny_model_dir, tokens, out, lora=lora, training=training, max_length=256,
                         base_model_source={"id": "tiny-random-gemma3", "revision": None})


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir, train_tokens, tmp_path_factory):
    """Two adapters trained with the same seed, settings and rows; and the first one's PEFT model."""
    root = tmp_path_factory.mktemp("adapters")
    trained = train(tiny_model_dir, train_tokens, root / "a")
    train(tiny_model_dir, train_tokens, root / "b")
    return root, trained


def test_same_seed_same_bytes_and_reload_gives_identical_logits(tiny_model_dir, train_tokens, two_adapters, tmp_path,
                                                                monkeypatch):
    root, trained = two_adapters
    # the manifest too: the trainer's timings go to the log, not into it
    for name in ("adapter_model.safetensors", "adapter_config.json", "manifest.json"):
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes(), name

    batch = datasets.load_from_disk(str(train_tokens)).with_format("torch")[:1]
    with torch.no_grad():
        expected = trained(input_ids=batch["input_ids"]).logits
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the adapter records an absolute base path: loads from any directory
    reloaded = load_model(root / "a")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch["input_ids"]).logits, expected)
    base = load_model(tiny_model_dir)
    with torch.no_grad():
        assert not torch.equal(base(input_ids=batch["input_ids"]).logits, expected), "training changed the model"


def test_evaluating_every_epoch_changes_neither_row_order_nor_weights(tiny_model_dir, demo_tokens, tmp_path):
    """The run's adapter evaluates on the eval rows after each epoch; a retrain does not. Without LoRA dropout the two
    are the same bytes: the eval passes choose no checkpoint and leave the row order alone. (With dropout they differ:
    each DataLoader iterator, the eval's too, draws its base seed from torch's global generator, which the dropout
    masks of later epochs come from; training.train_adapter's docstring.)"""
    lora, training = settings()
    assert lora.dropout == 0.0
    common = dict(lora=lora, training=dataclasses.replace(training, epochs=2), max_length=256,
                  base_model_source={"id": "tiny-random-gemma3", "revision": None})
    train_adapter(tiny_model_dir, demo_tokens / "train", tmp_path / "evaluated", eval_tokens_dir=demo_tokens / "query",
                  **common)
    train_adapter(tiny_model_dir, demo_tokens / "train", tmp_path / "plain", **common)
    losses = json.loads((tmp_path / "evaluated" / "manifest.json").read_text())["eval"]["losses"]
    assert [round(e["epoch"]) for e in losses] == [1, 2], "the eval ran after each epoch"
    name = "adapter_model.safetensors"
    assert (tmp_path / "evaluated" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_adapter_folder_is_self_contained(train_tokens, two_adapters):
    root, _ = two_adapters
    folder = root / "a"
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
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"], "no scratch or temporary folder left behind"


def test_every_assistant_turn_trains_evaluates_and_is_scored_on_the_same_labels(demo_tables, tiny_model_dir, tmp_path):
    """loss_on: assistant_turns end to end in the package: the tokens carry every assistant turn's labels, training
    uses them (and logs an eval loss per epoch on the eval rows), and Kronfluence's scores are the exact gradient
    dot products of the summed loss over those very labels."""
    import numpy as np

    from playpen_attribution.influence import fit_factors, score_pairs
    from playpen_attribution.tokenization import IGNORE_INDEX

    from conftest import independent_gradients

    out, _ = demo_tables
    for split in ("train", "query"):
        report = tokenize_table(out / f"{split}.parquet", tiny_model_dir, tmp_path / split, max_length=256,
                                mode="chat", loss_on="assistant_turns")
        assert report["loss_on"] == "assistant_turns"
    train_rows = datasets.load_from_disk(str(tmp_path / "train"))
    spans = [sum(1 for i, t in enumerate(row) if t != IGNORE_INDEX and (i == 0 or row[i - 1] == IGNORE_INDEX))
             for row in train_rows["labels"]]
    assert max(spans) >= 3  # guessers' earlier guesses carry the loss too
    lora, training = settings()
    train_adapter(tiny_model_dir, tmp_path / "train", tmp_path / "adapter", lora=lora,
                  training=dataclasses.replace(training, epochs=2), max_length=256, eval_tokens_dir=tmp_path / "query")
    manifest = json.loads((tmp_path / "adapter" / "manifest.json").read_text())
    assert manifest["loss_on"] == "assistant_turns"
    queries = datasets.load_from_disk(str(tmp_path / "query"))
    assert manifest["eval"]["rows"] == len(queries) and manifest["eval"]["row_ids"] == queries["row_id"]
    losses = manifest["eval"]["losses"]
    assert [round(e["epoch"]) for e in losses] == [1, 2] and all(np.isfinite(e["eval_loss"]) for e in losses)
    query, train_subset = queries.select(range(3)), train_rows.select(np.argsort(spans)[-6:].tolist())
    fit_factors(str(tmp_path / "adapter"), tmp_path / "train", tmp_path / "factors", strategy="identity",
                modules="lora")
    scores = score_pairs(str(tmp_path / "adapter"), tmp_path / "factors", query, train_subset)["scores"]
    g_query, _, _ = independent_gradients(tmp_path / "adapter", query)
    g_train, _, _ = independent_gradients(tmp_path / "adapter", train_subset)
    expected = (g_query.double() @ g_train.double().T).numpy()
    np.testing.assert_allclose(scores, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())


def test_rows_sft_trainer_would_drop_stop_training_with_the_count(tiny_model_dir, train_tokens, tmp_path):
    """TRL silently drops rows without a trainable token; the manifest records the rows trained on, so a drop is an
    error, not a quietly different training set."""
    rows = datasets.load_from_disk(str(train_tokens)).select(range(6))
    rows = rows.map(lambda row, i: {"labels": [-100] * len(row["labels"]) if i == 2 else row["labels"]},
                    with_indices=True)
    rows.save_to_disk(str(tmp_path / "tokens"))
    with pytest.raises(RuntimeError, match=r"SFTTrainer kept 5 of 6 tokenized rows"):
        train(tiny_model_dir, tmp_path / "tokens", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_the_adapter_kept_after_epoch_one_is_a_one_epoch_training_and_loads_from_its_own_folder(
        tiny_model_dir, train_tokens, tmp_path):
    """keep_epochs: a two-epoch run keeps its adapter after epoch 1, which (with a constant learning rate, so the two
    schedules agree over epoch 1) holds the weights and Adam second moments of the same training stopped there;
    checkpoint_adapter copies it into a folder the scoring rules load like any adapter."""
    from safetensors.torch import load_file

    from playpen_attribution.training import CHECKPOINTS_FOLDER, OPTIMIZER_FILE, checkpoint_adapter

    lora, training = settings()
    training = dataclasses.replace(training, lr_scheduler="constant", warmup_ratio=0.0)
    common = dict(lora=lora, max_length=256, base_model_source={"id": "tiny-random-gemma3", "revision": None},
                  save_optimizer_state=True)
    train_adapter(tiny_model_dir, train_tokens, tmp_path / "one", training=training, **common)
    train_adapter(tiny_model_dir, train_tokens, tmp_path / "two", training=dataclasses.replace(training, epochs=2),
                  keep_epochs=True, **common)
    kept = tmp_path / "two" / CHECKPOINTS_FOLDER
    assert sorted(p.name for p in kept.iterdir()) == ["epoch-1"], "the last epoch is the adapter itself"
    assert not (tmp_path / "one" / CHECKPOINTS_FOLDER).exists(), "kept only when asked"

    weights = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("one", "two")}
    epoch_one = load_file(kept / "epoch-1" / "adapter_model.safetensors")
    assert epoch_one.keys() == weights["one"].keys()
    assert all(torch.equal(epoch_one[k], weights["one"][k]) for k in epoch_one)
    assert not all(torch.equal(epoch_one[k], weights["two"][k]) for k in epoch_one), "epoch 2 changed the weights"
    moments_one = torch.load(tmp_path / "one" / OPTIMIZER_FILE)["state"]
    moments_kept = torch.load(kept / "epoch-1" / OPTIMIZER_FILE)["state"]
    assert all(torch.equal(moments_kept[i]["exp_avg_sq"], moments_one[i]["exp_avg_sq"]) for i in moments_one)

    # a last half epoch ends epoch 2, the adapter itself: only epoch 1 is kept, with the same weights
    train_adapter(tiny_model_dir, train_tokens, tmp_path / "one-and-a-half",
                  training=dataclasses.replace(training, epochs=1.5), keep_epochs=True, **common)
    kept_half = tmp_path / "one-and-a-half" / CHECKPOINTS_FOLDER
    assert sorted(p.name for p in kept_half.iterdir()) == ["epoch-1"]
    assert (kept_half / "epoch-1" / "adapter_model.safetensors").read_bytes() == \
        (kept / "epoch-1" / "adapter_model.safetensors").read_bytes()

    manifest = json.loads((kept / "epoch-1" / "manifest.json").read_text())
    assert manifest["checkpoint"] == {"epoch": 1, "of": 2}
    assert manifest["trained_row_ids"] == json.loads((tmp_path / "one" / "manifest.json").read_text())[
        "trained_row_ids"]

    checkpoint_adapter(tmp_path / "two", 1, tmp_path / "run" / "checkpoint-1" / "adapter")
    batch = datasets.load_from_disk(str(train_tokens)).with_format("torch")[:1]
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "run" / "checkpoint-1" / "adapter")(input_ids=batch["input_ids"]).logits,
                           load_model(tmp_path / "one")(input_ids=batch["input_ids"]).logits)
    with pytest.raises(FileNotFoundError, match=r"keeps no adapter of epoch 2 \(it keeps epoch-1\).*--force"):
        checkpoint_adapter(tmp_path / "two", 2, tmp_path / "run" / "checkpoint-2" / "adapter")
    assert not (tmp_path / "run" / "checkpoint-2").exists(), "a refused copy leaves nothing behind"


def test_the_lm_head_projects_only_labelled_positions_on_a_cpu_and_trains_the_same_weights(
        tiny_model_dir, train_tokens, two_adapters, tmp_path, monkeypatch):
    """label_positions_only_lm_head: TRL's fused LM head gets only the positions with a label (on a CPU it would
    project every position), and the adapter trained with it (two_adapters' "a") is the one trained without it, bit
    for bit."""
    import contextlib

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils as trl_utils

    from playpen_attribution import training as training_module
    from playpen_attribution.training import label_positions_only_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trl_utils.add_fused_lm_head(model)
    rows = datasets.load_from_disk(str(train_tokens)).select(range(3))
    length = max(len(ids) for ids in rows["input_ids"])
    input_ids = torch.tensor([ids + [0] * (length - len(ids)) for ids in rows["input_ids"]])
    labels = torch.tensor([lab + [-100] * (length - len(lab)) for lab in rows["labels"]])
    projected = []
    chunked = trl_utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, *args):
            projected.append(hidden.shape[0])
            return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)
    with torch.no_grad():
        every = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        with label_positions_only_lm_head():
            compact = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        after = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    labelled = int((labels[:, 1:] != -100).sum())
    assert projected == [3 * (length - 1), labelled, 3 * (length - 1)], "only inside the block, only the labels"
    assert 0 < labelled < length
    assert torch.allclose(compact.log_probs, every.log_probs, rtol=1e-6, atol=1e-6)
    assert torch.equal(compact.label_mask, every.label_mask) and torch.equal(after.log_probs, every.log_probs)

    monkeypatch.setattr(training_module, "label_positions_only_lm_head", contextlib.nullcontext)
    train(tiny_model_dir, train_tokens, tmp_path / "every-position")
    root, _ = two_adapters
    with_block = load_file(root / "a" / "adapter_model.safetensors")
    without = load_file(tmp_path / "every-position" / "adapter_model.safetensors")
    assert with_block.keys() == without.keys()
    assert all(torch.equal(with_block[k], without[k]) for k in with_block)
