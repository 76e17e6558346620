"""Everything after the score shards, for every method family: the queries' losses (the one stage here that
loads a model, a GPU rule of its own) and the merge of the shards into the if-query tools' three CSVs.

The merge reads tables and arrays only and never imports torch, so it runs as a small CPU job. It is written
for the real size (300 queries x 2,000 rows x several methods, optional per-token scores): `influences.csv`
is streamed a block of queries at a time, and per-token scores are held one shard at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

INFLUENCE_COLUMNS = ["query_id", "train_id", "method", "influence_score"]
PER_TOKEN_COLUMN = "per_token_scores"
QUERY_BLOCK = 64  # queries written per block of influences.csv


# ---------------------------------------------------------------------------------------------------------
# query losses (GPU rule)
# ---------------------------------------------------------------------------------------------------------
def query_losses(model_ref: str, query_dataset, revision: str | None = None, dtype: str = "float32",
                 batch_size: int = 8, model=None) -> list[float]:
    """Summed completion cross-entropy of each query (the seed's `loss` column), `batch_size` rows at a time;
    `model`: the model already loaded from `model_ref`."""
    import torch

    from playpen_attribution.modeling import collate, completion_loss, load_for_attribution, load_tokenizer, pad_token_id

    model = model if model is not None else load_for_attribution(model_ref, revision, dtype)
    pad_id = pad_token_id(load_tokenizer(model_ref, revision))
    losses = []
    with torch.no_grad():
        for start in range(0, len(query_dataset), batch_size):
            rows = [query_dataset[i] for i in range(start, min(start + batch_size, len(query_dataset)))]
            losses += completion_loss(model, collate(rows, pad_id), reduction="per_example").float().cpu().tolist()
    return losses


def query_losses_stage(model_dir, query_tokens_dir, out_json, *, dtype: str) -> None:
    """Rule `query_losses`: every query's loss under the run's adapter, for `query.csv`."""
    import datasets

    query = datasets.load_from_disk(str(query_tokens_dir))
    write_json_atomic({"query_ids": list(query["row_id"]), "losses": query_losses(str(model_dir), query, dtype=dtype)},
                      out_json)


# ---------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------
def per_token_lists(per_token: np.ndarray, train_lengths: list[int]) -> list[list[list[float]]]:
    """Per-token scores of each pair restricted to the training row's real tokens (padding is on the right).

    Kronfluence's per-token tensor is indexed by position in the padded batch; its entries on padding are 0,
    so the lists still sum to the pair's total score.
    """
    return [[per_token[q, t, :n].tolist() for t, n in enumerate(train_lengths)] for q in range(per_token.shape[0])]


def _pairs_csv(query_ids, train_ids, scores, method, per_token, with_per_token_column: bool) -> tuple[str, int]:
    """CSV lines (no header) of one block of pairs, queries outermost, unscored (NaN) pairs left out."""
    from playpen_attribution.tables import influences_frame

    frame = influences_frame(query_ids, train_ids, scores, method, per_token)
    if with_per_token_column and PER_TOKEN_COLUMN not in frame:
        frame[PER_TOKEN_COLUMN] = None
    frame = frame.dropna(subset=["influence_score"])
    return frame.to_csv(index=False, header=False), len(frame)


def _write_method(handle, method: str, paths: list, query_ids: list[str], train_ids: list[str],
                  lengths: dict[str, int], with_per_token_column: bool) -> int:
    """Append one method's pairs to `handle` in (query, train row) order; returns the pairs left out (NaN)."""
    shards = [np.load(p, allow_pickle=False) for p in paths]  # lazy: an array is read when it is asked for
    shard_train = [list(s["train_ids"]) for s in shards]
    if [t for ids in shard_train for t in ids] != train_ids or any(list(s["query_ids"]) != query_ids for s in shards):
        raise ValueError(f"{method} shards do not cover the tokenized rows in order; rerun their scoring")
    written = 0
    if not all("per_token" in s.files for s in shards):
        scores = np.concatenate([s["scores"] for s in shards], axis=1)  # [queries, rows]: small
        for start in range(0, len(query_ids), QUERY_BLOCK):
            block = slice(start, start + QUERY_BLOCK)
            text, n = _pairs_csv(query_ids[block], train_ids, scores[block], method, None, with_per_token_column)
            handle.write(text)
            written += n
        return len(query_ids) * len(train_ids) - written
    # Per-token scores: one shard's [queries, rows, tokens] array at a time, each into a part file by query;
    # then the parts are interleaved query by query, so the file keeps its (query, train row) order.
    with tempfile.TemporaryDirectory(prefix=".parts-", dir=Path(handle.name).parent) as scratch, \
            contextlib.ExitStack() as stack:
        parts, counts = [], np.zeros((len(query_ids), len(shards)), dtype=np.int64)
        for s, (shard, ids) in enumerate(zip(shards, shard_train)):
            part = Path(scratch) / f"shard-{s}.csv"
            per_token, scores = shard["per_token"], shard["scores"]
            widths = [lengths[t] for t in ids]
            with open(part, "w", newline="") as out:
                for q in range(len(query_ids)):
                    text, counts[q, s] = _pairs_csv(query_ids[q:q + 1], ids, scores[q:q + 1], method,
                                                    per_token_lists(per_token[q:q + 1], widths), True)
                    out.write(text)
            del per_token
            parts.append(stack.enter_context(open(part, newline="")))
        for q in range(len(query_ids)):
            for s, part in enumerate(parts):
                for _ in range(counts[q, s]):
                    handle.write(part.readline())
        written = int(counts.sum())
    return len(query_ids) * len(train_ids) - written


def merge_influences_stage(query_rows, train_rows, query_tokens_dir, train_tokens_dir, query_losses_json,
                           shards_by_method: dict, out_query, out_train, out_influences) -> None:
    """Rule `merge_influences`: the seed's three CSVs, every method in one `influences.csv`."""
    import datasets

    from playpen_attribution.data import read_rows
    from playpen_attribution.tables import rows_frame

    query_tokens = datasets.load_from_disk(str(query_tokens_dir))
    train_tokens = datasets.load_from_disk(str(train_tokens_dir))
    query_ids, train_ids = list(query_tokens["row_id"]), list(train_tokens["row_id"])
    losses = json.loads(Path(query_losses_json).read_text())
    if losses["query_ids"] != query_ids:
        raise ValueError(f"{query_losses_json} holds losses of other queries than {query_tokens_dir}; "
                         f"rerun query_losses")
    by_id = {r["row_id"]: r for r in read_rows(query_rows)}
    query = rows_frame([by_id[i] for i in query_ids], "query_id")
    query.insert(3, "loss", losses["losses"])
    by_id = {r["row_id"]: r for r in read_rows(train_rows)}
    train = rows_frame([by_id[i] for i in train_ids], "train_id")
    lengths = dict(zip(train_ids, (len(x) for x in train_tokens["input_ids"])))
    with_per_token = any("per_token" in np.load(p, allow_pickle=False).files
                         for paths in shards_by_method.values() for p in paths)
    columns = INFLUENCE_COLUMNS + ([PER_TOKEN_COLUMN] if with_per_token else [])
    # all three appear together or none: every rename happens after the last file is complete
    with contextlib.ExitStack() as stack:
        tmp_query, tmp_train, tmp_influences = (stack.enter_context(atomic_path(p))
                                                for p in (out_query, out_train, out_influences))
        query.to_csv(tmp_query, index=False)
        train.to_csv(tmp_train, index=False)
        with open(tmp_influences, "w", newline="") as handle:
            handle.write(",".join(columns) + "\n")
            for method, paths in shards_by_method.items():
                unscored = _write_method(handle, method, list(paths), query_ids, train_ids, lengths, with_per_token)
                if unscored:  # Bergson gives no gradient to a row under two tokens
                    log.warning("%s: %d (query, train) pairs have no score and are left out", method, unscored)


# ---------------------------------------------------------------------------------------------------------
# the merged tables read back: every method's score matrix, and how far two methods agree
# ---------------------------------------------------------------------------------------------------------
def read_run_tables(query_csv, train_csv) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`query.csv` and `train.csv` with string ids; ids must be unique (scores are matched to rows by id)."""
    tables = []
    for path, column in ((query_csv, "query_id"), (train_csv, "train_id")):
        frame = pd.read_csv(path, dtype={column: str})
        if frame[column].duplicated().any():
            dup = frame.loc[frame[column].duplicated(), column].iloc[0]
            raise ValueError(f"{path}: {column} {dup} appears twice; ids must be unique (rebuild {Path(path).name})")
        tables.append(frame)
    return tables[0], tables[1]


@dataclass
class MethodScores:
    """One method's scores: `per_query` [queries, train rows] (NaN where a pair was not scored) and `overall`
    [train rows], the score against the whole query set."""

    method: str
    per_query: np.ndarray
    overall: np.ndarray
    overall_source: str


def load_method_scores(influences_csv, query_ids: list[str], train_ids: list[str],
                       train_scores_csv=None) -> dict[str, MethodScores]:
    """Every method's score matrix, in the order of `query.csv` and `train.csv`.

    Against the whole query set: a Bergson variant's score against the reduced query gradient
    (`train_scores.csv`); for the influence functions, the mean of the per-query scores.
    The seed's single-method `influences.csv` (no `method` column) reads as method "influence".
    """
    header = pd.read_csv(influences_csv, nrows=0).columns
    columns = ["query_id", "train_id", "influence_score"] + (["method"] if "method" in header else [])
    frame = pd.read_csv(influences_csv, usecols=columns, dtype={"query_id": str, "train_id": str})
    if "method" not in frame:
        frame["method"] = "influence"
    reduced = {}
    if train_scores_csv is not None and Path(train_scores_csv).exists():
        bergson = pd.read_csv(train_scores_csv, usecols=["train_id", "method", "score"], dtype={"train_id": str})
        reduced = {m: g.set_index("train_id")["score"].reindex(train_ids).to_numpy(float)
                   for m, g in bergson.groupby("method", sort=False)}
    methods = {}
    for method, group in frame.groupby("method", sort=False):
        unknown = set(group.train_id) - set(train_ids)
        if unknown:
            raise ValueError(f"{influences_csv}: method {method} scores train ids missing from train.csv, e.g. "
                             f"{sorted(unknown)[:3]}; the tables come from different runs: rebuild them together")
        matrix = (group.pivot(index="query_id", columns="train_id", values="influence_score")
                  .reindex(index=query_ids, columns=train_ids).to_numpy(float))
        if method in reduced:
            overall, source = reduced[method], "score against the reduced (mean) query gradient (train_scores.csv)"
        else:
            scored = (~np.isnan(matrix)).sum(axis=0)  # a row no query scored stays NaN
            overall = np.where(scored > 0, np.nansum(matrix, axis=0) / np.maximum(scored, 1), np.nan)
            source = "mean of the per-query scores"
        methods[method] = MethodScores(method, matrix, overall, source)
    return methods


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation over the rows both methods scored (NaN if fewer than 3 or constant)."""
    from scipy.stats import spearmanr

    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:  # scipy warns and returns NaN on constant input
        return float("nan")
    return float(spearmanr(a, b).statistic)


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Fraction of A's k most helpful rows that are also among B's k most helpful."""
    def top(x):
        scored = np.flatnonzero(~np.isnan(x))
        return set(scored[np.argsort(-x[scored], kind="stable")][:k])
    ta, tb = top(a), top(b)
    return len(ta & tb) / max(1, min(k, len(ta), len(tb)))


def mean_and_halfwidth(values: list[float]) -> tuple[float, float]:
    """Mean and the 95% interval half-width (normal approximation) of the finite values."""
    x = np.asarray([v for v in values if np.isfinite(v)])
    if len(x) == 0:
        return float("nan"), float("nan")
    from scipy.stats import sem

    half = 1.96 * sem(x) if len(x) > 1 else float("nan")
    return float(x.mean()), float(half)


def agreement(methods: dict[str, MethodScores], k: int) -> pd.DataFrame:
    """Every ordered pair of methods (itself included): mean per-query Spearman with its 95% interval, mean
    per-query top-k overlap, and the same two against the whole query set."""
    records = []
    for a, ma in methods.items():
        for b, mb in methods.items():
            rhos = [spearman(x, y) for x, y in zip(ma.per_query, mb.per_query)]
            overlaps = [topk_overlap(x, y, k) for x, y in zip(ma.per_query, mb.per_query)]
            rho, half = mean_and_halfwidth(rhos)
            records.append({"method_a": a, "method_b": b, "queries": int(np.isfinite(rhos).sum()),
                            "mean_query_spearman": rho, "query_spearman_ci95": half,
                            f"mean_query_top{k}_overlap": float(np.mean(overlaps)) if overlaps else float("nan"),
                            "overall_spearman": spearman(ma.overall, mb.overall),
                            f"overall_top{k}_overlap": topk_overlap(ma.overall, mb.overall, k)})
    return pd.DataFrame.from_records(records)


def plain_counterpart(method: str, methods) -> str | None:
    """The same method without a preconditioner, where the run has it: bergson_<n>_<side> -> bergson_<n>;
    a Kronfluence strategy -> identity (raw gradient dot products)."""
    from playpen_attribution.methods import parse_method

    try:
        plain = parse_method(method).plain
    except ValueError:  # a table from elsewhere (e.g. the if-query tools' single "influence" method)
        return None
    return plain if plain in methods else None


def preconditioner_stability(agree: pd.DataFrame, methods) -> pd.DataFrame:
    """The playpen guide's question in one table: how stable are rankings with and without the preconditioner."""
    pairs = [(m, plain_counterpart(m, methods)) for m in methods]
    rows = []
    for with_, without in pairs:
        if without is None:
            continue
        row = agree[(agree.method_a == with_) & (agree.method_b == without)].iloc[0]
        rows.append({"with_preconditioner": with_, "without": without,
                     **{c: row[c] for c in agree.columns if c not in ("method_a", "method_b")}})
    columns = ["with_preconditioner", "without"] + [c for c in agree.columns if c not in ("method_a", "method_b")]
    return pd.DataFrame(rows, columns=columns)


def query_groups(queries: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Which queries count, and the cluster each belongs to, for intervals that respect the data.

    A query whose prompt and completion repeat an earlier query's is not counted again (its scores and losses are
    the same). Queries about one taboo target word are one cluster, resampled together; a query without a known
    target word is a cluster of its own text. Returns (counted mask, cluster label per query)."""
    texts = [f"{p}\x00{c}" for p, c in zip(queries["prompt"], queries["completion"])]
    counted = ~pd.Series(texts).duplicated().to_numpy()
    words = queries["target_word"] if "target_word" in queries else [None] * len(texts)
    clusters = [f"word:{w}" if isinstance(w, str) else f"text:{t}" for w, t in zip(words, texts)]
    return counted, clusters


def mean_and_cluster_interval(values, counted, clusters, *, seed: int, resamples: int = 2000,
                              ) -> tuple[float, float, float]:
    """Mean of the counted, finite values and its 95% percentile interval from a cluster bootstrap: whole clusters
    are drawn with replacement, so queries that share a target word do not pass for independent evidence."""
    values = np.asarray(values, float)
    keep = np.asarray(counted) & np.isfinite(values)
    if not keep.any():
        return float("nan"), float("nan"), float("nan")
    labels = pd.Series(np.asarray(clusters, dtype=object)[keep])
    codes, _ = pd.factorize(labels)
    sums = np.bincount(codes, weights=values[keep])
    sizes = np.bincount(codes).astype(float)
    mean = float(sums.sum() / sizes.sum())
    if len(sums) < 2:
        return mean, float("nan"), float("nan")
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return mean, float(low), float(high)
