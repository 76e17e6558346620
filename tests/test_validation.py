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


def run_lds_stage(tmp_path, queries, train, subsets, effects, methods=None):
    """lds_stage on these retrains' losses and the method "exact" scoring every pair with `effects` (or each method
    of `methods`, {name: effects}); lds.csv."""
    from playpen_attribution.validation import lds_stage

    (tmp_path / "losses.json").write_text(json.dumps({"query_ids": list(queries.query_id), "subsets": subsets}))
    q, t = np.meshgrid(range(len(queries)), range(len(train)), indexing="ij")
    pd.concat([pd.DataFrame({"query_id": queries.query_id.to_numpy()[q.ravel()],
                             "train_id": train.train_id.to_numpy()[t.ravel()], "method": name,
                             "influence_score": scores.ravel()})
               for name, scores in (methods or {"exact": effects}).items()]).to_csv(tmp_path / "influences.csv",
                                                                                     index=False)
    lds_stage(tmp_path / "query.csv", tmp_path / "train.csv", tmp_path / "influences.csv", tmp_path / "losses.json",
              tmp_path / "lds.csv", tmp_path / "per_query.csv", random_seed=0)
    return pd.read_csv(tmp_path / "lds.csv").set_index("method")


def test_lds_rows_for_baselines_and_each_methods_margin_over_the_best(tmp_path):
    rng = np.random.default_rng(0)
    queries, train, same = _taboo_tables(tmp_path, rng)
    effects = same + 0.3 * rng.normal(size=same.shape)  # the word matters most, each pair a little
    effects[6] = effects[0]  # q6 repeats q0
    membership = (rng.random((16, 12)) < 0.5).astype(float)
    actual = membership @ effects.T
    subsets = {str(s): {"row_ids": [f"t{i}" for i in np.flatnonzero(m)], "query_losses": list(-actual[s])}
               for s, m in enumerate(membership)}
    lds = run_lds_stage(tmp_path, queries, train, subsets, effects)
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


def test_noise_ceiling_is_an_explicit_split_half_spearman_brown_and_near_one_for_identical_repeats():
    from scipy.stats import spearmanr

    from playpen_attribution.validation import split_half_agreement

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(20, 3))  # [subsets, queries]: what the data does
    identical = np.stack([truth] * 4)
    np.testing.assert_allclose(split_half_agreement(identical), 1.0)
    # two repeats: one split, rho between them, stepped up by 2 rho / (1 + rho)
    noisy = truth + rng.normal(scale=[[0.3, 1.0, 3.0]], size=(2, 20, 3))
    rho = np.array([spearmanr(noisy[0, :, q], noisy[1, :, q]).statistic for q in range(3)])
    np.testing.assert_allclose(split_half_agreement(noisy), 2 * rho / (1 + rho))
    # four repeats: the three splits {0,1|2,3}, {0,2|1,3}, {0,3|1,2}, averaged, stepped up with n = 2
    four = truth + rng.normal(scale=1.0, size=(4, 20, 3))
    splits = [([0, 1], [2, 3]), ([0, 2], [1, 3]), ([0, 3], [1, 2])]
    rho4 = np.array([np.mean([spearmanr(four[a, :, q].mean(0), four[b, :, q].mean(0)).statistic
                              for a, b in splits]) for q in range(3)])
    np.testing.assert_allclose(split_half_agreement(four), 2 * rho4 / (1 + rho4))
    # the noisier the query's repeats, the lower its ceiling; one repeat: unknown, not faked
    many = truth + rng.normal(scale=[[0.3, 1.0, 3.0]], size=(8, 20, 3))
    ceiling = split_half_agreement(many)
    assert ceiling[0] > ceiling[1] > ceiling[2]
    assert np.isnan(split_half_agreement(noisy[:1])).all()


