"""The removal check: remove the training rows a method ranks most helpful for the query set, retrain, and see the
query set's loss rise, beside the same removal chosen by TF-IDF and by random draws (the controls).

Bergson's filter semantics (`FilterConfig(direction="proponents", fraction=...)` with `ControlsConfig(count=3)`),
Kronfluence's counterfactual example (`run_counterfactual.py`), retrained with the run's own SFT settings (TRL,
LoRA) rather than Bergson's trainer, so the retrains are the run's training minus the removed rows.

Selections (what chooses the removed rows):
- `none`: nothing removed, the reference every rise is measured from (trained with the same seeds);
- each method of the run: its one score per training row against the whole query set (Bergson: the reduced query
  gradient, train_scores.csv; influence functions: the mean of the per-query scores), the top k;
- `tfidf`: the rows most similar in text to the query set (mean TF-IDF cosine over the queries), the top k;
- `random-<i>`: k rows drawn with (seed, i).
k = round(fraction x training rows) for every fraction; a selection's removals are nested (its 5% is inside its
10%). Every selection is retrained once per repeat (training seed training.seed + repeat), as the LDS's retrains.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.io import write_csv_atomic, write_json_atomic
from playpen_attribution.settings import Lora, RemovalChoice, Training

log = logging.getLogger(__name__)

REFERENCE = "none"
RANDOM_PREFIX = "random-"


def removal_count(fraction: float, rows: int) -> int:
    """Rows removed at `fraction` of `rows`: at least one, never all."""
    return int(min(max(1, round(fraction * rows)), rows - 1))


def top_rows(scores: np.ndarray, train_ids: list[str], count: int) -> list[str]:
    """The `count` rows with the highest score (most helpful first); ties keep training order, unscored (NaN)
    rows come last."""
    order = np.argsort(-np.nan_to_num(np.asarray(scores, float), nan=-np.inf), kind="stable")
    return [train_ids[i] for i in order[:count]]


def random_rows(train_ids: list[str], count: int, seed: int, draw: int) -> list[str]:
    """`count` rows of random draw `draw`, from (seed, draw) alone: the first `count` of one permutation, so a
    draw's smaller removals are inside its larger ones, as a method's are."""
    order = np.random.default_rng([seed, draw]).permutation(len(train_ids))
    return [train_ids[i] for i in order[:count]]


def is_random(selection: str) -> bool:
    return selection.startswith(RANDOM_PREFIX)


def selection_rows(selection: str, queries: pd.DataFrame, train: pd.DataFrame, *, fractions: list[float],
                   seed: int | None = None, methods: dict | None = None) -> dict:
    """The rows `selection` removes at each fraction ({fraction: [train ids]}, most helpful first) and its kind:
    `none` (the reference: nothing), `tfidf`, `random-<i>` (drawn with `seed`) or a method of `methods`
    (`MethodScores` by name: its score against the whole query set)."""
    from playpen_attribution.baselines import episode_text, run_corpus, tfidf_scores

    train_ids = train["train_id"].tolist()
    counts = {f"{f:g}": removal_count(f, len(train_ids)) for f in fractions}
    if selection == REFERENCE:
        return {"kind": "reference", "removed": {}}
    if is_random(selection):
        draw = int(selection.removeprefix(RANDOM_PREFIX))
        return {"kind": "control", "removed": {f: random_rows(train_ids, k, seed, draw) for f, k in counts.items()}}
    if selection == "tfidf":
        tfidf = tfidf_scores([episode_text(p, c) for p, c in zip(queries.prompt, queries.completion)],
                             [episode_text(p, c) for p, c in zip(train.prompt, train.completion)],
                             run_corpus(queries, train)).mean(axis=0)
        return {"kind": "baseline", "removed": {f: top_rows(tfidf, train_ids, k) for f, k in counts.items()}}
    if methods is None or selection not in methods:
        raise ValueError(f"removal selection {selection!r} is neither none, tfidf, random-<i> nor a method of the run "
                         f"({sorted(methods or [])})")
    scores = methods[selection]
    return {"kind": "method", "source": scores.overall_source,
            "removed": {f: top_rows(scores.overall, train_ids, k) for f, k in counts.items()}}


def removal_rows_stage(query_csv, train_csv, out_json, *, selection: str, settings: RemovalChoice,
                       influences_csv=None, train_scores_csv=None) -> None:
    """Rule `removal_rows`: the rows one selection removes at every fraction (`selection_rows`). Only a method's
    selection reads the scores, so a rescored method never re-chooses (and retrains) the controls."""
    from playpen_attribution.scores import load_method_scores, read_run_tables

    queries, train = read_run_tables(query_csv, train_csv)
    if not settings.fractions:
        raise ValueError("validation.removal.fractions is empty: list the shares of rows to remove, e.g. [0.05, 0.1]")
    methods = None
    if influences_csv is not None:
        methods = load_method_scores(influences_csv, queries.query_id.tolist(), train.train_id.tolist(),
                                     train_scores_csv)
    chosen = selection_rows(selection, queries, train, fractions=list(settings.fractions), seed=settings.seed,
                            methods=methods)
    write_json_atomic({"selection": selection, "train_rows": len(train),
                       "fractions": [f"{f:g}" for f in settings.fractions], **chosen}, out_json)


def removal_retrain_stage(base_model_dir, train_tokens_dir, query_tokens_dir, rows_json, out_json, *, selection: str,
                          repeat: int, lora: Lora, training: Training, max_length: int, dtype: str,
                          loss_dtype: str = "float32", base_model_source=None) -> None:
    """Rule `removal_retrain`: for each fraction of `selection`, train an adapter on the training rows minus the
    removed ones (training seed training.seed + repeat; `dtype` the model's, as training loads it) and record every
    query's loss under it (loaded in `loss_dtype`, as `lds_losses` does); the reference (`none`) trains on every
    row. The adapters are not kept: only their query losses count."""
    import tempfile

    import datasets

    from playpen_attribution.retraining import repeat_training
    from playpen_attribution.scores import query_losses
    from playpen_attribution.training import train_adapter

    record = json.loads(Path(rows_json).read_text())
    if record["selection"] != selection:
        raise ValueError(f"{rows_json} holds the rows of {record['selection']!r}, not {selection!r}; rerun removal_rows")
    removed = record["removed"] or {"0": []}
    train = datasets.load_from_disk(str(train_tokens_dir))
    query = datasets.load_from_disk(str(query_tokens_dir))
    if len(train) != record["train_rows"]:
        raise ValueError(f"{rows_json} was chosen from {record['train_rows']} training rows, {train_tokens_dir} holds "
                         f"{len(train)}; rerun removal_rows")
    training = repeat_training(training, repeat)
    result = {"selection": selection, "repeat": repeat, "training_seed": training.seed,
              "query_ids": list(query["row_id"]), "fractions": {}}
    with tempfile.TemporaryDirectory(prefix="removal-", dir=Path(out_json).parent) as scratch:
        for fraction, rows in removed.items():
            gone = set(rows)
            keep = [i for i, row_id in enumerate(train["row_id"]) if row_id not in gone]
            tokens, adapter = Path(scratch) / f"tokens-{fraction}", Path(scratch) / f"adapter-{fraction}"
            train.select(keep).save_to_disk(str(tokens))
            train_adapter(base_model_dir, tokens, adapter, lora=lora, training=training, max_length=max_length,
                          dtype=dtype, base_model_source=base_model_source)
            losses = query_losses(str(adapter), query, dtype=loss_dtype)
            result["fractions"][fraction] = {"removed": len(rows), "query_losses": losses}
            log.info("%s, fraction %s, repeat %d: %d rows removed, mean query loss %.4f", selection, fraction, repeat,
                     len(rows), float(np.mean(losses)))
    write_json_atomic(result, out_json)


def read_removal_losses(paths: list, query_ids: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """{(selection, fraction): [repeats, queries] losses} from the retrain jobs' files, repeats in order."""
    by_key: dict[tuple[str, str], dict[int, list[float]]] = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        if record["query_ids"] != query_ids:
            raise ValueError(f"{path} holds losses of other queries than query.csv; rerun its removal_retrain job")
        for fraction, entry in record["fractions"].items():
            by_key.setdefault((record["selection"], fraction), {})[record["repeat"]] = entry["query_losses"]
    return {key: np.array([repeats[r] for r in sorted(repeats)]) for key, repeats in by_key.items()}


def removal_table(losses: dict[tuple[str, str], np.ndarray], kinds: dict[str, str], fractions: list[str],
                  counted: np.ndarray, clusters: list, *, seed: int) -> pd.DataFrame:
    """Per selection and fraction: the query set's mean loss rise over the reference (per query, the mean over
    repeats after removal minus the reference's, then the mean over counted queries); `random` is the mean over the
    random draws. Each method's rise minus random's and minus TF-IDF's, paired per query: above 0 with its interval,
    the method chose rows that mattered more.

    The 95% intervals resample, together, everything the rises share across queries: the training seeds (repeat r
    trains every selection and the reference with seed training.seed + r, so a draw of repeats keeps them paired),
    the random draws behind `random`, and the queries' target-word clusters
    (validation.shared_and_cluster_bootstrap). An interval over the queries alone would leave out that one seed or one
    draw moves every query's loss together."""
    from playpen_attribution.validation import shared_and_cluster_bootstrap

    reference = losses[(REFERENCE, "0")]  # [repeats, queries]
    draws = sorted(s for s in kinds if is_random(s))
    keys = [(selection, fraction) for fraction in fractions for selection in kinds if (selection, fraction) in losses]
    for key in keys:
        if losses[key].shape != reference.shape:
            raise ValueError(f"selection {key[0]} at {key[1]} has {len(losses[key])} repeats, the reference "
                             f"{len(reference)}; rerun the missing removal_retrain jobs")

    def per_query(shared):
        repeat_draw, random_draw = shared
        base = reference[repeat_draw].mean(axis=0)
        stats = {}
        for fraction in fractions:
            rise = {s: losses[(s, f)][repeat_draw].mean(axis=0) - base for s, f in keys if f == fraction}
            if draws:
                rise["random"] = np.mean([rise[draws[d]] for d in random_draw], axis=0)
            for selection, values in rise.items():
                stats[(fraction, selection, "rise")] = values
                for rival in ("random", "tfidf"):
                    if kinds.get(selection) == "method" and rival in rise:
                        stats[(fraction, selection, rival)] = values - rise[rival]
        return stats

    intervals = shared_and_cluster_bootstrap(per_query, (len(reference), len(draws)), counted, clusters, seed=seed)
    rows = []
    for fraction, selection, statistic in intervals:
        if statistic != "rise":
            continue
        kind = "control" if selection == "random" else kinds[selection]
        mean, low, high = intervals[(fraction, selection, "rise")]
        row = {"selection": selection, "kind": kind, "fraction": float(fraction), "removed": None,
               "repeats": len(reference), "draws": len(draws) if selection == "random" else 1,
               "loss_rise": mean, "ci95_low": low, "ci95_high": high}
        for rival in ("random", "tfidf"):
            if (fraction, selection, rival) in intervals:
                margin, m_low, m_high = intervals[(fraction, selection, rival)]
                row.update({f"over_{rival}": margin, f"over_{rival}_ci95_low": m_low,
                            f"over_{rival}_ci95_high": m_high})
        rows.append(row)
    return pd.DataFrame(rows)


def read_removal_selections(rows_jsons: list) -> tuple[dict[str, str], dict[tuple[str, str], int], list | None]:
    """The selections' rows files (`removal_rows`): each selection's kind (method, baseline, control, reference),
    the rows it removed per fraction, counted, and the fractions."""
    kinds, counts, fractions = {}, {}, None
    for path in rows_jsons:
        record = json.loads(Path(path).read_text())
        fractions = record["fractions"]
        kinds[record["selection"]] = record["kind"]
        counts.update({(record["selection"], f): len(r) for f, r in record["removed"].items()})
    return kinds, counts, fractions


def removal_stage(query_csv, train_csv, rows_jsons: list, loss_jsons: list, out_csv, out_png, *, seed: int) -> None:
    """Rule `removal`: removal.csv (`removal_table`, with each selection's removed row count) and its plot."""
    from playpen_attribution.scores import query_groups, read_run_tables
    from playpen_attribution.taboo import with_target_words

    queries, _ = (with_target_words(frame) for frame in read_run_tables(query_csv, train_csv))
    kinds, counts, fractions = read_removal_selections(rows_jsons)
    losses = read_removal_losses(loss_jsons, queries.query_id.tolist())
    missing = sorted({s for s in kinds for f in (fractions if s != REFERENCE else ["0"]) if (s, f) not in losses})
    if missing:
        raise ValueError(f"no retrain losses for selection(s) {missing}; rerun their removal_retrain jobs")
    counted, clusters = query_groups(queries)
    table = removal_table(losses, kinds, fractions, counted, clusters, seed=seed)
    random_counts = {f: c for (s, f), c in counts.items() if is_random(s)}
    table["removed"] = [counts.get((s, f"{f:g}"), random_counts.get(f"{f:g}"))
                        for s, f in zip(table.selection, table.fraction)]
    write_csv_atomic(table, out_csv)
    plot_removal(table, out_png)
    for row in table.itertuples(index=False):
        log.info("removal %s at %g: loss rise %+.4f [%+.4f, %+.4f]", row.selection, row.fraction, row.loss_rise,
                 row.ci95_low, row.ci95_high)


def plot_removal(table: pd.DataFrame, path) -> None:
    """The query set's loss rise against the share of rows removed, one line per selection with its interval;
    methods solid, TF-IDF and random dashed."""
    from playpen_attribution.plots import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(6.4, 3.8))
    shown = table[~table.selection.map(is_random)]
    for selection, group in shown.groupby("selection", sort=False):
        style = "-" if group.kind.iloc[0] == "method" else "--"
        ax.errorbar(group.fraction, group.loss_rise, yerr=np.nan_to_num(
            np.vstack([group.loss_rise - group.ci95_low, group.ci95_high - group.loss_rise])),
            ls=style, marker="o", capsize=3, label=selection)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("share of training rows removed (the selection's most helpful first)")
    ax.set_ylabel("query set's mean loss rise")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
