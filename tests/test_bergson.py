"""Bergson attribution: cosines equal independent gradients, reduced = mean of per-query, shards, planted
copies, preconditioners that change the scores, and a crashed score job that leaves nothing behind."""

import datasets
import numpy as np
import pytest

from playpen_attribution import bergson_attribution as ba
from playpen_attribution.tables import load_shards

from conftest import independent_gradients

SETTINGS = {"aggregation": "mean", "projection_dim": 0, "precision": "fp32", "token_batch_size": 512,
            "fisher": "empirical", "damping_factor": 0.1, "mix_downweight_components": 1000, "seed": 0}
PLANTED = [0, 3]  # queries whose copies are among the scored training rows


@pytest.fixture(scope="module")
def small(demo_tokens, tmp_path_factory):
    """6 queries; 30 training rows plus copies (new ids) of two queries, as save_to_disk folders."""
    root = tmp_path_factory.mktemp("bergson-tokens")
    query = datasets.load_from_disk(str(demo_tokens / "query")).select(range(6))
    train = datasets.load_from_disk(str(demo_tokens / "train")).select(range(30))
    copies = query.select(PLANTED).map(lambda row: {"row_id": "copy-of-" + row["row_id"]})
    query.save_to_disk(str(root / "query"))
    datasets.concatenate_datasets([train, copies]).save_to_disk(str(root / "train"))
    return root


@pytest.fixture(scope="module")
def prepared(demo_adapter, small, tmp_path_factory):
    """Per-query gradients and the three preconditioners, built once."""
    root = tmp_path_factory.mktemp("bergson")
    ba.query_gradients_stage(demo_adapter, small / "query", root / "per_query", SETTINGS)
    for side in ("train", "query"):
        ba.hessian_stage(demo_adapter, small / side, root / "hessian" / side, SETTINGS)
    ba.mix_stage(root / "hessian/query", root / "hessian/train", root / "hessian/mixed", SETTINGS)
    return root


def score(demo_adapter, small, prepared, variant, out, shard=0, shards=1):
    """Reduce (once per variant) and score one shard; returns the shard file's path."""
    _, side = ba.parse_variant(variant)
    hessian = prepared / "hessian" / side if side else None
    reduced = prepared / "reduced" / variant
    if not reduced.exists():
        ba.reduce_stage(demo_adapter, small / "query", reduced, variant, hessian, SETTINGS)
    ba.score_shard_stage(demo_adapter, small / "train", small / "query", reduced, prepared / "per_query", hessian,
                         out, variant=variant, shard=shard, shards=shards, settings=SETTINGS)
    return out


def test_cosine_scores_equal_independent_gradient_cosines(demo_adapter, small, prepared, tmp_path):
    result = load_shards([score(demo_adapter, small, prepared, "cosine", tmp_path / "cosine.npz")])
    query, train = datasets.load_from_disk(str(small / "query")), datasets.load_from_disk(str(small / "train"))
    g_query, _, _ = independent_gradients(demo_adapter, query)
    g_train, _, _ = independent_gradients(demo_adapter, train)
    unit = lambda g: (g / g.norm(dim=1, keepdim=True)).double()  # noqa: E731
    expected = (unit(g_query) @ unit(g_train).T).numpy()
    assert result["query_ids"] == list(query["row_id"]) and result["train_ids"] == list(train["row_id"])
    np.testing.assert_allclose(result["scores"], expected, atol=2e-4)
    # the reduced query (mean of unit query gradients) scores each row by the mean of its cosines
    np.testing.assert_allclose(result["reduced"], expected.mean(axis=0), atol=2e-4)


@pytest.mark.parametrize("variant", ["dot_train", "cosine_mixed"])
def test_reduced_scores_are_the_mean_of_per_query_scores(demo_adapter, small, prepared, tmp_path, variant):
    result = load_shards([score(demo_adapter, small, prepared, variant, tmp_path / "s.npz")])
    scale = np.abs(result["scores"]).max()
    np.testing.assert_allclose(result["reduced"], result["scores"].mean(axis=0), rtol=1e-4, atol=1e-5 * scale)


def test_shards_merged_equal_one_unsharded_run(demo_adapter, small, prepared, tmp_path):
    whole = load_shards([score(demo_adapter, small, prepared, "cosine_train", tmp_path / "all.npz")])
    merged = load_shards([score(demo_adapter, small, prepared, "cosine_train", tmp_path / f"shard-{i}.npz", i, 3)
                          for i in range(3)])
    assert merged["train_ids"] == whole["train_ids"] and merged["query_ids"] == whole["query_ids"]
    np.testing.assert_allclose(merged["scores"], whole["scores"], atol=1e-6)
    np.testing.assert_allclose(merged["reduced"], whole["reduced"], atol=1e-6)


def test_planted_copy_ranks_first_and_preconditioners_change_the_scores(demo_adapter, small, prepared, tmp_path):
    results = {v: load_shards([score(demo_adapter, small, prepared, v, tmp_path / f"{v}.npz")])
               for v in ("cosine", "cosine_train", "cosine_query", "cosine_mixed")}
    for variant, result in results.items():
        for q in PLANTED:
            top = result["train_ids"][int(np.argmax(result["scores"][q]))]
            assert top == "copy-of-" + result["query_ids"][q], (variant, q, top)
    plain = results["cosine"]["scores"]
    for variant in ("cosine_train", "cosine_query", "cosine_mixed"):
        assert np.abs(results[variant]["scores"] - plain).max() > 0.05, variant
    assert np.abs(results["cosine_mixed"]["scores"] - results["cosine_train"]["scores"]).max() > 0.01


def test_a_crashed_score_job_leaves_nothing_and_the_rerun_succeeds(demo_adapter, small, prepared, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "scores" / "shard-0.npz"
    real_savez = np.savez

    def crash_midway(handle, **arrays):
        handle.write(b"PK\x03\x04 half an archive")
        raise OSError("simulated crash while writing the scores")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(OSError, match="simulated crash"):
        score(demo_adapter, small, prepared, "cosine", out)
    assert list(out.parent.iterdir()) == []  # no partial file, no temporary left behind
    monkeypatch.setattr(np, "savez", real_savez)
    result = load_shards([score(demo_adapter, small, prepared, "cosine", out)])
    assert result["scores"].shape == (6, 32) and np.isfinite(result["scores"]).all()


def test_unknown_variant_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="expected dot or cosine, optionally followed by _train, _query or _mixed"):
        ba.parse_variant("cosine_both")
