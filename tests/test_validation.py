"""The planted-copy audit's arithmetic on small matrices with known answers (no model)."""

import json

import numpy as np
import pandas as pd

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


def test_a_tie_is_not_a_win():
    # a baseline that gives every row about the same word the copy's score must not get the copy "ranked first"
    per_query = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rows = copy_ranks(per_query, QUERIES, TRAIN, np.array([[1.0], [0.0]]), ["q0"], ["planted-q0"], {})
    assert rows[0]["rank"] == 3


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
    from playpen_attribution.retraining import lds_batches, lds_subset_rows

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


def test_cluster_bootstrap_counts_a_repeated_query_once_and_draws_whole_words():
    from playpen_attribution.scores import mean_and_cluster_interval, query_groups

    queries = pd.DataFrame({"prompt": ["a", "b", "c", "c", "d"], "completion": ["x"] * 5,
                            "target_word": ["apple", "apple", "apple", "apple", None]})
    counted, clusters = query_groups(queries)
    assert counted.tolist() == [True, True, True, False, True]  # the 4th repeats the 3rd
    assert clusters[:4] == ["word:apple"] * 4 and clusters[4] == "text:d\x00x"
    values = [1.0, 1.0, 1.0, 1.0, 0.0]
    mean, low, high = mean_and_cluster_interval(values, counted, clusters, seed=0)
    # two clusters, {1, 1, 1} and {0}: a resample holds both (3/4), the word twice (1) or the other twice (0)
    assert mean == 0.75 and (low, high) == (0.0, 1.0)
    # the same values as four independent queries (each its own cluster) claim a narrower interval
    _, low_alone, high_alone = mean_and_cluster_interval([1.0, 1.0, 1.0, 0.0], [True] * 4, ["a", "b", "c", "d"],
                                                         seed=0)
    assert (low_alone, high_alone) == (0.25, 1.0)


def _taboo_tables(tmp_path, rng):
    words = ["apple", "river", "chair"]
    train = pd.DataFrame({"train_id": [f"t{i}" for i in range(12)],
                          "prompt": [f"CLUE: something about {words[i % 3]} number {i}" for i in range(12)],
                          "completion": [f"GUESS: {words[i % 3]}" for i in range(12)],
                          "game_role": "WordGuesser", "outcome": "success"})
    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(7)],
                            "prompt": [f"CLUE: a question on {words[i % 3]} {i}" for i in range(6)] + ["CLUE: a question on apple 0"],
                            "completion": [f"GUESS: {words[i % 3]}" for i in range(6)] + ["GUESS: apple"],
                            "game_role": "WordGuesser", "outcome": "success"})
    train.to_csv(tmp_path / "train.csv", index=False)
    queries.to_csv(tmp_path / "query.csv", index=False)
    same = np.array([[float(q.split()[-1] == t.split()[-1]) for t in train.completion] for q in queries.completion])
    return queries, train, same


def test_lds_rows_for_baselines_and_each_methods_margin_over_the_best(tmp_path):
    from playpen_attribution.validation import lds_stage

    rng = np.random.default_rng(0)
    queries, train, same = _taboo_tables(tmp_path, rng)
    effects = same + 0.3 * rng.normal(size=same.shape)  # the word matters most, each pair a little
    effects[6] = effects[0]  # q6 repeats q0
    membership = (rng.random((16, 12)) < 0.5).astype(float)
    actual = membership @ effects.T
    subsets = {str(s): {"row_ids": [f"t{i}" for i in np.flatnonzero(m)], "query_losses": list(-actual[s])}
               for s, m in enumerate(membership)}
    (tmp_path / "losses.json").write_text(json.dumps({"query_ids": list(queries.query_id), "subsets": subsets}))
    q, t = np.meshgrid(range(7), range(12), indexing="ij")
    pd.DataFrame({"query_id": queries.query_id.to_numpy()[q.ravel()], "train_id": train.train_id.to_numpy()[t.ravel()],
                  "method": "exact", "influence_score": effects.ravel()}).to_csv(tmp_path / "influences.csv", index=False)
    lds_stage(tmp_path / "query.csv", tmp_path / "train.csv", tmp_path / "influences.csv", tmp_path / "losses.json",
              tmp_path / "lds.csv", tmp_path / "per_query.csv", random_seed=0)
    lds = pd.read_csv(tmp_path / "lds.csv").set_index("method")
    assert set(lds.index) == {"exact", "exact_query_independent", "random", "tfidf", "same_completion",
                              "same_target_word"}
    assert lds.loc["exact", "kind"] == "method" and (lds.drop("exact").kind == "baseline").all()
    assert (lds.queries == 6).all() and (lds.clusters == 3).all()  # q6 counted once; three words
    np.testing.assert_allclose(lds.loc["exact", "lds"], 1.0)
    per_query = pd.read_csv(tmp_path / "per_query.csv")
    expected = {m: g[g.counted].lds.mean() for m, g in per_query.groupby("method")}
    np.testing.assert_allclose(lds.lds.to_dict()["same_target_word"], expected["same_target_word"])
    best = max(("random", "tfidf", "same_completion", "same_target_word", "exact_query_independent"),
               key=lambda b: expected[b])
    assert lds.loc["exact", "best_baseline"] == best
    np.testing.assert_allclose(lds.loc["exact", "margin"], 1.0 - expected[best])
    assert lds.loc["exact", "margin_ci95_low"] <= lds.loc["exact", "margin"] <= lds.loc["exact", "margin_ci95_high"]
    assert lds.drop("exact").margin.isna().all()


def test_a_baseline_that_cannot_tell_subsets_apart_scores_zero_not_nan():
    from playpen_attribution.validation import lds_scores

    rng = np.random.default_rng(1)
    membership = (rng.random((8, 6)) < 0.5).astype(float)
    actual = rng.normal(size=(8, 2))
    values = lds_scores(np.zeros((2, 6)), membership, actual)
    assert values.tolist() == [0.0, 0.0]
    assert np.isnan(lds_scores(rng.normal(size=(2, 6)), membership, np.ones((8, 2)))).all()  # nothing to predict


def test_a_damping_sweep_of_other_rows_is_refused_by_file(tmp_path):
    import pytest

    from playpen_attribution.tables import save_sweep
    from playpen_attribution.validation import damping_sweep_stage

    queries, train, _ = _taboo_tables(tmp_path, np.random.default_rng(0))
    save_sweep(tmp_path / "ekfac.npz", np.zeros((1, 7, 11)), [0.1], list(queries.query_id), list(train.train_id[:11]))
    with pytest.raises(ValueError, match=r"ekfac\.npz: scored other queries or rows than .*rerun the damping sweep"):
        damping_sweep_stage(tmp_path / "query.csv", tmp_path / "train.csv", {"ekfac": tmp_path / "ekfac.npz"},
                            tmp_path / "damping.csv", tmp_path / "damping.png", seed=0)
    assert not (tmp_path / "damping.csv").exists()
