"""The run's report: which training episodes mattered, per query and against the whole query set, per method;
how far the methods agree; score plots; one self-contained HTML page.

It reads only the merged tables (`query.csv`, `train.csv`, `influences.csv`, `train_scores.csv`) and, for
per-token scores, the tokenized training rows and the adapter's tokenizer file, so it never imports torch.
Scores are "positive = helpful": rank 1 is the most helpful training row.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.io import atomic_path, write_csv_atomic
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


def _token_html(tokens: list[str], scores: list[float]) -> str:
    """Tokens tinted by score: green helpful, red harmful, scaled to the row's largest magnitude.

    The score at position t comes from the gradients at t, whose loss term predicts token t+1: it is drawn on
    token t+1 (the token whose prediction it is about). The first token is predicted by nothing and stays
    untinted; the last position has no next token, and its score (about 0: no loss flows through it) is not drawn.
    """
    scale = max((abs(s) for s in scores), default=0.0) or 1.0
    spans = [f'<span class="tok" title="first token: no prediction">{html.escape(tokens[0])}</span>'] if tokens else []
    for token, score in zip(tokens[1:], scores):
        alpha = min(1.0, abs(score) / scale)
        colour = f"rgba(0,150,60,{alpha:.2f})" if score >= 0 else f"rgba(200,30,30,{alpha:.2f})"
        spans.append(f'<span class="tok" style="background:{colour}" title="{score:.3g}">'
                     f"{html.escape(token)}</span>")
    return "".join(spans)


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------
def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    """The figure as PNG bytes, closed; metadata pinned so the same scores give the same bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return buffer.getvalue()


def _save_figure(fig, path) -> None:
    png = _png(fig)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def plot_score_distributions(methods: dict[str, MethodScores], path) -> None:
    """One histogram per method of the scores against the whole query set (scales differ between methods)."""
    plt = _pyplot()
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
    _save_figure(fig, path)


def plot_agreement(agree: pd.DataFrame, methods: list[str], path) -> None:
    """Heat map of the mean per-query Spearman between every pair of methods."""
    plt = _pyplot()
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
    _save_figure(fig, path)


def lds_chart(lds: pd.DataFrame) -> str:
    """Bar chart of the mean LDS of every method (blue) and baseline (grey) with its 95% interval, inline <img>."""
    fig, ax = _pyplot().subplots(figsize=(1.6 + 0.9 * len(lds), 3.4))
    colours = ["#bbbbbb" if kind == "baseline" else "#4477aa" for kind in lds.kind]
    errors = np.nan_to_num(np.vstack([lds.lds - lds.ci95_low, lds.ci95_high - lds.lds]))
    ax.bar(lds.method, lds.lds, yerr=errors, capsize=4, color=colours)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("mean LDS (Spearman)")
    ax.tick_params(axis="x", labelrotation=35)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    return _img(_png(fig), "lds")


