"""Ensembles of adapters: TRAK through Bergson's pipeline (a planted copy first, the ensemble equal to its members'
scores combined as TRAK combines them, the planted copies leaving the training rows' scores alone) and the mean of
members' score shards that every Kronfluence strategy uses."""

import datasets
import numpy as np
import pytest

from playpen_attribution import bergson_attribution as ba
from playpen_attribution.ensemble import mean_of_member_shards
from playpen_attribution.settings import BergsonTrak
from playpen_attribution.tables import load_sweep, save_shard, save_sweep

from conftest import train_demo_adapter

# 1 - p in batches of 5 rows of different lengths: a row's 1 - p must not depend on its batch's padding
TRAK_SETTINGS = {"precision": "fp32", "trak_projection_dim": 64, "trak_loss_batch_size": 5, "token_batch_size": 512,
                 "damping_factor": 0.1,
                 "seed": 0}
PLANTED = [0, 3]  # queries with a copy among the scored rows


@pytest.fixture(scope="module")
def rows(demo_tokens, tmp_path_factory):
    """6 queries, 24 training rows, and copies (new ids) of two queries kept apart as the planted rows."""
    root = tmp_path_factory.mktemp("trak-tokens")
    query = datasets.load_from_disk(str(demo_tokens / "query")).select(range(6))
    query.save_to_disk(str(root / "query"))
    datasets.load_from_disk(str(demo_tokens / "train")).select(range(24)).save_to_disk(str(root / "train"))
    query.select(PLANTED).map(lambda row: {"row_id": "copy-of-" + row["row_id"]}).save_to_disk(str(root / "planted"))
    return root


@pytest.fixture(scope="module")
def second_member(tiny_model_dir, demo_tokens, tmp_path_factory):
    """The demo adapter's training with the next seed: ensemble member 1."""
    return train_demo_adapter(tiny_model_dir, demo_tokens, tmp_path_factory.mktemp("member-1") / "adapter", seed=1)


def trak(models, rows, out, planted=True, **overrides):
    ba.trak_stage(models, rows / "train", rows / "query", out, BergsonTrak(**{**TRAK_SETTINGS, **overrides}),
                  planted_tokens_dir=rows / "planted" if planted else None)
    return out


def one_minus_p(adapter, tokens_dir):
    """1 - the mean probability of each row's label tokens under the adapter, by our own forward pass: TRAK's
    per-row weight, computed without Bergson."""
    import torch
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    weights = []
    with torch.no_grad():
        for row in datasets.load_from_disk(str(tokens_dir)):
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"][1:])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            keep = labels != -100
            weights.append(1 - logp[keep].gather(-1, labels[keep, None]).exp().mean().item())
    return np.array(weights)


@pytest.fixture(scope="module")
def single(demo_adapter, rows, tmp_path_factory):
    return trak([demo_adapter], rows, tmp_path_factory.mktemp("trak-single") / "trak")


