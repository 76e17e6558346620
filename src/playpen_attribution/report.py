"""The run's report: which training episodes mattered, per query and against the whole query set, per method;
how far the methods agree; score plots; one self-contained HTML page.

It reads only the merged tables (`query.csv`, `train.csv`, `influences.csv`, `train_scores.csv`) and, for
per-token scores, the tokenized training rows and the adapter's tokenizer file, so it never imports torch.
Scores are "positive = helpful": rank 1 is the most helpful training row.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.ensemble import adapters_line
from playpen_attribution.io import atomic_path, write_csv_atomic
from playpen_attribution.plots import png_bytes, pyplot, save_png
from playpen_attribution.scores import (
    MethodScores,
    agreement,
    load_method_scores,
    preconditioner_stability,
    read_run_tables,
)
from playpen_attribution.tables import readable
from playpen_attribution.taboo import with_target_words

log = logging.getLogger(__name__)

OVERALL = "all queries"
# Methods without a preconditioner, and the plain counterpart of each preconditioned method.
METADATA_COLUMNS = ["game", "game_role", "outcome", "experiment", "task_id", "target_word"]


def descending_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank 1 = highest score; ties broken by row order; NaN (unscored) rows get no rank (NaN)."""
    return pd.Series(scores).rank(ascending=False, method="first").to_numpy()


