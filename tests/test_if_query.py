"""The if-query tools on the data they are made for: pre-tokenized sets with padding (left or right) or without
labels, DatasetDict folders, the chat rendering of a workflow adapter, queries in batches, nested extra fields."""

import json

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from playpen_attribution.influence import fit_factors, load_token_dataset, score_pairs



@pytest.fixture(scope="module")
def plain_model(seed_model):
    """The seed's tiny base model and plain tokens (`hessian` = train.json, `query`), and its pad id."""
    from transformers import AutoTokenizer

    return seed_model, AutoTokenizer.from_pretrained(str(seed_model / "model")).pad_token_id


def padded(dataset, width: int, pad_id: int, side: str):
    """if-query's own layout: every row padded to `width`, attention 0 and label -100 on the padding."""
    def pad(row):
        n = width - len(row["input_ids"])
        extra = {"input_ids": [pad_id] * n, "attention_mask": [0] * n, "labels": [-100] * n}
        return {k: (extra[k] + row[k] if side == "left" else row[k] + extra[k]) for k in extra}
    return dataset.map(pad)


def factors_of(folder):
    return {path.relative_to(folder).as_posix(): load_file(path) for path in sorted(folder.rglob("*.safetensors"))}


def assert_same_factors(a, b):
    fa, fb = factors_of(a), factors_of(b)
    assert fa.keys() == fb.keys() and fa
    for name in fa:
        for key in fa[name]:
            torch.testing.assert_close(fa[name][key], fb[name][key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_left_and_right_padded_sets_give_the_factors_and_scores_of_their_unpadded_rows(plain_model, tmp_path):
    root, pad_id = plain_model
    rows = datasets.load_from_disk(str(root / "hessian"))
    query = datasets.load_from_disk(str(root / "query"))
    width = max(len(x) for x in rows["input_ids"]) + 7
    fit_factors(str(root / "model"), root / "hessian", tmp_path / "unpadded", strategy="ekfac")
    reference = score_pairs(str(root / "model"), tmp_path / "unpadded", query, rows)["scores"]
    for side in ("left", "right"):
        padded(rows, width, pad_id, side).save_to_disk(str(tmp_path / f"{side}-set"))
        fit_factors(str(root / "model"), tmp_path / f"{side}-set", tmp_path / side, strategy="ekfac")
        assert_same_factors(tmp_path / "unpadded", tmp_path / side)
        train = load_token_dataset(tmp_path / f"{side}-set")
        assert train["input_ids"] == rows["input_ids"]  # padding stripped on load, as the factors saw it
        scores = score_pairs(str(root / "model"), tmp_path / side, query, train)["scores"]
        np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-6 * np.abs(reference).max())


def test_a_set_without_labels_gives_the_factors_of_labels_equal_to_input_ids(plain_model, tmp_path):
    root, _ = plain_model
    rows = datasets.load_from_disk(str(root / "hessian"))
    rows.remove_columns("labels").save_to_disk(str(tmp_path / "no-labels"))
    rows.map(lambda row: {"labels": row["input_ids"]}).save_to_disk(str(tmp_path / "labels"))
    for name in ("no-labels", "labels"):
        fit_factors(str(root / "model"), tmp_path / name, tmp_path / f"f-{name}", strategy="ekfac")
    assert_same_factors(tmp_path / "f-no-labels", tmp_path / "f-labels")


def test_a_datasetdict_folder_takes_a_split_and_missing_columns_are_named(plain_model, tmp_path):
    root, _ = plain_model
    rows = datasets.load_from_disk(str(root / "hessian"))
    datasets.DatasetDict({"train": rows, "validation": rows.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_token_dataset(tmp_path / "dict")) == len(rows)
    assert len(load_token_dataset(tmp_path / "dict", split="validation")) == 1
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\]; choose one with --split"):
        load_token_dataset(tmp_path / "dict", split="test")
    rows.rename_column("input_ids", "tokens").save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(ValueError, match=r"has columns \['attention_mask', 'labels', 'tokens'\]; it needs input_ids"):
        load_token_dataset(tmp_path / "renamed")
    holes = rows.map(lambda row: {"attention_mask": [1, 0] + row["attention_mask"][2:]})
    holes.save_to_disk(str(tmp_path / "holes"))
    with pytest.raises(ValueError, match=r"row 0: attention_mask has gaps"):
        load_token_dataset(tmp_path / "holes")
    empty = rows.map(lambda row, i: {"attention_mask": [0] * len(row["attention_mask"]) if i == 2
                                     else row["attention_mask"]}, with_indices=True)
    empty.save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"empty, row 2: attention_mask is all zeros; drop the row"):
        load_token_dataset(tmp_path / "empty")


