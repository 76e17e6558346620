"""The planted-copy audit's arithmetic on small matrices with known answers (no model)."""

import numpy as np

from playpen_attribution.validation import choose_planted, copy_ranks

QUERIES = ["q0", "q1"]
TRAIN = ["t0", "t1", "t2", "t3"]


def test_rank_is_one_plus_the_rows_scoring_higher():
    per_query = np.array([[0.1, 0.5, 0.3, np.nan],
                          [0.9, 0.2, 0.4, 0.8]])
    copies = np.array([[0.6, 0.0], [0.0, 0.85]])  # [queries, copies]
    rows = copy_ranks(per_query, QUERIES, TRAIN, copies, ["q0", "q1"], ["planted-q0", "planted-q1"], {})
    assert [r["rank"] for r in rows] == [1, 2]
    assert [r["of"] for r in rows] == [4, 5]  # the unscored (NaN) row does not count
    assert rows[1]["best_other_train_id"] == "t0" and rows[1]["best_other_score"] == 0.9


def test_verbatim_duplicates_already_in_training_are_left_out():
    per_query = np.array([[1.0, 0.5, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0]])
    copies = np.array([[0.99], [0.0]])
    plain = copy_ranks(per_query, QUERIES, TRAIN, copies, ["q0"], ["planted-q0"], {})
    assert plain[0]["rank"] == 2  # t0 is an existing copy of q0 and scores a hair higher
    fair = copy_ranks(per_query, QUERIES, TRAIN, copies, ["q0"], ["planted-q0"], {"q0": {"t0"}})
    assert fair[0]["rank"] == 1 and fair[0]["of"] == 4 and fair[0]["duplicates_left_out"] == 1


def test_a_flipped_sign_shows_as_a_last_place_copy():
    rng = np.random.default_rng(0)
    per_query = rng.normal(size=(2, 4))
    copies = np.array([[-5.0], [0.0]])  # what a sign error does to a copy's self-influence
    rows = copy_ranks(per_query, QUERIES, TRAIN, copies, ["q0"], ["planted-q0"], {})
    assert rows[0]["rank"] == rows[0]["of"] == 5


def test_planted_queries_are_drawn_with_the_seed_in_query_order():
    ids = [f"q{i}" for i in range(30)]
    first = choose_planted(ids, 5, seed=0)
    assert first == choose_planted(ids, 5, seed=0) and first == sorted(first, key=ids.index)
    assert choose_planted(ids, 5, seed=1) != first
    assert choose_planted(ids[:3], 5, seed=0) == ids[:3]


def test_lds_subsets_are_stable_when_more_are_added():
    from playpen_attribution.validation import lds_batches, lds_subset_rows

    ids = [f"t{i}" for i in range(40)]
    first = [lds_subset_rows(ids, s, 0.5, seed=3) for s in range(4)]
    assert all(len(rows) == 20 and rows == sorted(rows, key=ids.index) for rows in first)
    assert first == [lds_subset_rows(ids, s, 0.5, seed=3) for s in range(4)]
    assert len({tuple(rows) for rows in first}) == 4 and lds_subset_rows(ids, 0, 0.5, seed=4) != first[0]
    assert lds_batches(20, 8) == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    assert lds_batches(24, 8)[:2] == lds_batches(20, 8)[:2]  # more subsets only extend the last job


def test_lds_of_the_true_additive_effects_is_one():
    from playpen_attribution.validation import lds_scores

    rng = np.random.default_rng(0)
    effects = rng.normal(size=(3, 30))  # [queries, train rows]: each row's true effect on each query
    membership = (rng.random((12, 30)) < 0.5).astype(float)
    actual = membership @ effects.T  # an exactly additive world
    np.testing.assert_allclose(lds_scores(effects, membership, actual), 1.0)
    np.testing.assert_allclose(lds_scores(-effects, membership, actual), -1.0)
    noisy = lds_scores(effects + rng.normal(scale=3.0, size=effects.shape), membership, actual)
    assert (noisy < 1).all()


def test_lds_refuses_losses_of_other_queries(tmp_path):
    import json

    import pandas as pd
    import pytest

    from playpen_attribution.validation import lds_stage

    pd.DataFrame({"query_id": ["q0", "q1"], "prompt": "p", "completion": "c"}).to_csv(tmp_path / "query.csv",
                                                                                      index=False)
    pd.DataFrame({"train_id": TRAIN, "prompt": "p", "completion": "c"}).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "losses.json").write_text(json.dumps({"query_ids": ["q0", "q9"], "subsets": {}}))
    with pytest.raises(ValueError, match=r"losses\.json holds losses of other queries than .*query\.csv; rerun lds_losses"):
        lds_stage(tmp_path / "query.csv", tmp_path / "train.csv", tmp_path / "influences.csv", tmp_path / "losses.json",
                  tmp_path / "lds.csv", tmp_path / "per_query.csv", random_seed=0)
    assert not (tmp_path / "lds.csv").exists()
