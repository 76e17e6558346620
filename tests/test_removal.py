"""The removal check: which rows each selection removes, the retrain without them, and the loss-rise table's
arithmetic on known losses."""

import json

import numpy as np
import pandas as pd
import pytest

from playpen_attribution.removal import (
    random_rows,
    removal_count,
    removal_rows_stage,
    removal_table,
    selection_rows,
    top_rows,
)
from playpen_attribution.settings import RemovalChoice

TRAIN = [f"t{i}" for i in range(20)]


def tables(tmp_path):
    words = ["apple", "river", "chair", "stone"]
    train = pd.DataFrame({"train_id": TRAIN, "prompt": [f"CLUE: about {words[i % 4]} {i}" for i in range(20)],
                          "completion": [f"GUESS: {words[i % 4]}" for i in range(20)]})
    queries = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "prompt": ["CLUE: about apple", "CLUE: a fruit, apple",
                                                                        "CLUE: about river"],
                            "completion": ["GUESS: apple", "GUESS: apple", "GUESS: river"]})
    train.to_csv(tmp_path / "train.csv", index=False)
    queries.to_csv(tmp_path / "query.csv", index=False)
    return queries, train


def test_a_method_removes_exactly_its_top_rows_for_the_query_set(tmp_path):
    queries, _ = tables(tmp_path)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 20))
    scores[:, 7] = np.nan  # a row no query scored is never removed first
    q, t = np.meshgrid(range(3), range(20), indexing="ij")
    pd.DataFrame({"query_id": queries.query_id.to_numpy()[q.ravel()], "train_id": np.array(TRAIN)[t.ravel()],
                  "method": "ekfac", "influence_score": scores.ravel()}).dropna().to_csv(
        tmp_path / "influences.csv", index=False)
    removal_rows_stage(tmp_path / "query.csv", tmp_path / "train.csv", tmp_path / "ekfac.json", selection="ekfac",
                       settings=RemovalChoice(fractions=(0.1, 0.25), seed=None),
                       influences_csv=tmp_path / "influences.csv")
    record = json.loads((tmp_path / "ekfac.json").read_text())
    overall = pd.DataFrame(scores).mean().to_numpy()  # influence functions: the mean over queries (NaN if none)
    expected = [TRAIN[i] for i in np.argsort(-np.nan_to_num(overall, nan=-np.inf))]
    assert record["kind"] == "method" and record["fractions"] == ["0.1", "0.25"]
    assert record["removed"] == {"0.1": expected[:2], "0.25": expected[:5]}
    assert "t7" not in record["removed"]["0.25"]


def test_tfidf_removes_the_rows_most_like_the_query_set_and_the_reference_removes_nothing(tmp_path):
    queries, train = tables(tmp_path)
    chosen = selection_rows("tfidf", queries, train, fractions=[0.25])
    # two of three queries are about apples: the five apple rows (every 4th) are the most similar text
    assert set(chosen["removed"]["0.25"]) == {f"t{i}" for i in range(0, 20, 4)} and chosen["kind"] == "baseline"
    assert selection_rows("none", queries, train, fractions=[0.2]) == {"kind": "reference", "removed": {}}
    with pytest.raises(ValueError, match="removal selection 'bergson_dot' is neither none, tfidf, random-<i> nor a "
                                         "method of the run"):
        selection_rows("bergson_dot", queries, train, fractions=[0.2], methods={})


def test_random_controls_come_from_the_seed_and_nest_across_fractions(tmp_path):
    queries, train = tables(tmp_path)
    first = selection_rows("random-0", queries, train, fractions=[0.1, 0.3], seed=5)
    assert first == selection_rows("random-0", queries, train, fractions=[0.1, 0.3], seed=5)
    assert first["removed"]["0.3"][:2] == first["removed"]["0.1"] and len(first["removed"]["0.3"]) == 6
    assert first["removed"]["0.3"] == random_rows(TRAIN, 6, seed=5, draw=0)
    assert selection_rows("random-1", queries, train, fractions=[0.3], seed=5)["removed"]["0.3"] != first["removed"]["0.3"]
    assert selection_rows("random-0", queries, train, fractions=[0.3], seed=6)["removed"]["0.3"] != first["removed"]["0.3"]
    assert [removal_count(f, 20) for f in (0.01, 0.5, 0.99)] == [1, 10, 19]
    assert top_rows(np.array([1.0, 3.0, 3.0, 2.0]), ["a", "b", "c", "d"], 3) == ["b", "c", "d"]  # ties: row order