def test_module_selection_that_finds_nothing_says_why(plain_model):
    from playpen_attribution.influence import select_modules
    from playpen_attribution.modeling import load_model

    root, _ = plain_model
    model = load_model(root / "model")
    with pytest.raises(ValueError, match=r"no lora modules found to track \(layer stride 1\); is the model a LoRA "
                                         r"adapter\?"):
        select_modules(model, "lora")
    with pytest.raises(ValueError, match="layer_stride must be at least 1, got 0"):
        select_modules(model, "mlp", layer_stride=0)
    # a stride past the last layer keeps layer 0 only
    assert {n.split(".layers.")[1].split(".")[0] for n in select_modules(model, "mlp", layer_stride=50)} == {"0"}


def test_run_query_scores_a_chat_adapter_on_the_workflow_tokens_of_the_same_rows(demo_adapter, demo_tokens,
                                                                                  demo_tables, tmp_path):
    """--render auto reads the adapter's manifest: chat-rendered training means chat-rendered queries."""
    from playpen_attribution.cli import resolve_render, tokenize_json
    from playpen_attribution.data import read_rows
    from playpen_attribution.modeling import load_tokenizer

    assert resolve_render("auto", str(demo_adapter)) == "chat"
    tables, _ = demo_tables
    rows = [r for r in read_rows(tables / "train.parquet") if len(r["prompt"]) == 1][:5]  # one user turn each
    assert len(rows) == 5
    items = [{"pair_id": r["row_id"], "prompt": r["prompt"][0]["content"], "completion": r["completion"][0]["content"]}
             for r in rows]
    (tmp_path / "train.json").write_text(json.dumps(items))
    _, ours = tokenize_json(str(tmp_path / "train.json"), load_tokenizer(demo_adapter), 256, "chat")
    workflow = datasets.load_from_disk(str(demo_tokens / "train"))
    index = {row_id: i for i, row_id in enumerate(workflow["row_id"])}
    for row in ours:
        theirs = workflow[index[row["row_id"]]]
        assert row["input_ids"] == theirs["input_ids"] and row["labels"] == theirs["labels"]
    # run-query itself, the rendering left to --render auto: the scores of the workflow's own tokens of those rows
    import pandas as pd

    from playpen_attribution.cli import run_query

    rows_tokens = workflow.select([index[r["pair_id"]] for r in items])
    rows_tokens.save_to_disk(str(tmp_path / "tokens"))
    fit_factors(str(demo_adapter), tmp_path / "tokens", tmp_path / "factors", strategy="diagonal", modules="lora")
    run_query(["--model", str(demo_adapter), "--factors-dir", str(tmp_path / "factors"), "--train-json",
               str(tmp_path / "train.json"), "--query-json", str(tmp_path / "train.json"), "--output-dir",
               str(tmp_path / "out"), "--dtype", "float32", "--max-length", "256"])
    written = pd.read_csv(tmp_path / "out" / "influences.csv").pivot(index="query_id", columns="train_id",
                                                                     values="influence_score")
    ids = list(rows_tokens["row_id"])
    expected = score_pairs(str(demo_adapter), tmp_path / "factors", rows_tokens, rows_tokens)["scores"]
    np.testing.assert_allclose(written.loc[ids, ids].to_numpy(), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())


def test_plain_is_auto_for_a_base_model(plain_model):
    from playpen_attribution.cli import resolve_render

    root, _ = plain_model
    assert resolve_render("auto", str(root / "model")) == "plain"


def test_query_batches_give_the_scores_of_one_batch(plain_model, tmp_path):
    root, _ = plain_model
    fit_factors(str(root / "model"), root / "hessian", tmp_path / "f", strategy="ekfac")
    query, train = (datasets.load_from_disk(str(root / s)) for s in ("query", "hessian"))
    # Kronfluence's heuristic damping: with the seed's 1e-8 the near-singular factors of 12 rows amplify rounding
    # (batched and single matrix products round differently) to about 1% of the largest score
    kwargs = dict(damping_factor=None)
    one = score_pairs(str(root / "model"), tmp_path / "f", query, train, query_batch_size=None, **kwargs)["scores"]
    each = score_pairs(str(root / "model"), tmp_path / "f", query, train, query_batch_size=1, **kwargs)["scores"]
    np.testing.assert_allclose(each, one, rtol=1e-4, atol=1e-6 * np.abs(one).max())


def test_nested_extra_fields_are_written_as_json():
    from playpen_attribution.tables import rows_frame

    frame = rows_frame([{"row_id": "a", "prompt": "p", "completion": "c", "tags": ["x", "y"], "meta": {"k": 1},
                         "n": 3}], "train_id")
    assert frame.loc[0, "tags"] == '["x", "y"]' and frame.loc[0, "meta"] == '{"k": 1}' and frame.loc[0, "n"] == 3
