"""Which taboo words matter: influence aggregated by target word (the playpen guide's "high-impact training
words"), and each word's success rate in the training episodes beside its total influence, so the hard words and
the episodes that teach them stand out. Target words come from the transcripts (`taboo`), never from outside.

`influence` of training word b on query word a: the sum over b's training episodes of their mean score over a's
queries, i.e. the predicted effect of all of b's episodes on a typical query about a (the LDS's additive reading).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from playpen_attribution.scores import MethodScores


def _one_hot(words) -> tuple[np.ndarray, list[str]]:
    """[rows, distinct known words] indicator and the words (rows without a word have no 1)."""
    vocabulary = sorted({w for w in words if isinstance(w, str)})
    index = {w: i for i, w in enumerate(vocabulary)}
    matrix = np.zeros((len(words), len(vocabulary)))
    for row, word in enumerate(words):
        if isinstance(word, str):
            matrix[row, index[word]] = 1.0
    return matrix, vocabulary


def word_influence(methods: dict[str, MethodScores], queries: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Per method, query word and training word: the training word's influence (see the module), the mean score
    of its (query, row) pairs, how many of each, and the training word's rank for that query word (1 = helps most).
    """
    query_hot, query_words = _one_hot(list(queries["target_word"]))
    train_hot, train_words = _one_hot(list(train["target_word"]))
    frames = []
    for method, ms in methods.items():
        scored = ~np.isnan(ms.per_query)
        scores = np.nan_to_num(ms.per_query)
        # per query word: the mean over its queries of every row's score -> [query words, rows]
        queries_per_word = query_hot.T @ scored
        mean_over_queries = np.where(queries_per_word > 0, (query_hot.T @ scores) / np.maximum(queries_per_word, 1),
                                     np.nan)
        influence = np.nan_to_num(mean_over_queries) @ train_hot  # [query words, train words]
        pair_sums, pairs = query_hot.T @ scores @ train_hot, query_hot.T @ scored @ train_hot
        a, b = np.meshgrid(np.arange(len(query_words)), np.arange(len(train_words)), indexing="ij")
        frame = pd.DataFrame({"method": method, "query_word": np.asarray(query_words, dtype=object)[a.ravel()],
                              "train_word": np.asarray(train_words, dtype=object)[b.ravel()],
                              "influence": influence.ravel(),
                              "mean_pair_score": np.where(pairs > 0, pair_sums / np.maximum(pairs, 1), np.nan).ravel(),
                              "queries": query_hot.sum(axis=0)[a.ravel()].astype(int),
                              "train_rows": train_hot.sum(axis=0)[b.ravel()].astype(int)})
        frame["rank"] = frame.groupby("query_word")["influence"].rank(ascending=False, method="first").astype(int)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def top_and_bottom_words(influence: pd.DataFrame, k: int) -> pd.DataFrame:
    """Per method and query word, the k training words that help it most and the k that harm it most (by `rank`),
    in rank order: what words.csv keeps of a table that grows with methods x query words x training words."""
    if influence.empty:
        return influence
    words = influence.groupby(["method", "query_word"])["rank"].transform("max")
    kept = influence[(influence["rank"] <= k) | (influence["rank"] > words - k)]
    return kept.sort_values(["method", "query_word", "rank"], kind="stable", ignore_index=True)


def word_difficulty(methods: dict[str, MethodScores], queries: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Per training target word: episodes, successes, success rate, queries about it, and per method the total
    influence of its episodes against the whole query set (sum of their scores against all queries). Hardest
    words (lowest success rate) first."""
    train_hot, words = _one_hot(list(train["target_word"]))
    success = (train.get("outcome", pd.Series([None] * len(train))) == "success").to_numpy(float)
    query_counts = pd.Series([w for w in queries["target_word"] if isinstance(w, str)]).value_counts()
    table = pd.DataFrame({"word": words, "training_episodes": train_hot.sum(axis=0).astype(int),
                          "successes": (success @ train_hot).astype(int)})
    table["success_rate"] = table.successes / table.training_episodes
    table["queries"] = [int(query_counts.get(w, 0)) for w in words]
    for method, ms in methods.items():
        table[f"influence_{method}"] = np.nan_to_num(ms.overall) @ train_hot
    return table.sort_values(["success_rate", "training_episodes", "word"], ascending=[True, False, True],
                             ignore_index=True)


def helps_and_harms(influence: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """Per method and query word: the n training words that help it most and the n that harm it most."""
    records = []
    for (method, word), group in influence.groupby(["method", "query_word"], sort=False):
        ordered = group.sort_values("influence", ascending=False)
        fmt = lambda rows: ", ".join(f"{r.train_word} ({r.influence:+.3g})" for r in rows.itertuples())  # noqa: E731
        records.append({"method": method, "query_word": word, "queries": int(group.queries.iloc[0]),
                        "helps_most": fmt(ordered.head(n)), "harms_most": fmt(ordered.tail(n).iloc[::-1])})
    return pd.DataFrame.from_records(records)


def word_heat_map(influence: pd.DataFrame, train: pd.DataFrame, top: int = 12):
    """Query word x training word influence for the most frequent words, one panel per method (each scaled to its
    own largest magnitude: methods' scales differ), as a matplotlib figure."""
    from playpen_attribution.plots import pyplot

    plt = pyplot()

    counts = pd.Series([w for w in train["target_word"] if isinstance(w, str)]).value_counts()
    shown_query = [w for w in counts.index if w in set(influence.query_word)][:top]
    shown_train = list(counts.index[:top])
    methods = list(dict.fromkeys(influence.method))
    fig, axes = plt.subplots(1, len(methods), figsize=(0.45 * len(shown_train) * len(methods) + 2.5,
                                                       0.4 * len(shown_query) + 2.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        block = (influence[influence.method == method]
                 .pivot(index="query_word", columns="train_word", values="influence")
                 .reindex(index=shown_query, columns=shown_train))
        scale = np.nanmax(np.abs(block.to_numpy())) or 1.0
        ax.imshow(block.to_numpy() / scale, cmap="RdBu", vmin=-1, vmax=1)
        ax.set_xticks(range(len(shown_train)), shown_train, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(shown_query)), shown_query, fontsize=7)
        ax.set_xlabel("training episodes' word")
        ax.set_ylabel("query word")
        ax.set_title(method, fontsize=9)
    fig.tight_layout()
    return fig
