"""Audits of the attribution itself. The planted-copy audit: copies of some queries (new ids) are scored as if
they were training rows, by every method, with the adapter, factors and preconditioners the run already has;
each copy's rank among the real training rows for its own query should be 1. A copy ranked low points at
misaligned ids, a wrong loss mask or a flipped sign."""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.io import atomic_path, write_csv_atomic, write_json_atomic
from playpen_attribution.settings import PlantedCopies
from playpen_attribution.stage import log_time

log = logging.getLogger(__name__)

PLANTED_PREFIX = "planted-"


def choose_planted(query_ids: list[str], count: int, seed: int) -> list[str]:
    """`count` query ids (all if fewer), drawn with `seed`, in query order."""
    count = min(count, len(query_ids))
    picked = np.random.default_rng(seed).choice(len(query_ids), size=count, replace=False)
    return [query_ids[i] for i in sorted(picked)]


def plant_copies_stage(query_tokens_dir, out_dir, *, settings: PlantedCopies) -> None:
    """Rule `planted_copies`: the chosen query rows, tokens unchanged, under ids `planted-<query id>`."""
    import datasets

    query = datasets.load_from_disk(str(query_tokens_dir))
    count, seed = settings.queries, settings.seed
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
    """Each copy's rank among the training rows for its own query: 1 + rows scoring at least as high (a tie is
    not a win, so a baseline that gives many rows the copy's score does not rank it first).

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
                        "rank": int(1 + np.sum(others >= score)) if np.isfinite(score) else None,
                        "of": int(len(others) + 1),
                        "best_other_train_id": train_ids[best] if best is not None else None,
                        "best_other_score": float(per_query[q][best]) if best is not None else None,
                        "duplicates_left_out": len(skip)})
    return records


def planted_copy_rows(queries: pd.DataFrame, train: pd.DataFrame, copy_ids: list[str]):
    """The query each copy copies, those queries' rows (in copy order), and per query the training rows that
    already are verbatim copies of it (prompt and completion), which the audit leaves out."""
    copy_query_ids = [c.removeprefix(PLANTED_PREFIX) for c in copy_ids]
    copy_rows = queries.set_index("query_id").loc[copy_query_ids].reset_index()
    duplicates = {q: set(train.train_id[(train.prompt == p) & (train.completion == c)])
                  for q, p, c in copy_rows[["query_id", "prompt", "completion"]].itertuples(index=False)}
    return copy_query_ids, copy_rows, duplicates


def recall_summary(ranks) -> dict:
    """recall@1, recall@10 and the median rank of the copies' ranks."""
    ranks = pd.Series(ranks, dtype=float)
    return {"recall_at_1": float((ranks == 1).mean()), "recall_at_10": float((ranks <= 10).mean()),
            "median_rank": float(ranks.median())}


def with_baselines(methods: dict[str, np.ndarray], queries: pd.DataFrame, rows: pd.DataFrame, *, corpus: list[str],
                   seed: int) -> dict[str, np.ndarray]:
    """The methods' [queries, rows] scores, then each method's query-independent version and the model-free
    baselines (playpen_attribution.baselines), computed for exactly these rows."""
    from playpen_attribution.baselines import baseline_scores, query_independent, query_independent_name

    scores = dict(methods)
    scores.update({query_independent_name(m): query_independent(s) for m, s in methods.items()})
    scores.update(baseline_scores(queries, rows, corpus=corpus, seed=seed))
    return scores


