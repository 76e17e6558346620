"""Baselines for the attribution audits: rankings that need no gradient, scored by the same rules as the methods
(the LDS sums a subset's scores, the planted audit ranks a copy), so a method that cannot beat them shows it.

- `random`: independent normal scores, a floor.
- `tfidf`: lexical similarity of the query's text (prompt + completion) to the row's, TF-IDF cosine from
  scikit-learn: what attribution must beat to be more than text matching.
- `same_completion`: 1 where the row's completion is the query's, word for word (for a guesser: the same
  guess). On the bundled sample this alone nearly reaches EK-FAC's LDS.
- `same_target_word`: taboo only, 1 where the row's target word is the query's (as the transcripts reveal it).
- `<method>_query_independent`: a method's mean score over all queries, the same ranking for every query; it
  tells per-query attribution from a global ordering of "helpful rows".

Rows or queries whose target word is unknown get 0 from `same_target_word`: a constant ranking, which the LDS
counts as a correlation of 0 and the planted audit as a tie (a tie is not a win).
"""

from __future__ import annotations

import numpy as np

from playpen_attribution.tables import readable

QUERY_INDEPENDENT = "_query_independent"
BASELINE_NAMES = ("random", "tfidf", "same_completion", "same_target_word")


def query_independent_name(method: str) -> str:
    return method + QUERY_INDEPENDENT


def is_baseline(name: str) -> bool:
    return name in BASELINE_NAMES or name.endswith(QUERY_INDEPENDENT)


def episode_text(prompt, completion) -> str:
    """The words of an episode as TF-IDF sees them: every turn of the prompt and the completion."""
    return readable(prompt) + "\n\n" + readable(completion)


def tfidf_scores(query_texts: list[str], row_texts: list[str], corpus: list[str]) -> np.ndarray:
    """[queries, rows] cosine similarity of TF-IDF vectors (sublinear term frequency), the vocabulary and the
    inverse document frequencies fitted on `corpus` (the run's training and query texts)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True).fit(corpus)
    # rows are L2-normalised by the vectorizer: the dot product is the cosine
    return (vectorizer.transform(query_texts) @ vectorizer.transform(row_texts).T).toarray()


def same_word_scores(query_words: list, row_words: list) -> np.ndarray:
    """[queries, rows] 1.0 where both target words are known and equal, else 0.0."""
    query, row = (np.asarray([w if isinstance(w, str) else None for w in words], dtype=object)
                  for words in (query_words, row_words))
    return ((query[:, None] == row[None, :]) & (query != None)[:, None]).astype(float)  # noqa: E711 (elementwise)


def same_completion_scores(query_completions: list, row_completions: list) -> np.ndarray:
    """[queries, rows] 1.0 where the completions are the same text, else 0.0."""
    return (np.asarray(query_completions, dtype=object)[:, None] == np.asarray(row_completions, dtype=object)[None, :]
            ).astype(float)


def has_target_words(query_words: list, row_words: list) -> bool:
    return any(isinstance(w, str) for w in query_words) and any(isinstance(w, str) for w in row_words)


def query_independent(per_query: np.ndarray) -> np.ndarray:
    """Every query gets the method's mean score of each row over the queries that scored it (NaN stays NaN)."""
    scored = ~np.isnan(per_query)
    mean = np.where(scored.any(axis=0), np.nansum(per_query, axis=0) / np.maximum(scored.sum(axis=0), 1), np.nan)
    return np.broadcast_to(mean, per_query.shape).copy()


def baseline_scores(queries, rows, *, corpus: list[str], seed: int) -> dict[str, np.ndarray]:
    """The model-free baselines of `queries` against `rows` (frames with prompt, completion and target_word).

    `corpus`: the texts TF-IDF is fitted on, the same for every call of one run, so training rows and planted
    copies are scored on one scale."""
    query_texts = [episode_text(p, c) for p, c in zip(queries["prompt"], queries["completion"])]
    row_texts = [episode_text(p, c) for p, c in zip(rows["prompt"], rows["completion"])]
    shape = (len(queries), len(rows))
    scores = {"random": np.random.default_rng(seed).normal(size=shape),
              "tfidf": tfidf_scores(query_texts, row_texts, corpus),
              "same_completion": same_completion_scores(list(queries["completion"]), list(rows["completion"]))}
    query_words, row_words = list(queries["target_word"]), list(rows["target_word"])
    if has_target_words(query_words, row_words):
        scores["same_target_word"] = same_word_scores(query_words, row_words)
    return scores


def run_corpus(queries, train) -> list[str]:
    """The texts of a run that TF-IDF is fitted on: every training row and every query."""
    return [episode_text(p, c) for p, c in zip(list(train["prompt"]) + list(queries["prompt"]),
                                               list(train["completion"]) + list(queries["completion"]))]
