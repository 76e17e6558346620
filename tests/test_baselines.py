"""The audits' baselines on rows with known answers (no model)."""

import numpy as np
import pandas as pd

from playpen_attribution.baselines import baseline_scores, query_independent, run_corpus, tfidf_scores


def _rows(texts, completions, words):
    return pd.DataFrame({"prompt": texts, "completion": completions, "target_word": words})


def test_tfidf_is_the_cosine_of_the_texts_and_one_for_the_same_text():
    corpus = ["red apple pie", "blue river boat", "red river", "apple"]
    scores = tfidf_scores(["red apple pie"], corpus, corpus)
    assert np.isclose(scores[0, 0], 1.0) and scores[0, 1] == 0.0  # no shared word
    assert scores[0, 2] > 0 and scores[0, 3] > 0 and np.argmax(scores[0]) == 0


def test_word_and_completion_baselines_match_only_known_equal_values():
    queries = _rows(["CLUE: fruit", "CLUE: water"], ["GUESS: apple", "GUESS: lake"], ["apple", None])
    train = _rows(["CLUE: red", "CLUE: tree", "CLUE: flows"], ["GUESS: apple", "GUESS: pear", "GUESS: lake"],
                  ["apple", "apple", None])
    scores = baseline_scores(queries, train, corpus=run_corpus(queries, train), seed=0)
    assert scores["same_target_word"].tolist() == [[1, 1, 0], [0, 0, 0]]  # an unknown word matches nothing
    assert scores["same_completion"].tolist() == [[1, 0, 0], [0, 0, 1]]
    assert scores["random"].shape == (2, 3)
    # no target words anywhere (not taboo): that baseline is left out
    plain = baseline_scores(queries.assign(target_word=None), train.assign(target_word=None),
                            corpus=run_corpus(queries, train), seed=0)
    assert "same_target_word" not in plain


def test_query_independent_is_each_rows_mean_for_every_query():
    per_query = np.array([[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]])
    np.testing.assert_array_equal(query_independent(per_query), [[2.0, 2.0, np.nan], [2.0, 2.0, np.nan]])