# ---------------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}h3{margin-bottom:.3em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .5em;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.text{max-width:32em;white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.9em}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
.note{color:#555;font-size:.9em}.tok{border-radius:2px}
.same{background:#e6f4ea}
"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _table(frame: pd.DataFrame, text_columns=("prompt", "completion"), highlight=None) -> str:
    """An HTML table; long text cells keep their line breaks; rows where `highlight` is true are tinted."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for index, row in enumerate(frame.itertuples(index=False)):
        cells = []
        for column, value in zip(frame.columns, row):
            if column in text_columns:
                text = readable(value)
                if column == "prompt" and len(text) > 250:
                    text = "…" + text[-250:]  # the end of the prompt is the part the completion answers
                cells.append(f'<td class="text">{html.escape(text)}</td>')
            elif isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                cells.append(f'<td class="num">{html.escape(_fmt(float(value) if isinstance(value, float) else value))}</td>')
            else:
                cells.append(f"<td>{html.escape(_fmt(value))}</td>")
        cls = ' class="same"' if highlight is not None and highlight[index] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def training_section(manifest: dict) -> str:
    """Train and eval loss against the epoch, from the adapter's manifest (its trainer's log)."""
    history = manifest.get("log_history", [])
    train = [(e["epoch"], e["loss"]) for e in history if "loss" in e and "epoch" in e]
    evals = [(e["epoch"], e["eval_loss"]) for e in manifest.get("eval", {}).get("losses", [])]
    note = (f"<p class='note'>Trained on {manifest.get('n_trained_rows')} rows, loss on "
            f"{html.escape(str(manifest.get('loss_on', 'last_turn')))} (tokenization.loss_on); ")
    if evals:
        note += (f"eval loss after every epoch on {manifest['eval']['rows']} episodes of the query split "
                 "(training.evaluate; no checkpoint is chosen by it). Train loss: the trainer's running mean per "
                 "logging step (summed over a row's labelled tokens, then averaged per token).</p>")
    else:
        note += "no eval loss (training.evaluate is off).</p>"
    if not train and not evals:
        return note
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.0))
    if train:
        ax.plot(*zip(*train), label="train", color="#4477aa")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval (query split)", color="#ee6677")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return note + _img(_png(fig), "train and eval loss")


def words_section(methods: dict[str, MethodScores], queries: pd.DataFrame, train: pd.DataFrame,
                  influence: pd.DataFrame, difficulty: pd.DataFrame) -> str:
    """Influence by taboo target word: heat map, what helps and harms each query word, the hard words."""
    from playpen_attribution.words import helps_and_harms, word_heat_map

    if influence.empty:
        return ("<p class='note'>No target words: this run's episodes are not taboo episodes that name their "
                "word (describer prompt, or the guesser's winning guess and its describer's prompt). The section is "
                "left out; words.csv and word_difficulty.csv are empty.</p>")
    known = int(train["target_word"].map(lambda w: isinstance(w, str)).sum())
    parts = [f"<p class='note'>Target words from the transcripts: {known} of {len(train)} training episodes and "
             f"{int(queries['target_word'].map(lambda w: isinstance(w, str)).sum())} of {len(queries)} queries name "
             "theirs. Influence of a training word on a query word: the sum over that word's training episodes of "
             "their mean score over the query word's queries (report/words.csv has every pair and method). The "
             "heat map shows the most frequent words, each method scaled to its largest magnitude (blue helps, red "
             "harms).</p>", _img(_png(word_heat_map(influence, train)), "word heat map")]
    first = next(iter(methods))
    parts.append(f"<h3>What helps and harms each query word ({html.escape(first)})</h3>")
    parts.append(_table(helps_and_harms(influence[influence.method == first]).drop(columns="method"),
                        text_columns=()))
    parts.append("<h3>Hard words: success rate in the training episodes beside their total influence</h3>"
                 "<p class='note'>Hardest first (report/word_difficulty.csv). influence_&lt;method&gt;: the summed "
                 "score of the word's training episodes against the whole query set.</p>")
    parts.append(_table(difficulty.round(4), text_columns=()))
    return "".join(parts)


def render_page(*, title: str, summary: dict, methods: dict[str, MethodScores], agree: pd.DataFrame,
                stability: pd.DataFrame, episodes: pd.DataFrame, queries: pd.DataFrame, query_ids: list[str],
                plots: dict[str, Path], per_token_html: dict, k: int, queries_shown: int,
                planted: pd.DataFrame | None = None, lds: pd.DataFrame | None = None,
                damping: pd.DataFrame | None = None, damping_png: bytes | None = None,
                sections: list[tuple[str, str, str]] = ()) -> str:
    """The page; `sections`: further (id, heading, HTML body) sections, linked from the top and shown after the
    audits."""
    shown_columns = ["rank", "of", "score", "train_id", *[c for c in METADATA_COLUMNS if c in episodes],
                     "prompt", "completion"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append(_table(pd.DataFrame([summary]).T.reset_index().set_axis(["", "value"], axis=1), text_columns=()))
    parts.append("<p class='note'>Positive scores mean helpful: training on the row lowers the query's loss. "
                 "Rank 1 is the most helpful row. Against the whole query set: "
                 + "; ".join(f"<b>{html.escape(m)}</b>: {html.escape(ms.overall_source)}"
                             for m, ms in methods.items()) + ".</p>")

    parts.append("<p><a href='#agreement'>Agreement</a> · "
                 + ("<a href='#planted'>Planted copies</a> · " if planted is not None else "")
                 + ("<a href='#lds'>LDS</a> · " if lds is not None else "")
                 + ("<a href='#damping'>Damping sweep</a> · " if damping is not None else "")
                 + "".join(f"<a href='#{anchor}'>{html.escape(heading)}</a> · " for anchor, heading, _ in sections)
                 + "<a href='#distributions'>Score distributions</a> · "
                 "<a href='#overall'>Episodes against all queries</a> · <a href='#per-query'>Per query</a></p>")
    parts.append("<h2 id='agreement'>How far the methods agree</h2>")
    parts.append(_img(Path(plots["agreement"]).read_bytes(), "agreement"))
    order = {m: i for i, m in enumerate(methods)}
    pairs = agree[[order[a] < order[b] for a, b in zip(agree.method_a, agree.method_b)]]  # each pair once
    parts.append(_table(pairs.round(4), text_columns=()))
    parts.append("<p class='note'>agreement.csv has every ordered pair, each method with itself included (1).</p>")
    parts.append("<h3>Rankings with and without the preconditioner</h3>")
    if len(stability):
        parts.append(_table(stability.round(4), text_columns=()))
    else:
        parts.append("<p class='note'>No method here has its plain counterpart in the run. Add "
                     "<code>bergson_cosine</code> beside <code>bergson_cosine_train</code>, or "
                     "<code>identity</code> beside <code>ekfac</code>, to <code>attribution.methods</code>.</p>")

    if planted is not None:
        parts.append("<h2 id='planted'>Planted copies</h2><p class='note'>Copies of some queries scored as training "
                     "rows by every method (validation/planted.csv): recall@1 is the share of copies ranked first "
                     "for their own query among all training rows. Below 1 for a cosine method points at a bug "
                     "(ids, masking, sign); unnormalised scores can rank a long, high-gradient row above a copy. A tie counts "
                     "against the copy. Baselines: a copy is the query's own text, so TF-IDF finds it by construction; "
                     "the audit tests the plumbing, the LDS tests the attribution.</p>")
        parts.append(_table(planted.round(4), text_columns=()))
    if lds is not None:
        parts.append(f"<h2 id='lds'>Linear datamodeling score</h2><p class='note'>{int(lds.subsets.max())} retrains on "
                     "random subsets of the training rows; per query, the Spearman correlation over subsets between a "
                     "method's predicted effect of the subset (the sum of its rows' scores) and the actual outcome "
                     "(minus the query's loss after retraining). Mean over queries, a repeated query counted once, with 95% "
                     "intervals from resampling whole target words (clusters). Baselines (grey) are scored the same way: "
                     "random, TF-IDF text similarity, the same completion, the same taboo target word, and each method's "
                     "query-independent "
                     "version (its mean score over all queries). <code>margin</code>: a method's LDS minus its best "
                     "baseline's, paired per query, with its interval (validation/lds.csv).</p>")
        parts.append(lds_chart(lds))
        parts.append(_table(lds.round(4), text_columns=()))
    if damping is not None:
        parts.append("<h2 id='damping'>Damping sweep</h2><p class='note'>Each method with a preconditioner rescored at "
                     "relative damping factors c: the preconditioner is inverted as 1/(&lambda; + c &middot; mean "
                     "&lambda;) per module, the same meaning for Kronfluence and Bergson. LDS (with its interval) and "
                     "planted recall@1 against c; the dashed line is the best model-free baseline "
                     "(validation/damping.csv). Large c tends to raw gradient dot products (or cosines).</p>")
        if damping_png is not None:
            parts.append(_img(damping_png, "damping sweep"))
        parts.append(_table(damping.round(4), text_columns=()))
    for anchor, heading, body in sections:
        parts.append(f"<h2 id='{anchor}'>{html.escape(heading)}</h2>{body}")
    parts.append("<h2 id='distributions'>Score distributions</h2>")
    parts.append(_img(Path(plots["distributions"]).read_bytes(), "score distributions"))

    parts.append(f"<h2 id='overall'>Most and least influential episodes against all queries (k = {k})</h2>")
    for method in methods:
        block = episodes[(episodes.method == method) & (episodes.query_id == OVERALL)]
        for direction in ("top", "bottom"):
            rows = block[block.direction == direction]
            parts.append(f"<details{' open' if direction == 'top' else ''}><summary>{html.escape(method)}: "
                         f"{'most' if direction == 'top' else 'least'} helpful</summary>"
                         f"{_table(rows[shown_columns])}</details>")

    parts.append(f"<h2 id='per-query'>Per query (first {min(queries_shown, len(query_ids))} of {len(query_ids)}; "
                 f"every query is in top_episodes.csv)</h2>")
    parts.append("<p class='note'>Rows about the query's own target word are tinted green.</p>")
    by_id = queries.set_index("query_id")
    for query_id in query_ids[:queries_shown]:
        query = by_id.loc[query_id]
        target = query.get("target_word")
        parts.append(f"<h3>{html.escape(query_id)}"
                     + (f" (target word: {html.escape(str(target))})" if isinstance(target, str) else "") + "</h3>")
        parts.append(f"<div class='text'>…{html.escape(readable(query['prompt'])[-400:])}\n\n"
                     f"<b>{html.escape(readable(query['completion']))}</b></div>")
        for method in methods:
            rows = episodes[(episodes.method == method) & (episodes.query_id == query_id)
                            & (episodes.direction == "top")]
            same = (rows["target_word"] == target).to_numpy() if "target_word" in rows and isinstance(target, str) \
                else None
            parts.append(f"<details open><summary>{html.escape(method)}: most helpful</summary>"
                         f"{_table(rows[shown_columns], highlight=same)}")
            for train_id in rows["train_id"].head(3):
                token_html = per_token_html.get((method, query_id, train_id))
                if token_html:
                    parts.append(f"<p class='note'>Per-token scores of {html.escape(train_id)} "
                                 f"(green helpful, red harmful; hover for the value):</p>"
                                 f"<div class='text'>{token_html}</div>")
            parts.append("</details>")
    parts.append("</body></html>")
    return "".join(parts)


def build_report(*, query_csv, train_csv, influences_csv, out_dir, train_scores_csv=None, train_tokens_dir=None,
                 tokenizer_file=None, top_k: int = 10, queries_shown: int = 10, title: str = "Attribution report",
                 planted_summary_csv=None, lds_csv=None, damping_csv=None, damping_png=None, adapter_manifest=None):
    """Rule `report`: every file of `report/` from the merged tables; returns their paths."""
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
    per_token_html = {}
    if per_token and train_tokens_dir is not None and tokenizer_file is not None:
        tokens = token_strings(train_tokens_dir, tokenizer_file, {key[2] for key in per_token})
        per_token_html = {key: _token_html(tokens[key[2]], scores) for key, scores in per_token.items()
                          if key[2] in tokens}
    from playpen_attribution.words import word_difficulty, word_influence

    words, difficulty = (word_influence(methods, queries, train), word_difficulty(methods, queries, train))
    write_csv_atomic(words, paths["words.csv"])
    write_csv_atomic(difficulty, paths["word_difficulty.csv"])
    sections = []
    if adapter_manifest is not None and Path(adapter_manifest).is_file():
        sections.append(("training", "Training", training_section(json.loads(Path(adapter_manifest).read_text()))))
    sections.append(("words", "Which words matter", words_section(methods, queries, train, words, difficulty)))
    summary = {"methods": ", ".join(methods), "queries": len(query_ids), "training rows": len(train_ids),
               "k": top_k, "per-token scores": ", ".join(sorted({k[0] for k in per_token})) or "not computed"}
    page = render_page(title=title, summary=summary, methods=methods, agree=agree, stability=stability,
                       episodes=episodes, queries=queries, query_ids=query_ids,
                       plots={"agreement": paths["agreement.png"], "distributions": paths["score_distributions.png"]},
                       per_token_html=per_token_html, k=top_k, queries_shown=queries_shown,
                       planted=pd.read_csv(planted_summary_csv) if planted_summary_csv else None,
                       lds=pd.read_csv(lds_csv) if lds_csv else None,
                       damping=pd.read_csv(damping_csv) if damping_csv else None,
                       damping_png=Path(damping_png).read_bytes() if damping_png else None, sections=sections)
    with atomic_path(paths["index.html"]) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return paths
