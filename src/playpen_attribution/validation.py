"""Audits of the attribution itself. The planted-copy audit: copies of some queries (new ids) are scored as if
they were training rows, by every method, with the adapter, factors and preconditioners the run already has;
each copy's rank among the real training rows for its own query should be 1. A copy ranked low points at
misaligned ids, a wrong loss mask or a flipped sign."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.io import atomic_path, write_csv_atomic, write_json_atomic
from playpen_attribution.stage import log_time

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

    from playpen_attribution.scores import load_method_scores, read_run_tables
    from playpen_attribution.tables import load_shards

    queries, train = read_run_tables(query_csv, train_csv)
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
    write_csv_atomic(table, out_csv)
    write_csv_atomic(summary, out_summary)
    for row in summary.itertuples(index=False):
        log.info("%s: recall@1 %.2f, recall@10 %.2f, worst rank %s", row.method, row.recall_at_1, row.recall_at_10,
                 row.worst_rank)


# ---------------------------------------------------------------------------------------------------------
# linear datamodeling score (LDS)
# ---------------------------------------------------------------------------------------------------------
def lds_subset_rows(train_ids: list[str], subset: int, fraction: float, seed: int) -> list[str]:
    """The training rows of one LDS subset: drawn from (seed, subset) alone, so adding subsets never changes
    the earlier ones."""
    size = max(1, round(fraction * len(train_ids)))
    picked = np.random.default_rng([seed, subset]).choice(len(train_ids), size=size, replace=False)
    return [train_ids[i] for i in sorted(picked)]


def lds_batches(subsets: int, per_job: int) -> list[list[int]]:
    """Subset indices by retraining job: [0..k), [k..2k), ...; a new subset only ever extends the last job."""
    return [list(range(start, min(start + per_job, subsets))) for start in range(0, subsets, per_job)]


def lds_retrain_stage(base_model_dir, train_tokens_dir, out_dir, *, subsets: list[int], fraction: float, seed: int,
                      lora: dict, training: dict, max_length: int, dtype: str, base_model_source=None) -> None:
    """Rule `lds_retrain`: one LoRA adapter per subset, from the same base with the run's SFT settings, in one
    process (a cluster runs one job per subset; the demo groups them so it pays the imports once)."""
    import datasets

    from playpen_attribution.training import train_adapter

    train = datasets.load_from_disk(str(train_tokens_dir))
    ids = list(train["row_id"])
    index = {row_id: i for i, row_id in enumerate(ids)}
    with atomic_path(out_dir, directory=True) as tmp:
        record = {"fraction": fraction, "seed": seed, "subsets": {}}
        for subset in subsets:
            rows = lds_subset_rows(ids, subset, fraction, seed)
            tokens = Path(tmp) / f".tokens-{subset}"
            train.select([index[r] for r in rows]).save_to_disk(str(tokens))
            train_adapter(base_model_dir, tokens, Path(tmp) / f"subset-{subset}", lora=lora, training=training,
                          max_length=max_length, dtype=dtype, base_model_source=base_model_source)
            shutil.rmtree(tokens)
            record["subsets"][str(subset)] = rows
            # the trainer's own time, so a benchmark can tell training from process start and I/O
            manifest = json.loads((Path(tmp) / f"subset-{subset}" / "manifest.json").read_text())
            log_time(f"training subset {subset}", manifest["metrics"]["train_runtime"])
            log.info("subset %d: adapter trained on %d of %d rows", subset, len(rows), len(ids))
        write_json_atomic(record, Path(tmp) / "subsets.json")


def lds_losses_stage(retrain_dirs: list, query_tokens_dir, out_json, *, dtype: str) -> None:
    """Rule `lds_losses`: every query's summed completion loss under every subset's adapter."""
    import datasets

    from playpen_attribution.scores import query_losses

    query = datasets.load_from_disk(str(query_tokens_dir))
    result = {"query_ids": list(query["row_id"]), "subsets": {}}
    for folder in retrain_dirs:
        record = json.loads((Path(folder) / "subsets.json").read_text())
        for subset, rows in record["subsets"].items():
            start = time.perf_counter()
            losses = query_losses(str(Path(folder) / f"subset-{subset}"), query, dtype=dtype)
            log_time(f"query losses subset {subset}", time.perf_counter() - start)
            result["subsets"][subset] = {"row_ids": rows, "query_losses": losses}
    write_json_atomic(result, out_json)


def lds_scores(per_query: np.ndarray, membership: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """LDS per query: Spearman over subsets between the predicted effect of each subset (the sum of its rows'
    scores; positive = helpful) and the actual outcome (minus the query's loss after retraining on it).

    per_query [queries, train rows]; membership [subsets, train rows] (1 = in the subset); actual [subsets, queries].
    """
    from playpen_attribution.scores import spearman

    predicted = membership @ np.nan_to_num(per_query).T  # [subsets, queries]
    return np.array([spearman(predicted[:, q], actual[:, q]) for q in range(per_query.shape[0])])


def lds_stage(query_csv, train_csv, influences_csv, losses_json, out_csv, out_per_query, *, random_seed: int,
              train_scores_csv=None) -> None:
    """Rule `lds`: mean LDS over queries with a 95% interval, per method and for random scores."""
    from playpen_attribution.scores import load_method_scores, mean_and_halfwidth, read_run_tables

    queries, train = read_run_tables(query_csv, train_csv)
    query_ids, train_ids = queries["query_id"].tolist(), train["train_id"].tolist()
    losses = json.loads(Path(losses_json).read_text())
    if losses["query_ids"] != query_ids:
        raise ValueError(f"{losses_json} holds losses of other queries than {query_csv}; rerun lds_losses")
    order = sorted(losses["subsets"], key=int)
    column = {t: i for i, t in enumerate(train_ids)}
    membership = np.zeros((len(order), len(train_ids)))
    for s, subset in enumerate(order):
        membership[s, [column[r] for r in losses["subsets"][subset]["row_ids"]]] = 1.0
    actual = -np.array([losses["subsets"][s]["query_losses"] for s in order])  # lower loss = better
    methods = {m: ms.per_query for m, ms in load_method_scores(influences_csv, query_ids, train_ids,
                                                               train_scores_csv).items()}
    methods["random"] = np.random.default_rng(random_seed).normal(size=(len(query_ids), len(train_ids)))
    rows, per_query = [], []
    for method, scores in methods.items():
        values = lds_scores(scores, membership, actual)
        mean, half = mean_and_halfwidth(list(values))
        rows.append({"method": method, "lds": mean, "ci95": half, "queries": int(np.isfinite(values).sum()),
                     "subsets": len(order)})
        per_query += [{"method": method, "query_id": q, "lds": v} for q, v in zip(query_ids, values)]
    write_csv_atomic(pd.DataFrame(rows), out_csv)
    write_csv_atomic(pd.DataFrame(per_query), out_per_query)
    for row in rows:
        log.info("LDS %s: %.3f ± %.3f over %d queries, %d subsets", row["method"], row["lds"], row["ci95"],
                 row["queries"], row["subsets"])