def test_trak_ranks_each_planted_copy_first_and_reduces_to_the_mean_of_its_queries(single):
    train, planted = (np.load(single / name) for name in (ba.TRAK_SCORES, ba.TRAK_PLANTED))
    assert list(planted["train_ids"]) == [f"copy-of-{q}" for q in np.asarray(train["query_ids"])[PLANTED]]
    for copy, query in enumerate(PLANTED):
        rivals = np.concatenate([train["scores"][query], np.delete(planted["scores"][query], copy)])
        assert planted["scores"][query, copy] > rivals.max()
    np.testing.assert_allclose(train["reduced"], train["scores"].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.isfinite(train["scores"]).all() and train["scores"].shape == (6, 24)


def test_planted_copies_leave_the_training_rows_scores_alone(demo_adapter, rows, single, tmp_path):
    """The Gram is fitted on the training rows only, so scoring the copies beside them changes nothing."""
    alone = np.load(trak([demo_adapter], rows, tmp_path / "trak", planted=False) / ba.TRAK_SCORES)
    np.testing.assert_allclose(np.load(single / ba.TRAK_SCORES)["scores"], alone["scores"], rtol=1e-4,
                               atol=1e-5 * np.abs(alone["scores"]).max())
    assert not (tmp_path / "trak" / ba.TRAK_PLANTED).exists()


def test_an_ensembles_scores_are_its_members_scores_combined_as_trak_combines_them(demo_adapter, second_member, rows,
                                                                                  single, tmp_path):
    """TRAK's ensemble (Park et al. 2023, eq. 13; Bergson's reference): the mean over members of each member's
    Gram-whitened scores, times the members' mean 1 - p. A member's scores alone are its whitened scores times its
    own 1 - p (member i projects with seed + i), so the ensemble follows from the members' scores and our own 1 - p."""
    ensemble = np.load(trak([demo_adapter, second_member], rows, tmp_path / "ensemble") / ba.TRAK_SCORES)
    member_1 = np.load(trak([second_member], rows, tmp_path / "member-1", seed=1) / ba.TRAK_SCORES)
    weights = [one_minus_p(a, rows / "train") for a in (demo_adapter, second_member)]
    whitened = [np.load(single / ba.TRAK_SCORES)["scores"] / weights[0], member_1["scores"] / weights[1]]
    expected = np.mean(whitened, axis=0) * np.mean(weights, axis=0)
    np.testing.assert_allclose(ensemble["scores"], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    # and the members differ, so the test can tell an ensemble from either member
    assert np.abs(member_1["scores"] - np.load(single / ba.TRAK_SCORES)["scores"]).max() > 0.05 * np.abs(expected).max()


def test_trak_shards_split_the_scores_without_changing_them(single, tmp_path):
    parts = [tmp_path / f"shard-{s}.npz" for s in range(3)]
    for s, part in enumerate(parts):
        ba.trak_shard_stage(single, part, shard=s, shards=3)
    whole = np.load(single / ba.TRAK_SCORES)
    np.testing.assert_array_equal(np.concatenate([np.load(p)["scores"] for p in parts], axis=1), whole["scores"])
    assert [t for p in parts for t in np.load(p)["train_ids"]] == list(whole["train_ids"])


def test_the_ensemble_mean_of_score_shards_is_the_mean_of_its_members(tmp_path):
    rng = np.random.default_rng(0)
    members = []
    for k in range(3):
        path = tmp_path / f"member-{k}.npz"
        save_shard(path, rng.normal(size=(4, 5)), list("abcd"), list("vwxyz"), per_token=rng.normal(size=(4, 5, 7)),
                   reduced=rng.normal(size=5))
        members.append(path)
    mean_of_member_shards(members, tmp_path / "mean.npz")
    mean, loaded = np.load(tmp_path / "mean.npz"), [np.load(p) for p in members]
    for key in ("scores", "per_token", "reduced"):
        np.testing.assert_allclose(mean[key], np.mean([m[key] for m in loaded], axis=0), rtol=1e-6, atol=1e-6)  # float32
    assert list(mean["train_ids"]) == list("vwxyz") and list(mean["query_ids"]) == list("abcd")


def test_the_ensemble_mean_of_damping_sweeps_is_the_mean_at_each_factor_and_other_factors_are_refused(tmp_path):
    """A damping sweep's scores [factors, queries, rows] average member by member at each factor; a member swept at
    other factors is refused by name (its mean would mix dampings)."""
    rng = np.random.default_rng(1)
    members = []
    for k in range(3):
        save_sweep(tmp_path / f"member-{k}.npz", rng.normal(size=(3, 2, 4)), [0.01, 0.1, 1.0], ["q1", "q2"],
                   ["r1", "r2", "r3", "copy-of-q1"])
        members.append(tmp_path / f"member-{k}.npz")
    mean_of_member_shards(members, tmp_path / "mean.npz")
    mean, loaded = load_sweep(tmp_path / "mean.npz"), [load_sweep(p) for p in members]
    np.testing.assert_allclose(mean["scores"], np.mean([m["scores"] for m in loaded], axis=0), rtol=1e-6, atol=1e-6)
    assert mean["damping"] == [0.01, 0.1, 1.0] and mean["row_ids"][-1] == "copy-of-q1" and mean["query_ids"] == ["q1", "q2"]
    save_sweep(tmp_path / "other.npz", np.zeros((3, 2, 4)), [0.01, 0.1, 10.0], ["q1", "q2"],
               ["r1", "r2", "r3", "copy-of-q1"])
    with pytest.raises(ValueError, match="other.npz holds other damping factors"):
        mean_of_member_shards([members[0], tmp_path / "other.npz"], tmp_path / "refused.npz")
    assert not (tmp_path / "refused.npz").exists()


def test_members_scored_on_other_rows_are_refused_by_name(tmp_path):
    save_shard(tmp_path / "a.npz", np.zeros((1, 2)), ["q"], ["r1", "r2"])
    save_shard(tmp_path / "b.npz", np.zeros((1, 2)), ["q"], ["r1", "r3"])
    with pytest.raises(ValueError, match="b.npz"):
        mean_of_member_shards([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "mean.npz")
    assert not (tmp_path / "mean.npz").exists()


def test_bergsons_score_store_is_read_as_written_and_a_short_or_partial_one_refused(tmp_path):
    """TRAK's scores come back through Bergson's own store (written here by Bergson's own writer): exactly the
    [queries, rows] it holds; a store with other counts, or with a row never written (read back as 0), is refused."""
    import torch
    from bergson.score.score_writer import MemmapSequenceScoreWriter

    scores = np.arange(15, dtype=np.float32).reshape(5, 3) - 7.0  # [rows, queries], as Bergson writes them
    writer = MemmapSequenceScoreWriter(tmp_path / "full", num_items=5, num_scores=3, distributed=False)
    writer(list(range(5)), torch.from_numpy(scores))
    writer.flush()
    assert np.array_equal(ba.read_score_store(tmp_path / "full", queries=3, rows=5), scores.T)
    with pytest.raises(ValueError, match=r"3 x 5 per-row scores where 3 queries x 6 rows"):
        ba.read_score_store(tmp_path / "full", queries=3, rows=6)
    with pytest.raises(ValueError, match=r"3 x 5 .* where 2 queries x 5 rows"):
        ba.read_score_store(tmp_path / "full", queries=2, rows=5)
    partial = MemmapSequenceScoreWriter(tmp_path / "partial", num_items=5, num_scores=3, distributed=False)
    partial([0, 1, 3, 4], torch.from_numpy(scores[[0, 1, 3, 4]]))
    partial.flush()
    with pytest.raises(ValueError, match="unwritten"):
        ba.read_score_store(tmp_path / "partial", queries=3, rows=5)