def top_and_bottom(methods: dict[str, MethodScores], query_ids: list[str], train: pd.DataFrame,
                   queries: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k most and k least helpful training rows per method, against every query and the whole set."""
    train_ids = train["train_id"].tolist()
    query_targets = dict(zip(queries["query_id"], queries["target_word"]))
    records = []
    for method, ms in methods.items():
        scopes = [(OVERALL, ms.overall)] + list(zip(query_ids, ms.per_query))
        for scope, scores in scopes:
            ranks = descending_ranks(scores)
            scored = np.flatnonzero(~np.isnan(scores))
            order = scored[np.argsort(ranks[scored])]
            picks = [("top", i) for i in order[:k]] + [("bottom", i) for i in order[::-1][:k]]
            for direction, i in picks:
                records.append({"method": method, "query_id": scope, "query_target_word": query_targets.get(scope),
                                "direction": direction, "rank": int(ranks[i]), "of": len(scored),
                                "train_id": train_ids[i], "score": scores[i]})
    table = pd.DataFrame.from_records(records)
    keep = ["train_id", *[c for c in METADATA_COLUMNS if c in train], "prompt", "completion"]
    return table.merge(train[keep], on="train_id", how="left")


# ---------------------------------------------------------------------------------------------------------
# per-token scores
# ---------------------------------------------------------------------------------------------------------
def per_token_for(influences_csv, wanted: set[tuple[str, str, str]], chunksize: int = 200_000) -> dict:
    """Per-token score lists of the wanted (method, query_id, train_id) pairs; {} if none were computed."""
    header = pd.read_csv(influences_csv, nrows=0).columns
    if "per_token_scores" not in header or not wanted:
        return {}
    columns = ["query_id", "train_id", "per_token_scores"] + (["method"] if "method" in header else [])
    found = {}
    for chunk in pd.read_csv(influences_csv, usecols=columns, chunksize=chunksize,
                             dtype={"query_id": str, "train_id": str, "per_token_scores": str}):
        if "method" not in chunk:
            chunk["method"] = "influence"
        chunk = chunk.dropna(subset=["per_token_scores"])
        keys = list(zip(chunk["method"], chunk["query_id"], chunk["train_id"]))
        for key, value in zip(keys, chunk["per_token_scores"]):
            if key in wanted:
                found[key] = json.loads(value)
    return found


def token_strings(train_tokens_dir, tokenizer_file, train_ids: set[str]) -> dict[str, list[str]]:
    """Decoded tokens of the given training rows, from the tokenized dataset the scores were computed on."""
    import datasets
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    rows = datasets.load_from_disk(str(train_tokens_dir))
    ids = rows["row_id"]
    out = {}
    for index, row_id in enumerate(ids):
        if row_id in train_ids:
            out[row_id] = [tokenizer.decode([t], skip_special_tokens=False) for t in rows[index]["input_ids"]]
    return out


def token_spans(tokens: list[str], scores: list[float]) -> list[dict]:
    """Tokens tinted by score: green helpful, red harmful, scaled to the row's largest magnitude.

    The score at position t comes from the gradients at t, whose loss term predicts token t+1: it is drawn on
    token t+1 (the token whose prediction it is about). The first token is predicted by nothing and stays
    untinted; the last position has no next token, and its score (about 0: no loss flows through it) is not drawn.
    """
    scale = max((abs(s) for s in scores), default=0.0) or 1.0
    spans = [{"text": tokens[0], "colour": None, "title": "first token: no prediction"}] if tokens else []
    for token, score in zip(tokens[1:], scores):
        alpha = min(1.0, abs(score) / scale)
        colour = f"rgba(0,150,60,{alpha:.2f})" if score >= 0 else f"rgba(200,30,30,{alpha:.2f})"
        spans.append({"text": token, "colour": colour, "title": f"{score:.3g}"})
    return spans


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------
def plot_score_distributions(methods: dict[str, MethodScores], path) -> None:
    """One histogram per method of the scores against the whole query set (scales differ between methods)."""
    plt = pyplot()
    n = len(methods)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 2.8), squeeze=False)
    for ax, (method, ms) in zip(axes[0], methods.items()):
        values = ms.overall[np.isfinite(ms.overall)]
        ax.hist(values, bins=min(40, max(5, len(values) // 4)), color="#4477aa")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("score against all queries")
    axes[0][0].set_ylabel("training rows")
    fig.tight_layout()
    save_png(fig, path)


def plot_agreement(agree: pd.DataFrame, methods: list[str], path) -> None:
    """Heat map of the mean per-query Spearman between every pair of methods."""
    plt = pyplot()
    matrix = (agree.pivot(index="method_a", columns="method_b", values="mean_query_spearman")
              .reindex(index=methods, columns=methods).to_numpy(float))
    size = 1.2 + 0.9 * len(methods)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(len(methods)), methods, fontsize=9)
    for i in range(len(methods)):
        for j in range(len(methods)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if abs(matrix[i, j]) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="mean per-query Spearman")
    fig.tight_layout()
    save_png(fig, path)


def lds_chart(lds: pd.DataFrame) -> bytes:
    """Bar chart of the mean LDS of every method (blue) and baseline (grey) with its 95% interval, and the noise
    ceiling (dashed, with its interval) where the retrains were repeated, as PNG."""
    fig, ax = pyplot().subplots(figsize=(1.6 + 0.9 * len(lds), 3.4))
    colours = ["#bbbbbb" if kind == "baseline" else "#4477aa" for kind in lds.kind]
    errors = np.nan_to_num(np.vstack([lds.lds - lds.ci95_low, lds.ci95_high - lds.lds]))
    ax.bar(lds.method, lds.lds, yerr=errors, capsize=4, color=colours)
    ax.axhline(0, color="grey", lw=0.8)
    ceiling = lds.noise_ceiling.iloc[0] if "noise_ceiling" in lds and len(lds) else np.nan
    if np.isfinite(ceiling):  # the most an LDS can reach against retrains this noisy
        ax.axhline(ceiling, color="#cc3311", ls="--", lw=1.2,
                   label=f"noise ceiling {ceiling:.2f} ({int(lds.repeats.iloc[0])} repeats)")
        low, high = lds.noise_ceiling_ci95_low.iloc[0], lds.noise_ceiling_ci95_high.iloc[0]
        if np.isfinite(low) and np.isfinite(high):
            ax.axhspan(low, high, color="#cc3311", alpha=0.1)
        ax.legend(fontsize=7, loc="upper right")
    ax.set_ylabel("mean LDS (Spearman)")
    ax.tick_params(axis="x", labelrotation=35)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    return png_bytes(fig)


# ---------------------------------------------------------------------------------------------------------
# the page: templates/report.html.j2 holds the markup; the functions here give it plain values
# ---------------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def table_data(frame: pd.DataFrame, text_columns=("prompt", "completion"), highlight=None) -> dict:
    """A table for the template's `table` macro: long text cells keep their line breaks (class `text`), numbers
    are right-aligned (`num`), rows where `highlight` is true are tinted."""
    rows = []
    for index, row in enumerate(frame.itertuples(index=False)):
        cells = []
        for column, value in zip(frame.columns, row):
            if column in text_columns:
                text = readable(value)
                if column == "prompt" and len(text) > 250:
                    text = "…" + text[-250:]  # the end of the prompt is the part the completion answers
                cells.append({"kind": "text", "text": text})
            elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                cells.append({"kind": "num", "text": _fmt(float(value) if isinstance(value, float) else value)})
            else:
                cells.append({"kind": None, "text": _fmt(value)})
        rows.append({"cells": cells, "highlight": bool(highlight is not None and highlight[index])})
    return {"columns": [str(c) for c in frame.columns], "rows": rows}


def _numbers(frame: pd.DataFrame) -> dict:
    return table_data(frame.round(4), text_columns=())


def training_section(manifest: dict) -> dict:
    """Train and eval loss against the epoch, from the adapter's manifest (its trainer's log)."""
    history = manifest.get("log_history", [])
    train = [(e["epoch"], e["loss"]) for e in history if "loss" in e and "epoch" in e]
    evals = [(e["epoch"], e["eval_loss"]) for e in manifest.get("eval", {}).get("losses", [])]
    section = {"rows": manifest.get("n_trained_rows"), "loss_on": manifest.get("loss_on", "last_turn"),
               "eval_rows": manifest["eval"]["rows"] if evals else 0, "png": None}
    if train or evals:
        fig, ax = pyplot().subplots(figsize=(5.5, 3.0))
        if train:
            ax.plot(*zip(*train), label="train", color="#4477aa")
        if evals:
            ax.plot(*zip(*evals), marker="o", label="eval (query split)", color="#ee6677")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss per token")
        ax.legend(fontsize=8)
        fig.tight_layout()
        section["png"] = png_bytes(fig)
    return section


def words_section(methods: dict[str, MethodScores], queries: pd.DataFrame, train: pd.DataFrame,
                  influence: pd.DataFrame, difficulty: pd.DataFrame, k: int = 10) -> dict | None:
    """Influence by taboo target word: heat map, what helps and harms each query word, the hard words (None when
    the run's episodes name no word)."""
    from playpen_attribution.words import helps_and_harms, word_heat_map

    if influence.empty:
        return None
    first = next(iter(methods))

    def known(frame):
        return int(frame["target_word"].map(lambda w: isinstance(w, str)).sum())

    return {"train_known": known(train), "train_rows": len(train), "query_known": known(queries),
            "query_rows": len(queries), "heat_map": png_bytes(word_heat_map(influence, train)), "method": first,
            "helps_and_harms": table_data(helps_and_harms(influence[influence.method == first]).drop(columns="method"),
                                          text_columns=()),
            "difficulty": _numbers(difficulty), "k": k}


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("playpen_attribution", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["base64"] = lambda data: base64.b64encode(data).decode()
    return env.get_template("report.html.j2")


def render_page(*, title: str, summary: dict, methods: dict[str, MethodScores], agree: pd.DataFrame,
                stability: pd.DataFrame, episodes: pd.DataFrame, queries: pd.DataFrame, query_ids: list[str],
                plots: dict[str, Path], per_token_spans: dict, k: int, queries_shown: int,
                planted: pd.DataFrame | None = None, lds: pd.DataFrame | None = None,
                damping: pd.DataFrame | None = None, damping_png: bytes | None = None,
                removal: pd.DataFrame | None = None, removal_png: bytes | None = None,
                training: dict | None = None, words: dict | None = None) -> str:
    """The page from templates/report.html.j2; `training` and `words`: the sections' values (training_section,
    words_section), `training` None leaves its section out."""
    shown_columns = ["rank", "of", "score", "train_id", *[c for c in METADATA_COLUMNS if c in episodes],
                     "prompt", "completion"]
    order = {m: i for i, m in enumerate(methods)}
    pairs = agree[[order[a] < order[b] for a, b in zip(agree.method_a, agree.method_b)]]  # each pair once
    links = [("agreement", "Agreement"), ("planted", "Planted copies") if planted is not None else None,
             ("lds", "LDS") if lds is not None else None,
             ("removal", "Removal check") if removal is not None else None, ("damping", "Damping sweep") if damping is not None else None,
             ("training", "Training") if training is not None else None, ("words", "Which words matter"),
             ("distributions", "Score distributions"), ("overall", "Episodes against all queries"),
             ("per-query", "Per query")]

    def rows_of(method, query_id, direction):
        return episodes[(episodes.method == method) & (episodes.query_id == query_id)
                        & (episodes.direction == direction)]

    overall = [{"method": method, "top": table_data(rows_of(method, OVERALL, "top")[shown_columns]),
                "bottom": table_data(rows_of(method, OVERALL, "bottom")[shown_columns])} for method in methods]
    by_id = queries.set_index("query_id")
    per_query = []
    for query_id in query_ids[:queries_shown]:
        query = by_id.loc[query_id]
        target = query.get("target_word")
        target = target if isinstance(target, str) else None
        blocks = []
        for method in methods:
            rows = rows_of(method, query_id, "top")
            same = (rows["target_word"] == target).to_numpy() if "target_word" in rows and target else None
            token_rows = [{"train_id": train_id, "spans": per_token_spans[(method, query_id, train_id)]}
                          for train_id in rows["train_id"].head(3) if per_token_spans.get((method, query_id, train_id))]
            blocks.append({"name": method, "top": table_data(rows[shown_columns], highlight=same),
                           "token_rows": token_rows})
        per_query.append({"id": query_id, "target": target, "prompt_tail": readable(query["prompt"])[-400:],
                          "completion": readable(query["completion"]), "methods": blocks})
    return _template().render(
        title=title,
        summary=table_data(pd.DataFrame([summary]).T.reset_index().set_axis(["", "value"], axis=1), text_columns=()),
        methods=[{"name": m, "source": ms.overall_source} for m, ms in methods.items()],
        links=[{"id": anchor, "heading": heading} for anchor, heading in filter(None, links)],
        agreement={"png": Path(plots["agreement"]).read_bytes(), "pairs": _numbers(pairs),
                   "stability": _numbers(stability) if len(stability) else None},
        planted=_numbers(planted) if planted is not None else None,
        lds={"subsets": int(lds.subsets.max()), "repeats": int(lds.repeats.max()) if "repeats" in lds else 1,
             "chart": lds_chart(lds), "table": _numbers(lds)}
        if lds is not None else None,
        damping={"png": damping_png, "table": _numbers(damping)} if damping is not None else None,
        removal={"png": removal_png, "table": _numbers(removal)} if removal is not None else None,
        training=training, words=words, distributions=Path(plots["distributions"]).read_bytes(), k=k,
        overall=overall, per_query=per_query, query_count=len(query_ids))


def build_report(*, query_csv, train_csv, influences_csv, out_dir, train_scores_csv=None, train_tokens_dir=None,
                 tokenizer_file=None, top_k: int = 10, queries_shown: int = 10, words_k: int = 10,
                 title: str = "Attribution report",
                 planted_summary_csv=None, lds_csv=None, damping_csv=None, damping_png=None, removal_csv=None,
                 removal_png=None, adapter_manifest=None, ensemble: int = 1, training_seed: int | None = None,
                 checkpoints=(), epochs: float = 1, scoring_training=None):
    """Rule `report`: every file of `report/` from the merged tables; returns their paths. `ensemble`,
    `training_seed`, `checkpoints`, `epochs` and `scoring_training` (attribution.ensemble, training.seed,
    attribution.checkpoints, the scored adapters' epochs, attribution.scoring_training) say in the summary which
    adapters each method averaged."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    queries, train = (with_target_words(frame) for frame in read_run_tables(query_csv, train_csv))
    query_ids, train_ids = queries["query_id"].tolist(), train["train_id"].tolist()
    methods = load_method_scores(influences_csv, query_ids, train_ids, train_scores_csv)
    if not methods:
        raise ValueError(f"{influences_csv} holds no scores; rerun the merge")
    log.info("report: %d methods, %d queries, %d training rows", len(methods), len(query_ids), len(train_ids))

    paths = {name: out_dir / name for name in ("top_episodes.csv", "agreement.csv", "preconditioner_stability.csv",
                                               "score_distributions.png", "agreement.png", "index.html", "words.csv",
                                               "word_difficulty.csv")}
    episodes = top_and_bottom(methods, query_ids, train, queries, top_k)
    agree = agreement(methods, top_k)
    stability = preconditioner_stability(agree, methods)
    for frame, name in ((episodes, "top_episodes.csv"), (agree, "agreement.csv"),
                        (stability, "preconditioner_stability.csv")):
        write_csv_atomic(frame, paths[name])
    plot_score_distributions(methods, paths["score_distributions.png"])
    plot_agreement(agree, list(methods), paths["agreement.png"])

    # per-token scores of the three most helpful rows of each query shown on the page
    shown = episodes[(episodes.query_id.isin(query_ids[:queries_shown])) & (episodes.direction == "top")
                     & (episodes["rank"] <= 3)]
    wanted = set(zip(shown.method, shown.query_id, shown.train_id))
    per_token = per_token_for(influences_csv, wanted)
    per_token_spans = {}
    if per_token and train_tokens_dir is not None and tokenizer_file is not None:
        tokens = token_strings(train_tokens_dir, tokenizer_file, {key[2] for key in per_token})
        per_token_spans = {key: token_spans(tokens[key[2]], scores) for key, scores in per_token.items()
                           if key[2] in tokens}
    from playpen_attribution.words import top_and_bottom_words, word_difficulty, word_influence

    words, difficulty = (word_influence(methods, queries, train), word_difficulty(methods, queries, train))
    write_csv_atomic(top_and_bottom_words(words, words_k), paths["words.csv"])
    write_csv_atomic(difficulty, paths["word_difficulty.csv"])
    training = None
    if adapter_manifest is not None and Path(adapter_manifest).is_file():
        training = training_section(json.loads(Path(adapter_manifest).read_text()))
    summary = {"methods": ", ".join(methods), "queries": len(query_ids), "training rows": len(train_ids),
               "k": top_k, "per-token scores": ", ".join(sorted({k[0] for k in per_token})) or "not computed"}
    if training_seed is not None:
        summary["adapters"] = adapters_line(ensemble, training_seed, checkpoints, epochs,
                                           scoring_training)
    page = render_page(title=title, summary=summary, methods=methods, agree=agree, stability=stability,
                       episodes=episodes, queries=queries, query_ids=query_ids,
                       plots={"agreement": paths["agreement.png"], "distributions": paths["score_distributions.png"]},
                       per_token_spans=per_token_spans, k=top_k, queries_shown=queries_shown,
                       planted=pd.read_csv(planted_summary_csv) if planted_summary_csv else None,
                       lds=pd.read_csv(lds_csv) if lds_csv else None,
                       damping=pd.read_csv(damping_csv) if damping_csv else None,
                       damping_png=Path(damping_png).read_bytes() if damping_png else None,
                       removal=pd.read_csv(removal_csv) if removal_csv else None,
                       removal_png=Path(removal_png).read_bytes() if removal_png else None, training=training,
                       words=words_section(methods, queries, train, words, difficulty, words_k))
    with atomic_path(paths["index.html"]) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return paths