def test_the_retrain_trains_without_exactly_the_removed_rows(tmp_path, demo_tokens, tiny_model_dir, monkeypatch):
    import datasets

    import playpen_attribution.scores as scores
    import playpen_attribution.training as training_module
    from playpen_attribution.config import validate_config
    from playpen_attribution.removal import removal_retrain_stage
    from playpen_attribution.settings import Lora, Training

    train = datasets.load_from_disk(str(demo_tokens / "train"))
    ids = list(train["row_id"])
    removed = {"0.1": ids[3:3 + removal_count(0.1, len(ids))]}
    (tmp_path / "rows.json").write_text(json.dumps({"selection": "ekfac", "kind": "method", "train_rows": len(ids),
                                                    "fractions": ["0.1"], "removed": removed}))
    trained_on, real_train = [], training_module.train_adapter

    def spy(base, tokens, out, **kwargs):  # the real training, recording what it was given
        trained_on.append((list(datasets.load_from_disk(str(tokens))["row_id"]), kwargs["training"].seed))
        return real_train(base, tokens, out, **kwargs)

    monkeypatch.setattr(training_module, "train_adapter", spy)
    losses_seen = []
    real_losses = scores.query_losses

    def losses_spy(adapter, query, dtype):
        losses_seen.append(real_losses(adapter, query, dtype=dtype))
        return losses_seen[-1]

    monkeypatch.setattr(scores, "query_losses", losses_spy)
    run = validate_config({"runs": {"r": {"data": {"source": {"kind": "json", "train": "a", "query": "b"}},
                                          "model": {"tiny": {}}, "training": {"epochs": 1, "batch_size": 8,
                                                                              "seed": 7}}}})["runs"]["r"]
    removal_retrain_stage(tiny_model_dir, demo_tokens / "train", demo_tokens / "query", tmp_path / "rows.json",
                          tmp_path / "out.json", selection="ekfac", repeat=2, lora=Lora.from_run(run),
                          training=Training.from_run(run), max_length=256, dtype="auto", loss_dtype="float32")
    assert trained_on == [([i for i in ids if i not in removed["0.1"]], 9)]  # seed 7 + repeat 2
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["training_seed"] == 9 and record["fractions"]["0.1"]["removed"] == len(removed["0.1"])
    assert record["fractions"]["0.1"]["query_losses"] == losses_seen[0] and len(losses_seen[0]) == len(
        datasets.load_from_disk(str(demo_tokens / "query")))
    assert {p.name for p in tmp_path.iterdir()} == {"rows.json", "out.json"}  # no adapter or token copy left behind
    with pytest.raises(ValueError, match=r"rows\.json holds the rows of 'ekfac', not 'tfidf'; rerun removal_rows"):
        removal_retrain_stage(tiny_model_dir, demo_tokens / "train", demo_tokens / "query", tmp_path / "rows.json",
                              tmp_path / "other.json", selection="tfidf", repeat=0, lora=Lora.from_run(run),
                              training=Training.from_run(run), max_length=256, dtype="float32")


