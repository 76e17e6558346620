"""Influence by taboo target word on tables with known answers (no model)."""

import numpy as np
import pandas as pd

from playpen_attribution.scores import MethodScores
from playpen_attribution.words import helps_and_harms, word_difficulty, word_influence


def _tables():
    queries = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "target_word": ["apple", "apple", "river"]})
    train = pd.DataFrame({"train_id": [f"t{i}" for i in range(5)],
                          "target_word": ["apple", "apple", "river", "chair", None],
                          "outcome": ["success", "failure", "success", "failure", "success"]})
    per_query = np.array([[4.0, 2.0, -1.0, 0.5, 9.0],
                          [2.0, 0.0, -3.0, 1.5, 9.0],
                          [0.0, 1.0, 5.0, -2.0, 9.0]])
    methods = {"m": MethodScores("m", per_query, per_query.mean(axis=0), "mean")}
    return methods, queries, train, per_query


def test_word_influence_is_the_summed_effect_of_a_words_episodes_on_its_queries():
    methods, queries, train, s = _tables()
    table = word_influence(methods, queries, train).set_index(["query_word", "train_word"])
    # apple's queries are q0, q1; apple's training rows t0, t1: (mean(4, 2) + mean(2, 0)) = 4
    assert table.loc[("apple", "apple"), "influence"] == (4 + 2) / 2 + (2 + 0) / 2
    assert table.loc[("apple", "river"), "influence"] == (-1 - 3) / 2
    assert table.loc[("river", "chair"), "influence"] == -2.0
    assert table.loc[("apple", "apple"), "mean_pair_score"] == np.mean([4, 2, 2, 0])
    assert table.loc[("apple", "apple"), "queries"] == 2 and table.loc[("apple", "apple"), "train_rows"] == 2
    # t4 names no word: it is in no pair
    assert table.influence.abs().max() < 9
    ranks = table.loc["apple"].sort_values("rank")
    assert ranks.index.tolist() == ["apple", "chair", "river"]
    helps = helps_and_harms(table.reset_index().assign(method="m"), n=1).set_index("query_word")
    assert helps.loc["apple", "helps_most"].startswith("apple") and helps.loc["apple", "harms_most"].startswith("river")


def test_word_difficulty_puts_the_hardest_word_first_beside_its_total_influence():
    methods, queries, train, s = _tables()
    table = word_difficulty(methods, queries, train).set_index("word")
    assert table.index.tolist()[0] == "chair"  # never won
    assert table.loc["apple", "success_rate"] == 0.5 and table.loc["apple", "training_episodes"] == 2
    assert table.loc["river", "queries"] == 1 and table.loc["chair", "queries"] == 0
    np.testing.assert_allclose(table.loc["apple", "influence_m"], s.mean(axis=0)[[0, 1]].sum())


def test_words_csv_keeps_the_k_words_that_help_and_harm_each_query_word_most():
    """The whole table grows with methods x query words x training words; words.csv keeps each query word's k most
    helpful and k most harmful training words, in rank order."""
    from playpen_attribution.words import top_and_bottom_words

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(12)], "target_word": words[:12]})
    train = pd.DataFrame({"train_id": [f"t{i}" for i in range(60)], "target_word": words * 2})
    scores = rng.normal(size=(12, 60))
    methods = {m: MethodScores(m, scores * s, (scores * s).mean(axis=0), "mean") for m, s in (("a", 1), ("b", -1))}
    table = word_influence(methods, queries, train)
    assert len(table) == 2 * 12 * 30
    kept = top_and_bottom_words(table, 3)
    assert len(kept) == 2 * 12 * 6
    for (method, word), group in table.groupby(["method", "query_word"]):
        ordered = group.sort_values("influence", ascending=False).train_word.tolist()
        mine = kept[(kept.method == method) & (kept.query_word == word)]
        assert mine.train_word.tolist() == ordered[:3] + ordered[-3:] and mine["rank"].is_monotonic_increasing
    assert top_and_bottom_words(table, 20).equals(table.sort_values(["method", "query_word", "rank"],
                                                                    ignore_index=True))  # k past half: every row
