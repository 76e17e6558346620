"""Kronfluence influence scores: exact against independent gradients, the sign, per-token sums,
planted copies, shards, factor provenance."""

import shutil

import datasets
import numpy as np
import pytest
import torch

from playpen_attribution.influence import FactorsError, fit_factors, score_pairs, score_shard_stage
from playpen_attribution.scores import per_token_lists
from playpen_attribution.settings import KronfluenceScoring
from playpen_attribution.tables import load_shards

from conftest import independent_gradients


@pytest.fixture(scope="module")
def tokens(demo_tokens):
    return datasets.load_from_disk(str(demo_tokens / "query")), datasets.load_from_disk(str(demo_tokens / "train"))


@pytest.fixture(scope="module")
def factors(demo_adapter, demo_tokens, tmp_path_factory):
    root = tmp_path_factory.mktemp("factors")
    return {s: fit_factors(str(demo_adapter), demo_tokens / "train", root / s, strategy=s, modules="lora") and root / s
            for s in ("identity", "kfac", "ekfac")}


def test_identity_scores_are_exact_gradient_dot_products(demo_adapter, factors, tokens):
    query, train = tokens
    query, train = query.select(range(4)), train.select(range(10))
    scores = score_pairs(str(demo_adapter), factors["identity"], query, train)["scores"]
    g_query, _, _ = independent_gradients(demo_adapter, query)
    g_train, _, _ = independent_gradients(demo_adapter, train)
    expected = (g_query.double() @ g_train.double().T).numpy()
    assert scores.shape == (4, 10)
    np.testing.assert_allclose(scores, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_and_ekfac_tend_to_gradient_dot_products_over_damping_as_damping_grows(demo_adapter, factors, tokens,
                                                                                    strategy):
    """(F + lambda I)^-1 -> I / lambda: with damping far above every factor eigenvalue, damping x score equals the exact
    gradient dot product; with the fitted curvature (small damping) it does not, so the factors are applied."""
    query, train = tokens
    query, train = query.select(range(4)), train.select(range(10))
    g_query, _, _ = independent_gradients(demo_adapter, query)
    g_train, _, _ = independent_gradients(demo_adapter, train)
    expected = (g_query.double() @ g_train.double().T).numpy()
    # 1e5 x the largest squared per-row gradient norm: far above the factors' eigenvalues
    damping = 1e5 * float(g_train.double().pow(2).sum(dim=1).max())
    large = score_pairs(str(demo_adapter), factors[strategy], query, train, damping_factor=damping)["scores"]
    np.testing.assert_allclose(large * damping, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    small = score_pairs(str(demo_adapter), factors[strategy], query, train, damping_factor=None)["scores"]
    cosine = (small * expected).sum() / np.linalg.norm(small) / np.linalg.norm(expected)
    # (0.68 for K-FAC, 0.63 for EK-FAC here) the curvature changes the scores' direction, not only their scale
    assert cosine < 0.95, cosine


def test_sign_one_sgd_step_on_the_top_row_lowers_the_query_loss(demo_adapter, factors, tokens):
    query, train = tokens
    query, train = query.select([0]), train.select(range(40))
    scores = score_pairs(str(demo_adapter), factors["identity"], query, train)["scores"][0]

    def loss_after_step(train_index, lr):
        g_train, model, params = independent_gradients(demo_adapter, train.select([train_index]))
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= lr * g_train[0, offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            ids, labels = torch.tensor([query[0]["input_ids"]]), torch.tensor(query[0]["labels"])
            logits = model(input_ids=ids).logits[0]
            keep = labels[1:] != -100
            return torch.nn.functional.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum").item()

    base = loss_after_step(0, 0.0)
    for index, direction in ((int(scores.argmax()), -1), (int(scores.argmin()), +1)):
        lr = 1e-3 / abs(scores[index])  # a step small enough for the first-order prediction to hold
        predicted = -lr * scores[index]
        actual = loss_after_step(index, lr) - base
        assert np.sign(actual) == direction
        assert actual == pytest.approx(predicted, rel=0.2)


def test_per_token_scores_sum_to_the_total(demo_adapter, factors, tokens):
    query, train = tokens
    query, train = query.select(range(3)), train.select(range(12))
    total = score_pairs(str(demo_adapter), factors["ekfac"], query, train)["scores"]
    result = score_pairs(str(demo_adapter), factors["ekfac"], query, train, per_token=True)
    lists = per_token_lists(result["per_token"], [len(x) for x in train["input_ids"]])
    assert [len(t) for t in lists[0]] == [len(x) for x in train["input_ids"]]
    sums = np.array([[sum(t) for t in per_query] for per_query in lists])
    np.testing.assert_allclose(sums, total, rtol=1e-4, atol=1e-4 * np.abs(total).max())


def test_planted_copy_of_a_query_is_in_the_top_3_for_ekfac(demo_adapter, factors, tokens):
    query, train = tokens
    planted = [0, 5, 11]
    copies = query.select(planted).map(lambda row: {"row_id": "copy-of-" + row["row_id"]})
    scored = datasets.concatenate_datasets([train, copies])  # scored, not trained on; factors not refitted
    scores = score_pairs(str(demo_adapter), factors["ekfac"], query, scored)["scores"]
    for q in planted:
        top3 = [scored[int(i)]["row_id"] for i in np.argsort(-scores[q])[:3]]
        assert "copy-of-" + query[q]["row_id"] in top3, top3


def test_shards_and_query_batches_merged_equal_one_unsharded_single_batch_run(demo_adapter, factors, tokens,
                                                                             tmp_path):
    query, train = tokens
    query.select(range(11)).save_to_disk(str(tmp_path / "query"))
    train.select(range(30)).save_to_disk(str(tmp_path / "train"))
    common = dict(model_dir=demo_adapter, factors_dir=factors["ekfac"], query_tokens_dir=tmp_path / "query",
                  train_tokens_dir=tmp_path / "train")

    def settings(query_batch_size):
        return KronfluenceScoring(train_batch_size=8, query_batch_size=query_batch_size, query_gradient_rank=None,
                                  query_batches_per_pass=1, per_token_scores=False, per_token_max_gb=4.0,
                                  dtype="float32", damping_factor=1e-8)

    score_shard_stage(out_path=tmp_path / "all.npz", shard=0, shards=1, settings=settings(None), **common)
    for i in range(3):  # 11 queries in batches of 5: the last batch is partial
        score_shard_stage(out_path=tmp_path / f"shard-{i}.npz", shard=i, shards=3, settings=settings(5), **common)
    merged = load_shards([tmp_path / f"shard-{i}.npz" for i in range(3)])
    whole = load_shards([tmp_path / "all.npz"])
    assert merged["train_ids"] == whole["train_ids"] and merged["query_ids"] == whole["query_ids"]
    np.testing.assert_allclose(merged["scores"], whole["scores"], rtol=1e-5, atol=1e-6 * np.abs(whole["scores"]).max())


def test_same_inputs_give_the_same_factors(demo_adapter, tokens, tmp_path):
    from safetensors.torch import load_file

    _, train = tokens
    train.select(range(16)).save_to_disk(str(tmp_path / "rows"))
    for name in ("first", "again"):
        fit_factors(str(demo_adapter), tmp_path / "rows", tmp_path / name, strategy="ekfac", modules="lora")
    originals = sorted((tmp_path / "first" / "influence").rglob("*.safetensors"))
    assert len(originals) >= 5  # covariances, eigenvectors, eigenvalues, lambdas, ...
    for original in originals:
        a, b = load_file(original), load_file(tmp_path / "again" / original.relative_to(tmp_path / "first"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), original.name


def test_factors_from_another_model_are_refused(demo_adapter, factors, tokens, tmp_path):
    from safetensors.torch import load_file, save_file

    query, train = tokens
    other = tmp_path / "other"  # the same adapter with one weight changed: another model
    shutil.copytree(demo_adapter, other)
    weights = load_file(other / "adapter_model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, other / "adapter_model.safetensors")
    # a local model is known by its weights (not its path, so a moved project keeps its factors)
    with pytest.raises(FactorsError, match=r"fitted on a different model:\n  weights_hash: factors have '\w+', "
                                           r"the model has '\w+'"):
        score_pairs(str(other), factors["ekfac"], query.select([0]), train.select([0]))
    moved = tmp_path / "moved-adapter"
    shutil.copytree(demo_adapter, moved)
    assert score_pairs(str(moved), factors["ekfac"], query.select([0]), train.select([0]))["scores"].shape == (1, 1)


def test_missing_or_incomplete_factors_are_refused(demo_adapter, factors, tokens, tmp_path):
    import shutil

    query, train = tokens
    with pytest.raises(FactorsError, match="does not exist; run fit-hessians first"):
        score_pairs(str(demo_adapter), tmp_path / "nowhere", query, train)
    broken = tmp_path / "broken"
    shutil.copytree(factors["ekfac"], broken)
    (broken / "metadata.json").unlink()
    with pytest.raises(FactorsError, match="not a complete factors folder"):
        score_pairs(str(demo_adapter), broken, query, train)
    shutil.copytree(factors["ekfac"], tmp_path / "partial")
    shutil.rmtree(next((tmp_path / "partial" / "influence").iterdir()))
    with pytest.raises(FactorsError, match="missing or incomplete"):
        score_pairs(str(demo_adapter), tmp_path / "partial", query, train)


@pytest.mark.parametrize("strategy", ["identity", "kfac", "ekfac"])
def test_one_pass_over_the_training_rows_gives_the_scores_of_one_pass_per_query_batch(demo_adapter, factors, tokens,
                                                                                     strategy):
    """Kronfluence's query_gradient_accumulation_steps keeps the preconditioned gradients of every query batch and
    streams the training rows once; the scores (per-token ones too) are those of one pass per batch. Measured
    here: max relative difference 0 (the same products, grouped differently)."""
    from playpen_attribution.influence import query_passes

    query, train = tokens
    query, train = query.select(range(7)), train.select(range(8))
    groups = (None, 1, 3) if strategy == "ekfac" else (None, 1)  # 3: two passes, the second over a partial group
    runs = {per_pass: score_pairs(str(demo_adapter), factors[strategy], query, train, query_batch_size=2,
                                  query_batches_per_pass=per_pass, per_token=True, damping_factor=None)
            for per_pass in groups}
    assert [query_passes(7, 2, p) for p in runs] == [1, 4, 2][:len(groups)]
    reference = runs[1]
    for per_pass in set(groups) - {1}:
        for key in ("scores", "per_token"):
            np.testing.assert_allclose(runs[per_pass][key], reference[key], rtol=1e-5,
                                       atol=1e-6 * np.abs(reference[key]).max())


def test_the_pass_count_does_not_grow_with_the_queries():
    from playpen_attribution.influence import query_passes

    assert [query_passes(q, 8, None) for q in (8, 32, 300)] == [1, 1, 1]
    assert [query_passes(q, 8, 1) for q in (8, 32, 300)] == [1, 4, 38]  # one per batch, as before
    assert query_passes(300, 8, 20) == 2 and query_passes(300, None, None) == 1