def planted_audit_stage(query_csv, train_csv, influences_csv, copies_dir, shards_by_method: dict, out_csv,
                        out_summary, *, random_seed: int, train_scores_csv=None) -> None:
    """Rule `planted_audit`: the rank of every copy for every method and baseline, and recall@1 / recall@10."""
    import datasets

    from playpen_attribution.baselines import is_baseline, run_corpus
    from playpen_attribution.scores import load_method_scores, read_run_tables
    from playpen_attribution.tables import load_shards
    from playpen_attribution.taboo import with_target_words

    queries, train = (with_target_words(frame) for frame in read_run_tables(query_csv, train_csv))
    query_ids, train_ids = queries["query_id"].tolist(), train["train_id"].tolist()
    copies = datasets.load_from_disk(str(copies_dir))
    copy_ids = list(copies["row_id"])
    copy_query_ids, copy_rows, duplicates = planted_copy_rows(queries, train, copy_ids)
    loaded = load_method_scores(influences_csv, query_ids, train_ids, train_scores_csv)
    train_scores, copy_scores = {}, {}
    for method, paths in shards_by_method.items():
        planted = load_shards(paths)
        if planted["train_ids"] != copy_ids or planted["query_ids"] != query_ids:
            raise ValueError(f"{paths[0]}: scored other copies or queries than {copies_dir}; rerun its scoring")
        train_scores[method], copy_scores[method] = loaded[method].per_query, planted["scores"]
    corpus = run_corpus(queries, train)
    # the same seed for both: a random baseline's copy is just one more random row
    train_scores = with_baselines(train_scores, queries, train, corpus=corpus, seed=random_seed)
    copy_scores = with_baselines(copy_scores, queries, copy_rows, corpus=corpus, seed=random_seed + 1)
    records = []
    for name, scores in train_scores.items():
        for row in copy_ranks(scores, query_ids, train_ids, copy_scores[name], copy_query_ids, copy_ids, duplicates):
            records.append({"method": name, "kind": "baseline" if is_baseline(name) else "method", **row})
    table = pd.DataFrame.from_records(records)
    summary = pd.DataFrame.from_records(
        [{"method": method, "kind": kind, "copies": len(group), **recall_summary(group["rank"]),
          "worst_rank": group["rank"].max()}
         for (method, kind), group in table.groupby(["method", "kind"], sort=False)])
    write_csv_atomic(table, out_csv)
    write_csv_atomic(summary, out_summary)
    for row in summary.itertuples(index=False):
        log.info("%s (%s): recall@1 %.2f, recall@10 %.2f, worst rank %s", row.method, row.kind, row.recall_at_1,
                 row.recall_at_10, row.worst_rank)


# ---------------------------------------------------------------------------------------------------------
# linear datamodeling score (LDS)
# ---------------------------------------------------------------------------------------------------------
def lds_losses_stage(retrain_dirs: list, query_tokens_dir, out_json, *, dtype: str) -> None:
    """Rule `lds_losses`: every query's summed completion loss under every retrained adapter. Per subset: its rows,
    the losses of each repeat (`repeat_losses`, in repeat order, with `training_seeds`) and their mean
    (`query_losses`, the LDS's outcome)."""
    import datasets

    from playpen_attribution.scores import query_losses

    query = datasets.load_from_disk(str(query_tokens_dir))
    by_subset: dict[str, dict] = {}
    for folder in retrain_dirs:
        record = json.loads((Path(folder) / "subsets.json").read_text())
        repeat, seed = record.get("repeat", 0), record.get("training_seed")
        for subset, rows in record["subsets"].items():
            start = time.perf_counter()
            losses = query_losses(str(Path(folder) / f"subset-{subset}"), query, dtype=dtype)
            log_time(f"query losses subset {subset} repeat {repeat}", time.perf_counter() - start)
            entry = by_subset.setdefault(subset, {"row_ids": rows, "repeats": {}})
            if entry["row_ids"] != rows:
                raise ValueError(f"{folder}: subset {subset} holds other rows than in another repeat's folder; "
                                 "rerun its lds_retrain job (validation.lds.fraction or seed changed in between?)")
            entry["repeats"][repeat] = (seed, losses)
    result = {"query_ids": list(query["row_id"]), "subsets": {}}
    for subset, entry in by_subset.items():
        order = sorted(entry["repeats"])
        per_repeat = [entry["repeats"][r][1] for r in order]
        result["subsets"][subset] = {"row_ids": entry["row_ids"],
                                     "query_losses": np.mean(per_repeat, axis=0).tolist(),
                                     "repeat_losses": per_repeat,
                                     "training_seeds": [entry["repeats"][r][0] for r in order]}
    write_json_atomic(result, out_json)