def test_lds_losses_average_each_subsets_repeats_and_keep_them(tmp_path, monkeypatch):
    import datasets

    import playpen_attribution.scores as scores
    from playpen_attribution.validation import lds_losses_stage, read_lds_losses

    datasets.Dataset.from_dict({"row_id": ["q0", "q1"], "input_ids": [[1, 2], [3, 4]]}).save_to_disk(
        str(tmp_path / "query"))
    # two repeats of one job holding subsets 0 and 1; each adapter's "losses" are known numbers
    known = {("0", 0): [1.0, 2.0], ("1", 0): [3.0, 4.0], ("0", 1): [2.0, 5.0], ("1", 1): [1.0, 1.0]}
    dirs = []
    for repeat in (1, 0):  # the order of the folders does not matter
        folder = tmp_path / f"repeat-{repeat}" / "retrain-0"
        folder.mkdir(parents=True)
        (folder / "subsets.json").write_text(json.dumps({
            "fraction": 0.5, "seed": 0, "repeat": repeat, "training_seed": 42 + repeat,
            "subsets": {"0": ["t0", "t1"], "1": ["t2", "t3"]}}))
        dirs.append(folder)
    monkeypatch.setattr(scores, "query_losses",
                        lambda adapter, query, dtype: known[(adapter.split("subset-")[1], int(adapter.split("repeat-")[1][0]))])
    lds_losses_stage(dirs, tmp_path / "query", tmp_path / "losses.json", dtype="float32")
    record = json.loads((tmp_path / "losses.json").read_text())
    assert record["subsets"]["0"] == {"row_ids": ["t0", "t1"], "query_losses": [1.5, 3.5],
                                      "repeat_losses": [[1.0, 2.0], [2.0, 5.0]], "training_seeds": [42, 43]}
    assert record["subsets"]["1"]["query_losses"] == [2.0, 2.5]
    pd.DataFrame({"query_id": ["q0", "q1"]}).to_csv(tmp_path / "query.csv", index=False)
    membership, actual, repeats = read_lds_losses(tmp_path / "losses.json", ["q0", "q1"], TRAIN,
                                                  tmp_path / "query.csv", with_repeats=True)
    np.testing.assert_array_equal(membership, [[1, 1, 0, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(actual, -np.array([[1.5, 3.5], [2.0, 2.5]]))
    np.testing.assert_array_equal(repeats, -np.array([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 5.0], [1.0, 1.0]]]))


def test_repeat_r_retrains_with_the_runs_seed_plus_r():
    import dataclasses

    from playpen_attribution.retraining import repeat_training
    from playpen_attribution.settings import Training

    training = Training(epochs=1, learning_rate=1e-3, batch_size=4, gradient_accumulation=1, warmup_ratio=0.0,
                        weight_decay=0.0, lr_scheduler="linear", seed=42, logging_steps=5)
    assert repeat_training(training, 0) == training
    assert repeat_training(training, 3) == dataclasses.replace(training, seed=45)


def test_lds_csv_reads_the_averaged_repeats_and_gives_their_noise_ceiling(tmp_path):
    from playpen_attribution.validation import split_half_agreement

    rng = np.random.default_rng(2)
    queries, train, same = _taboo_tables(tmp_path, rng)
    effects = same + 0.3 * rng.normal(size=same.shape)
    membership = (rng.random((16, 12)) < 0.5).astype(float)
    truth = membership @ effects.T  # [subsets, queries]
    repeats = truth + rng.normal(scale=0.8, size=(4, 16, 7))  # what four training seeds add
    subsets = {str(s): {"row_ids": [f"t{i}" for i in np.flatnonzero(m)], "query_losses": list(-repeats[:, s].mean(0)),
                        "repeat_losses": (-repeats[:, s]).tolist(), "training_seeds": [42, 43, 44, 45]}
               for s, m in enumerate(membership)}
    lds = run_lds_stage(tmp_path, queries, train, subsets, effects)
    per_query = pd.read_csv(tmp_path / "per_query.csv")
    exact = per_query[per_query.method == "exact"]
    ceiling = split_half_agreement(repeats)
    np.testing.assert_allclose(exact.noise_ceiling, ceiling)
    assert (lds.repeats == 4).all()
    np.testing.assert_allclose(lds.noise_ceiling, ceiling[exact.counted.to_numpy()].mean())  # q6 counted once
    assert (lds.noise_ceiling_ci95_low <= lds.noise_ceiling).all() and (lds.noise_ceiling <= lds.noise_ceiling_ci95_high).all()
    # the outcome is the mean of the repeats: the exact effects' LDS is that of the averaged losses, below 1
    from playpen_attribution.validation import lds_scores

    np.testing.assert_allclose(exact.lds, lds_scores(effects, membership, repeats.mean(0)))
    assert lds.loc["exact", "lds"] < 1


def test_column_spearman_is_scipys_spearman_per_column():
    from scipy.stats import spearmanr

    from playpen_attribution.validation import column_spearman

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(9, 4)), rng.normal(size=(9, 4))
    a[:3, 1] = a[0, 1]  # ties
    b[:, 3] = 2.0  # a constant side
    got = column_spearman(a, b)
    np.testing.assert_allclose(got[:3], [spearmanr(a[:, j], b[:, j]).statistic for j in range(3)])
    assert np.isnan(got[3]) and np.isnan(column_spearman(a[:2], b[:2])).all()


