"""Audits of the attribution itself. The planted-copy audit: copies of some queries (new ids) are scored as if
they were training rows, by every method, with the adapter, factors and preconditioners the run already has;
each copy's rank among the real training rows for its own query should be 1. A copy ranked low points at
misaligned ids, a wrong loss mask or a flipped sign."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

PLANTED_PREFIX = "planted-"


def choose_planted(query_ids: list[str], count: int, seed: int) -> list[str]:
    """`count` query ids (all if fewer), drawn with `seed`, in query order."""
    count = min(count, len(query_ids))
    picked = np.random.default_rng(seed).choice(len(query_ids), size=count, replace=False)
    return [query_ids[i] for i in sorted(picked)]


def plant_copies_stage(query_tokens_dir, out_dir, *, count: int, seed: int) -> None:
    """Rule `planted_copies`: the chosen query rows, tokens unchanged, under ids `planted-<query id>`."""
    import datasets

    query = datasets.load_from_disk(str(query_tokens_dir))
    if count < 1:
        raise ValueError("validation.planted.queries is 0: set it to the number of queries to plant copies of")
    chosen = choose_planted(list(query["row_id"]), count, seed)
    index = {row_id: i for i, row_id in enumerate(query["row_id"])}
    copies = query.select([index[q] for q in chosen]).map(lambda row: {"row_id": PLANTED_PREFIX + row["row_id"]})
    with atomic_path(out_dir, directory=True) as tmp:
        copies.save_to_disk(str(tmp))
        write_json_atomic({"planted_from": chosen, "seed": seed}, Path(tmp) / "planted.json")
    log.info("planted copies of %d queries: %s", len(chosen), chosen)


def copy_ranks(per_query: np.ndarray, query_ids: list[str], train_ids: list[str], copy_scores: np.ndarray,
               copy_query_ids: list[str], copy_ids: list[str], duplicates: dict[str, set[str]]) -> list[dict]:
    """Each copy's rank among the training rows for its own query: 1 + rows scoring strictly higher.

    `per_query` [queries, train rows] are the run's scores; `copy_scores` [queries, copies] the copies' scores
    against the same queries. Training rows that already are verbatim copies of the query (`duplicates`) are
    left out: the audit asks whether the copy beats every *other* row. Unscored (NaN) rows are left out too.
    """
    q_index = {q: i for i, q in enumerate(query_ids)}
    records = []
    for c, (copy_id, query_id) in enumerate(zip(copy_ids, copy_query_ids)):
        q = q_index[query_id]
        keep = ~np.isnan(per_query[q])
        skip = duplicates.get(query_id, set())
        keep &= np.array([t not in skip for t in train_ids])
        others = per_query[q][keep]
        score = float(copy_scores[q, c])
        best = int(np.flatnonzero(keep)[np.argmax(others)]) if len(others) else None
        records.append({"query_id": query_id, "copy_id": copy_id, "copy_score": score,
                        "rank": int(1 + np.sum(others > score)) if np.isfinite(score) else None,
                        "of": int(len(others) + 1),
                        "best_other_train_id": train_ids[best] if best is not None else None,
                        "best_other_score": float(per_query[q][best]) if best is not None else None,
                        "duplicates_left_out": len(skip)})
    return records


def planted_audit_stage(query_csv, train_csv, influences_csv, copies_dir, shards_by_method: dict, out_csv,
                        out_summary, train_scores_csv=None) -> None:
    """Rule `planted_audit`: the rank of every copy for every method, and recall@1 / recall@10 per method."""
    import datasets

    from playpen_attribution.report import load_method_scores
    from playpen_attribution.tables import load_shards

    queries = pd.read_csv(query_csv, dtype={"query_id": str})
    train = pd.read_csv(train_csv, dtype={"train_id": str})
    query_ids, train_ids = queries["query_id"].tolist(), train["train_id"].tolist()
    copies = datasets.load_from_disk(str(copies_dir))
    copy_ids = list(copies["row_id"])
    copy_query_ids = [c.removeprefix(PLANTED_PREFIX) for c in copy_ids]
    text = {tuple(r) for r in queries.loc[queries.query_id.isin(copy_query_ids), ["query_id", "prompt", "completion"]]
            .itertuples(index=False)}
    duplicates = {q: set(train.train_id[(train.prompt == p) & (train.completion == c)]) for q, p, c in text}
    methods = load_method_scores(influences_csv, query_ids, train_ids, train_scores_csv)
    records = []
    for method, paths in shards_by_method.items():
        planted = load_shards(paths)
        if planted["train_ids"] != copy_ids or planted["query_ids"] != query_ids:
            raise ValueError(f"{paths[0]}: scored other copies or queries than {copies_dir}; rerun its scoring")
        for row in copy_ranks(methods[method].per_query, query_ids, train_ids, planted["scores"], copy_query_ids,
                              copy_ids, duplicates):
            records.append({"method": method, **row})
    table = pd.DataFrame.from_records(records)
    summary = (table.groupby("method", sort=False)
               .agg(copies=("rank", "size"), recall_at_1=("rank", lambda r: float((r == 1).mean())),
                    recall_at_10=("rank", lambda r: float((r <= 10).mean())), median_rank=("rank", "median"),
                    worst_rank=("rank", "max"))
               .reset_index())
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_summary) as tmp:
        summary.to_csv(tmp, index=False)
    for row in summary.itertuples(index=False):
        log.info("%s: recall@1 %.2f, recall@10 %.2f, worst rank %s", row.method, row.recall_at_1, row.recall_at_10,
                 row.worst_rank)