def column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of two [n, columns] arrays (Pearson of average ranks, as scipy's
    spearmanr); NaN for a column with fewer than 3 rows or a constant side."""
    from scipy.stats import rankdata

    if len(a) < 3:
        return np.full(a.shape[1], np.nan)
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    norm = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(axis=0) / norm, np.nan)


def split_half_agreement(repeat_outcomes: np.ndarray, max_splits: int = 50, seed: int = 0) -> np.ndarray:
    """The noise ceiling of an LDS whose outcome is averaged over R repeats, per query.

    `repeat_outcomes` [repeats, subsets, queries]. For each split of the repeats into two disjoint halves of
    h = R // 2 (all splits, or `max_splits` drawn with `seed`), the Spearman correlation over subsets between
    the halves' mean outcomes; the mean over splits is the agreement of an h-repeat average, stepped up to R
    repeats by Spearman-Brown, n rho / (1 + (n - 1) rho) with n = R / h: the reliability of the outcome the LDS
    is computed against. NaN with fewer than 2 repeats (no ceiling is known) or 3 subsets.
    """
    import itertools

    repeats, subsets, queries = repeat_outcomes.shape
    if repeats < 2 or subsets < 3:
        return np.full(queries, np.nan)
    half = repeats // 2
    splits = [c for c in itertools.combinations(range(repeats), half) if 0 in c or 2 * half < repeats]
    if len(splits) > max_splits:
        picked = np.random.default_rng(seed).choice(len(splits), size=max_splits, replace=False)
        splits = [splits[i] for i in sorted(picked)]
    n = repeats / half
    rhos = np.array([column_spearman(repeat_outcomes[list(first)].mean(0),
                                     repeat_outcomes[[r for r in range(repeats) if r not in first][:half]].mean(0))
                     for first in splits])  # [splits, queries]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a query without a finite split stays NaN
        rho = np.nanmean(rhos, axis=0)
    # a negative agreement steps up past -1 (-0.5 becomes -2 at n = 2): clipped to a correlation's range
    return np.clip(n * rho / (1 + (n - 1) * rho), -1, 1)


def lds_scores(per_query: np.ndarray, membership: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """LDS per query: Spearman over subsets between the predicted effect of each subset (the sum of its rows'
    scores; positive = helpful) and the actual outcome (minus the query's loss after retraining on it).

    per_query [queries, train rows]; membership [subsets, train rows] (1 = in the subset); actual [subsets, queries].
    A constant prediction (a baseline that cannot tell the subsets apart) scores 0, not NaN, so every method is
    averaged over the same queries; a query whose actual losses do not vary, or fewer than 3 subsets, stays NaN.
    """
    return lds_of_predictions(membership @ np.nan_to_num(per_query).T, actual)


def lds_of_predictions(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """`lds_scores` from the predicted effects [subsets, queries] (membership @ scores.T), or of several methods at
    once, [subsets, methods, queries] -> [methods, queries] (one ranking pass for all: the bootstrap calls this
    thousands of times)."""
    subsets, queries = actual.shape
    by_method = predicted.reshape(subsets, -1, queries)
    methods = by_method.shape[1]
    rho = column_spearman(by_method.reshape(subsets, -1), np.tile(actual, (1, methods))).reshape(methods, queries)
    flat = (np.ptp(by_method, axis=0) == 0) & (np.ptp(actual, axis=0) > 0) & (subsets >= 3)
    return np.where(flat, 0.0, rho).reshape(predicted.shape[1:])


def counted_mean(values: np.ndarray, counted) -> float:
    """Mean of the counted, finite per-query values (NaN where there are none)."""
    keep = np.asarray(counted, bool) & np.isfinite(values)
    return float(values[keep].mean()) if keep.any() else float("nan")


def subset_and_cluster_bootstrap(per_query, subsets: int, counted, clusters, *, seed: int, resamples: int = 2000,
                                 ) -> dict[str, tuple[float, float, float]]:
    """Means over queries, each with a 95% percentile interval from a bootstrap that draws both things an LDS
    samples: the retrained subsets (with replacement) and the queries (whole target-word clusters, as
    `mean_and_cluster_interval`). Every statistic an LDS reports is a Spearman over subsets, and the subsets are
    shared by every query: a few subsets that happen to differ much move every query's correlation together, so
    an interval over queries alone is too narrow (on smol the noise ceiling of subsets 0-9 is 0.02 and of 10-19
    0.50, against a query-only interval of +-0.1).

    `per_query(draw)` -> {name: per-query values} computed on the subsets `draw` (indices into the subsets, with
    repeats); called once with every subset in order for the means, then once per resample. Returns {name: (mean,
    low, high)}; the mean is that of the counted, finite values (as mean_and_cluster_interval's), the interval NaN
    with fewer than 2 clusters or 3 subsets (a Spearman over fewer is not defined)."""
    return shared_and_cluster_bootstrap(lambda draws: per_query(draws[0]), (subsets,), counted, clusters, seed=seed,
                                        resamples=resamples, least=(3,))


def shared_and_cluster_bootstrap(per_query, sizes: tuple[int, ...], counted, clusters, *, seed: int,
                                 resamples: int = 2000, least: tuple[int, ...] | None = None,
                                 ) -> dict[str, tuple[float, float, float]]:
    """`subset_and_cluster_bootstrap` over any number of axes that every query shares (retrained subsets, training
    seeds, random control draws): each resample draws each axis's indices with replacement, in order, and the
    queries' clusters. `per_query(draws)` gets one index array per axis (every index in order for the means); an
    axis of size 0 is drawn as an empty array. The interval is NaN with fewer than 2 counted clusters or an axis
    smaller than its `least` (default 1)."""
    counted = np.asarray(counted, bool)
    codes, labels = pd.factorize(pd.Series(np.asarray(clusters, dtype=object)))
    point = per_query(tuple(np.arange(n) for n in sizes))
    means = {name: counted_mean(values, counted) for name, values in point.items()}
    counted_clusters = np.unique(codes[counted])
    if len(counted_clusters) < 2 or any(n < low for n, low in zip(sizes, least or (1,) * len(sizes))):
        return {name: (mean, float("nan"), float("nan")) for name, mean in means.items()}
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in point}
    for _ in range(resamples):
        shared = tuple(rng.integers(0, n, size=n) if n else np.arange(0) for n in sizes)
        times = np.bincount(rng.choice(counted_clusters, size=len(counted_clusters)), minlength=len(labels))
        weights = np.where(counted, times[codes], 0).astype(float)  # how often each query was drawn
        for name, values in per_query(shared).items():
            w = np.where(np.isfinite(values), weights, 0.0)
            draws[name].append(float((w * np.nan_to_num(values)).sum() / w.sum()) if w.sum() else np.nan)
    result = {}
    for name, mean in means.items():
        values = np.asarray(draws[name])
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (np.nan, np.nan)
        result[name] = (mean, float(low), float(high))
    return result


def read_lds_losses(losses_json, query_ids: list[str], train_ids: list[str], query_csv,
                    with_repeats: bool = False):
    """The retrains as membership [subsets, train rows] (1 = in the subset) and the actual outcome [subsets,
    queries] (minus each query's loss averaged over the repeats: lower loss = better), in subset order; with
    `with_repeats`, also each repeat's outcome [repeats, subsets, queries] (the noise ceiling's input; None when
    the subsets were not all retrained the same number of times)."""
    losses = json.loads(Path(losses_json).read_text())
    if losses["query_ids"] != query_ids:
        raise ValueError(f"{losses_json} holds losses of other queries than {query_csv}; rerun lds_losses")
    order = sorted(losses["subsets"], key=int)
    column = {t: i for i, t in enumerate(train_ids)}
    membership = np.zeros((len(order), len(train_ids)))
    for s, subset in enumerate(order):
        membership[s, [column[r] for r in losses["subsets"][subset]["row_ids"]]] = 1.0
    actual = -np.array([losses["subsets"][s]["query_losses"] for s in order])
    if not with_repeats:
        return membership, actual
    per_subset = [losses["subsets"][s].get("repeat_losses", [losses["subsets"][s]["query_losses"]]) for s in order]
    repeats = None
    if order and len({len(r) for r in per_subset}) == 1:
        repeats = -np.array(per_subset).transpose(1, 0, 2)
    return membership, actual, repeats


def lds_inputs(query_csv, train_csv, influences_csv, losses_json, train_scores_csv=None):
    """What an LDS reads: (queries, train, membership [subsets, rows], actual [subsets, queries], repeats or None,
    {method: per-query scores [queries, rows]})."""
    from playpen_attribution.scores import load_method_scores, read_run_tables
    from playpen_attribution.taboo import with_target_words

    queries, train = (with_target_words(frame) for frame in read_run_tables(query_csv, train_csv))
    query_ids, train_ids = queries["query_id"].tolist(), train["train_id"].tolist()
    membership, actual, repeats = read_lds_losses(losses_json, query_ids, train_ids, query_csv, with_repeats=True)
    methods = {m: ms.per_query for m, ms in load_method_scores(influences_csv, query_ids, train_ids,
                                                               train_scores_csv).items()}
    return queries, train, membership, actual, repeats, methods


def method_predictions(run_dir, losses_json=None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list]:
    """A finished run's methods as the LDS sees them, from its merged tables under `run_dir` (results/<run>):
    ({method: predicted effects [subsets, queries]}, actual outcome [subsets, queries], counted, clusters), for
    comparing the same method across two configurations measured against the same retrains (`losses_json`: another
    run's retrains instead of its own)."""
    from playpen_attribution.scores import query_groups

    run_dir = Path(run_dir)
    train_scores = run_dir / "train_scores.csv"
    queries, _, membership, actual, _, methods = lds_inputs(
        run_dir / "query.csv", run_dir / "train.csv", run_dir / "influences.csv",
        losses_json or run_dir / "validation" / "lds" / "query_losses.json",
        train_scores if train_scores.is_file() else None)
    counted, clusters = query_groups(queries)
    return {m: membership @ np.nan_to_num(s).T for m, s in methods.items()}, actual, counted, clusters


def best_baseline(method: str, lds: dict[str, float]) -> str | None:
    """The strongest baseline a method is measured against: the model-free ones and its own query-independent
    version (the mean LDS decides; NaN never wins)."""
    from playpen_attribution.baselines import BASELINE_NAMES, query_independent_name

    rivals = [b for b in (*BASELINE_NAMES, query_independent_name(method)) if b in lds and np.isfinite(lds[b])]
    return max(rivals, key=lambda b: lds[b]) if rivals else None


def lds_stage(query_csv, train_csv, influences_csv, losses_json, out_csv, out_per_query, *, random_seed: int,
              train_scores_csv=None) -> None:
    """Rule `lds`: mean LDS per method and baseline, each method's margin over its best baseline and its difference
    from its plain counterpart (paired: the same subsets and queries), and the noise ceiling the repeats allow
    (`split_half_agreement`; NaN with one repeat: not known, not faked), each with a 95% interval that resamples
    both the subsets and the queries' clusters (`subset_and_cluster_bootstrap`)."""
    from playpen_attribution.baselines import is_baseline, run_corpus
    from playpen_attribution.scores import plain_counterpart, query_groups

    queries, train, membership, actual, repeats, methods = lds_inputs(query_csv, train_csv, influences_csv,
                                                                       losses_json, train_scores_csv)
    query_ids = queries["query_id"].tolist()
    scores = with_baselines(methods, queries, train, corpus=run_corpus(queries, train), seed=random_seed)
    counted, clusters = query_groups(queries)
    names = list(scores)
    # predicted effects of every method and baseline: [subsets, methods, queries]
    stacked = np.stack([membership @ np.nan_to_num(scores[name]).T for name in names], axis=1)
    values = dict(zip(names, lds_of_predictions(stacked, actual)))
    ceiling = (split_half_agreement(repeats, seed=random_seed) if repeats is not None
               else np.full(len(query_ids), np.nan))
    means = {name: counted_mean(v, counted) for name, v in values.items()}
    rivals = {name: best_baseline(name, means) for name in values if not is_baseline(name)}
    plains = {name: plain_counterpart(name, list(values)) for name in values if not is_baseline(name)}

    def statistics(draw):
        """Per query, on the subsets `draw`: every LDS, each method's margin over its best baseline and over its
        plain counterpart (paired: the same subsets and queries), and the noise ceiling."""
        lds = dict(zip(names, lds_of_predictions(stacked[draw], actual[draw])))
        stats = {f"lds:{name}": v for name, v in lds.items()}
        stats.update({f"margin:{name}": lds[name] - lds[rival] for name, rival in rivals.items() if rival})
        stats.update({f"minus_plain:{name}": lds[name] - lds[plain] for name, plain in plains.items() if plain})
        if repeats is not None:
            stats["ceiling"] = split_half_agreement(repeats[:, draw], seed=random_seed)
        return stats

    intervals = subset_and_cluster_bootstrap(statistics, len(membership), counted, clusters, seed=random_seed)
    nan3 = (np.nan, np.nan, np.nan)
    ceiling_mean, ceiling_low, ceiling_high = intervals.get("ceiling", nan3)
    rows, per_query = [], []
    for name, v in values.items():
        mean, low, high = intervals[f"lds:{name}"]
        row = {"method": name, "kind": "baseline" if is_baseline(name) else "method", "lds": mean,
               "ci95_low": low, "ci95_high": high, "queries": int((counted & np.isfinite(v)).sum()),
               "clusters": len({c for c, k in zip(clusters, counted & np.isfinite(v)) if k}), "subsets": len(membership),
               "best_baseline": None, "margin": np.nan, "margin_ci95_low": np.nan, "margin_ci95_high": np.nan,
               "plain": None, "minus_plain": np.nan, "minus_plain_ci95_low": np.nan, "minus_plain_ci95_high": np.nan,
               "repeats": 0 if repeats is None else len(repeats), "noise_ceiling": ceiling_mean,
               "noise_ceiling_ci95_low": ceiling_low, "noise_ceiling_ci95_high": ceiling_high}
        if rivals.get(name):
            margin, m_low, m_high = intervals[f"margin:{name}"]
            row.update(best_baseline=rivals[name], margin=margin, margin_ci95_low=m_low, margin_ci95_high=m_high)
        if plains.get(name):
            diff, d_low, d_high = intervals[f"minus_plain:{name}"]
            row.update(plain=plains[name], minus_plain=diff, minus_plain_ci95_low=d_low, minus_plain_ci95_high=d_high)
        rows.append(row)
        per_query += [{"method": name, "query_id": q, "lds": x, "noise_ceiling": ceil, "counted": bool(k),
                       "cluster": c} for q, x, ceil, k, c in zip(query_ids, v, ceiling, counted, clusters)]
    write_csv_atomic(pd.DataFrame(rows), out_csv)
    write_csv_atomic(pd.DataFrame(per_query), out_per_query)
    for row in rows:
        margin = (f"; {row['margin']:+.3f} [{row['margin_ci95_low']:+.3f}, {row['margin_ci95_high']:+.3f}] over "
                  f"{row['best_baseline']}" if row["best_baseline"] else "")
        log.info("LDS %s: %.3f [%.3f, %.3f] over %d queries in %d clusters, %d subsets%s", row["method"], row["lds"],
                 row["ci95_low"], row["ci95_high"], row["queries"], row["clusters"], row["subsets"], margin)
    log.info("noise ceiling (split-half agreement of %s repeats): %.3f [%.3f, %.3f]",
             0 if repeats is None else len(repeats), ceiling_mean, ceiling_low, ceiling_high)


# ---------------------------------------------------------------------------------------------------------
# damping sweep
# ---------------------------------------------------------------------------------------------------------
def damping_sweep_stage(query_csv, train_csv, sweeps: dict, out_csv, out_png, *, seed: int, losses_json=None,
                        copies_dir=None, lds_csv=None) -> None:
    """Rule `damping_sweep`: per method and relative damping factor, the LDS (with its interval) and the
    planted copies' recall, from the scores the sweep jobs computed with the run's adapter, factors and
    preconditioners; `damping.png` draws both against the damping factor, the best model-free baseline's
    LDS beside them."""
    import datasets

    from playpen_attribution.baselines import BASELINE_NAMES
    from playpen_attribution.scores import query_groups, read_run_tables
    from playpen_attribution.tables import load_sweep
    from playpen_attribution.taboo import with_target_words

    queries, train = (with_target_words(frame) for frame in read_run_tables(query_csv, train_csv))
    query_ids, train_ids = queries["query_id"].tolist(), train["train_id"].tolist()
    counted, clusters = query_groups(queries)
    if losses_json:
        membership, actual = read_lds_losses(losses_json, query_ids, train_ids, query_csv)
    copy_ids = list(datasets.load_from_disk(str(copies_dir))["row_id"]) if copies_dir else []
    copy_query_ids, _, duplicates = planted_copy_rows(queries, train, copy_ids)
    records, predicted = [], []
    for method, path in sweeps.items():
        sweep = load_sweep(path)
        if sweep["query_ids"] != query_ids or set(sweep["row_ids"]) != set(train_ids) | set(copy_ids):
            raise ValueError(f"{path}: scored other queries or rows than {query_csv} / {train_csv} and the planted "
                             "copies; rerun the damping sweep")
        position = {r: i for i, r in enumerate(sweep["row_ids"])}
        train_cols, copy_cols = [position[t] for t in train_ids], [position[c] for c in copy_ids]
        for scale, scores in zip(sweep["damping"], sweep["scores"]):
            recall = {}
            if losses_json:
                predicted.append(membership @ np.nan_to_num(scores[:, train_cols]).T)
            if copy_ids:
                ranks = [r["rank"] for r in copy_ranks(scores[:, train_cols], query_ids, train_ids,
                                                       scores[:, copy_cols], copy_query_ids, copy_ids, duplicates)]
                recall = recall_summary(ranks)
            records.append(({"method": method, "damping": scale}, recall))
    if losses_json:
        # every method x damping in one bootstrap, one ranking pass per resample (as the lds stage): the same draws
        # as a bootstrap per row, since each starts from the seed
        stacked = np.stack(predicted, axis=1)  # [subsets, rows of the table, queries]
        intervals = subset_and_cluster_bootstrap(
            lambda draw: dict(enumerate(lds_of_predictions(stacked[draw], actual[draw]))), len(membership),
            counted, clusters, seed=seed)
        for index, (row, _) in enumerate(records):
            row.update(zip(("lds", "ci95_low", "ci95_high"), intervals[index]))
    records = [{**row, **recall} for row, recall in records]
    table = pd.DataFrame.from_records(records)
    write_csv_atomic(table, out_csv)
    baseline = None
    if lds_csv:
        lds = pd.read_csv(lds_csv)
        lds = lds[lds.method.isin(BASELINE_NAMES)]
        if len(lds):
            baseline = lds.loc[lds.lds.idxmax(), ["method", "lds"]].tolist()
    plot_damping_sweep(table, out_png, baseline)
    for row in records:
        log.info("damping %s %g: %s", row["method"], row["damping"],
                 ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("method", "damping")))


def plot_damping_sweep(table: pd.DataFrame, path, baseline=None) -> None:
    """LDS and planted recall@1 against the relative damping factor (log scale), one line per method."""
    from playpen_attribution.plots import pyplot, save_png

    panels = [c for c in ("lds", "recall_at_1") if c in table]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for ax, column in zip(axes[0], panels):
        for method, group in table.groupby("method", sort=False):
            ax.plot(group.damping, group[column], marker="o", label=method)
            if column == "lds":
                ax.fill_between(group.damping, group.ci95_low, group.ci95_high, alpha=0.15)
        if column == "lds" and baseline is not None:
            ax.axhline(baseline[1], color="grey", ls="--", lw=1, label=f"best baseline ({baseline[0]})")
        ax.set_xscale("log")
        ax.set_xlabel("damping factor c (x mean eigenvalue)")
        ax.set_ylabel({"lds": "mean LDS", "recall_at_1": "planted recall@1"}[column])
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