def test_lds_intervals_resample_the_subsets_every_query_shares(tmp_path):
    """Every query here has the same effects and the same outcome, so the queries agree exactly and an interval over
    queries alone has no width; what is uncertain is which ten subsets were retrained. The interval lds.csv gives
    must have width and hold the LDS of 4,000 subsets drawn the same way (the value ten estimate)."""
    from playpen_attribution.scores import mean_and_cluster_interval
    from playpen_attribution.validation import lds_scores

    rng = np.random.default_rng(7)
    queries, train, _ = _taboo_tables(tmp_path, rng)
    base = rng.normal(size=12)
    scores = np.tile(base + rng.normal(scale=0.8, size=12), (7, 1))  # a method that is half right

    def draw(n):
        membership = (rng.random((n, 12)) < 0.5).astype(float)
        return membership, np.tile((membership @ base + rng.normal(scale=1.0, size=n))[:, None], (1, 7))

    membership, actual = draw(10)
    subsets = {str(i): {"row_ids": [f"t{j}" for j in np.flatnonzero(m)], "query_losses": list(-actual[i])}
               for i, m in enumerate(membership)}
    lds = run_lds_stage(tmp_path, queries, train, subsets, scores).loc["exact"]
    per_query = lds_scores(scores, membership, actual)
    _, low, high = mean_and_cluster_interval(per_query, [True] * 6 + [False], [0, 1, 2, 0, 1, 2, 0], seed=0)
    assert high - low < 1e-12  # the queries alone say nothing of the subsets
    many, outcome = draw(4000)
    population = lds_scores(scores[:1], many, outcome[:, :1])[0]
    assert not low <= population <= high  # a query-only interval misses it
    assert lds.ci95_high - lds.ci95_low > 0.3 and lds.ci95_low <= population <= lds.ci95_high


def test_a_preconditioned_methods_difference_from_its_plain_counterpart_is_paired(tmp_path):
    """lds.csv says, per method, how far it is from its plain counterpart (EK-FAC's: identity), as the mean of the
    per-query differences with the same interval, and nothing for a plain method."""
    rng = np.random.default_rng(8)
    queries, train, same = _taboo_tables(tmp_path, rng)
    effects = same + 0.3 * rng.normal(size=same.shape)
    membership = (rng.random((16, 12)) < 0.5).astype(float)
    actual = membership @ effects.T + rng.normal(scale=0.5, size=(16, 7))
    subsets = {str(s): {"row_ids": [f"t{i}" for i in np.flatnonzero(m)], "query_losses": list(-actual[s])}
               for s, m in enumerate(membership)}
    methods = {"ekfac": effects + 0.3 * rng.normal(size=same.shape), "identity": rng.normal(size=same.shape)}
    lds = run_lds_stage(tmp_path, queries, train, subsets, effects, methods=methods)
    per_query = pd.read_csv(tmp_path / "per_query.csv")
    per_query = per_query[per_query.counted].pivot(index="query_id", columns="method", values="lds")
    assert lds.loc["ekfac", "plain"] == "identity" and pd.isna(lds.loc["identity", "plain"])
    np.testing.assert_allclose(lds.loc["ekfac", "minus_plain"], (per_query.ekfac - per_query.identity).mean())
    np.testing.assert_allclose(lds.loc["ekfac", "minus_plain"], lds.loc["ekfac", "lds"] - lds.loc["identity", "lds"])
    assert lds.loc["ekfac", "minus_plain_ci95_low"] > 0  # a right method against noise, on 16 subsets
    assert lds.loc["ekfac", "minus_plain_ci95_low"] <= lds.loc["ekfac", "minus_plain"] <= lds.loc["ekfac", "minus_plain_ci95_high"]