def test_loss_rise_is_over_the_reference_averaged_over_repeats_and_draws():
    # 2 repeats x 4 queries of known losses; q3 repeats q2 (counted once), each query its own cluster
    reference = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])  # mean 2.0 per query
    losses = {("none", "0"): reference,
              ("ekfac", "0.1"): reference + np.array([[0.5, 0.7, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3]]),
              ("tfidf", "0.1"): reference + 0.2,
              ("random-0", "0.1"): reference + 0.0, ("random-1", "0.1"): reference + 0.1}
    kinds = {"none": "reference", "ekfac": "method", "tfidf": "baseline", "random-0": "control",
             "random-1": "control"}
    counted = np.array([True, True, True, False])
    table = removal_table(losses, kinds, ["0.1"], counted, ["a", "b", "c", "c"], seed=0).set_index("selection")
    rise = np.array([0.5, 0.6, 0.3])  # per counted query, the mean over the two repeats
    np.testing.assert_allclose(table.loc["ekfac", "loss_rise"], rise.mean())
    np.testing.assert_allclose(table.loc["random", "loss_rise"], 0.05)  # the mean of the draws' 0.0 and 0.1
    np.testing.assert_allclose(table.loc["tfidf", "loss_rise"], 0.2)
    np.testing.assert_allclose(table.loc["ekfac", "over_random"], rise.mean() - 0.05)
    np.testing.assert_allclose(table.loc["ekfac", "over_tfidf"], rise.mean() - 0.2)
    assert table.loc["ekfac", "over_random_ci95_low"] > 0  # every query rose more than under random removal
    assert table.loc["random", "kind"] == "control" and table.loc["random", "draws"] == 2
    assert (table.repeats == 2).all() and np.isnan(table.loc["tfidf", "over_random"])


def test_intervals_resample_the_seeds_and_random_draws_that_every_query_shares():
    # 4 training seeds that move every query's loss together, 3 queries of 3 target words that agree exactly: an
    # interval over the queries alone has no width, whatever the seeds do
    seed_effect = np.array([0.1, 0.5, 0.2, 0.4])[:, None] * np.ones((1, 3))  # [repeats, queries]
    reference = np.full((4, 3), 2.0)
    losses = {("none", "0"): reference,
              ("ekfac", "0.1"): reference + seed_effect + 0.1,
              ("random-0", "0.1"): reference + seed_effect,  # the same seeds moved the random retrains alike
              ("random-1", "0.1"): reference + seed_effect + 0.2}
    kinds = {"none": "reference", "ekfac": "method", "random-0": "control", "random-1": "control"}
    table = removal_table(losses, kinds, ["0.1"], np.ones(3, bool), ["a", "b", "c"], seed=0).set_index("selection")
    ekfac = table.loc["ekfac"]
    np.testing.assert_allclose(ekfac.loss_rise, 0.4)
    # the seeds' spread (a mean of 4 drawn from 0.2, 0.6, 0.3, 0.5) is in the interval
    assert 0.2 <= ekfac.ci95_low < 0.35 and 0.45 < ekfac.ci95_high <= 0.6
    # paired by seed, ekfac - random moves only with the random draws resampled: both draws random-0 (+0.1), both
    # random-1 (-0.1) or one of each (0)
    np.testing.assert_allclose(ekfac.over_random, 0.0, atol=1e-12)
    np.testing.assert_allclose([ekfac.over_random_ci95_low, ekfac.over_random_ci95_high], [-0.1, 0.1])
    # one draw of each: the random control's interval is the seeds' alone
    single = removal_table({k: v for k, v in losses.items() if k[0] != "random-1"},
                           {k: v for k, v in kinds.items() if k != "random-1"}, ["0.1"], np.ones(3, bool),
                           ["a", "b", "c"], seed=0).set_index("selection")
    np.testing.assert_allclose(single.loc["ekfac", ["over_random", "over_random_ci95_low", "over_random_ci95_high"]]
                               .astype(float), 0.1)


def test_a_selection_with_fewer_repeats_than_the_reference_is_refused():
    # the intervals pair selections by training seed: a selection missing a repeat cannot be paired
    reference = np.full((2, 3), 2.0)
    losses = {("none", "0"): reference, ("ekfac", "0.1"): reference[:1] + 0.1}
    with pytest.raises(ValueError, match=r"selection ekfac at 0.1 has 1 repeats, the reference 2; rerun the missing "
                                         r"removal_retrain jobs"):
        removal_table(losses, {"none": "reference", "ekfac": "method"}, ["0.1"], np.ones(3, bool), ["a", "b", "c"],
                      seed=0)
