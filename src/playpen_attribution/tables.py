"""Scores in shards, and the if-query tools' three CSVs: query.csv, train.csv, influences.csv.

`query.csv`: query_id, prompt, completion, loss, extra fields. `train.csv`: train_id, prompt, completion,
extra fields. `influences.csv`: query_id, train_id, influence_score (positive = helpful), optional
per_token_scores (JSON list over the training row's tokens); the workflow adds a `method` column so one
file holds every method. Playpen prompts and completions are message lists, written as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from playpen_attribution.io import atomic_path

INTERNAL_COLUMNS = {"row_id", "prompt", "completion"}


def shard_indices(n_rows: int, shards: int, shard: int) -> np.ndarray:
    """Row indices of one contiguous slice of the training rows; every shard gets at least one row."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is outside 0..{shards - 1}")
    check_shard_count(shards, n_rows)
    return np.array_split(np.arange(n_rows), shards)[shard]


def check_shard_count(shards: int, n_rows: int, where: str = "the training set") -> None:
    if shards > n_rows:
        raise ValueError(f"attribution.shards is {shards} but {where} has only {n_rows} rows: every shard needs at "
                         f"least one row; set attribution.shards to at most {max(n_rows, 1)}")


def save_shard(path: str | Path, scores: np.ndarray, query_ids: list[str], train_ids: list[str],
               per_token: np.ndarray | None = None, reduced: np.ndarray | None = None) -> None:
    """`scores` [queries, rows]; optional `per_token` [queries, rows, tokens] and `reduced` [rows] (one score per
    row against the whole query set, from Bergson's reduced query)."""
    arrays = {"scores": scores.astype(np.float32), "query_ids": np.asarray(query_ids, dtype=str),
              "train_ids": np.asarray(train_ids, dtype=str)}
    if per_token is not None:
        arrays["per_token"] = per_token.astype(np.float32)
    if reduced is not None:
        arrays["reduced"] = reduced.astype(np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def load_shards(paths: list[str | Path]) -> dict:
    """Concatenate shards along the training axis; checks that they agree on the queries."""
    parts = [np.load(p, allow_pickle=False) for p in paths]
    query_ids = parts[0]["query_ids"]
    for path, part in zip(paths, parts):
        if not np.array_equal(part["query_ids"], query_ids):
            raise ValueError(f"{path} was scored against other queries than {paths[0]}; rerun its scoring")
    train_ids, seen = [], set()
    for path, part in zip(paths, parts):
        for train_id in part["train_ids"]:
            if train_id in seen:
                raise ValueError(f"training row {train_id} is in more than one shard ({path} and an earlier one): the "
                                 f"shards come from different shard splits (a stale shard of another "
                                 f"attribution.shards?); rerun their scoring")
            seen.add(train_id)
        train_ids += list(part["train_ids"])
    merged = {"scores": np.concatenate([p["scores"] for p in parts], axis=1),
              "query_ids": list(query_ids), "train_ids": train_ids, "per_token": None, "reduced": None}
    if all("reduced" in p for p in parts):
        merged["reduced"] = np.concatenate([p["reduced"] for p in parts])
    if all("per_token" in p for p in parts):
        width = max(p["per_token"].shape[2] for p in parts)
        merged["per_token"] = np.concatenate(
            [np.pad(p["per_token"], ((0, 0), (0, 0), (0, width - p["per_token"].shape[2]))) for p in parts], axis=1)
    return merged


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def rows_frame(rows: list[dict], id_column: str, drop: tuple[str, ...] = ()) -> pd.DataFrame:
    """A query/train table in the seed's columns: id, prompt, completion, then every extra field."""
    records = []
    for row in rows:
        record = {id_column: row["row_id"], "prompt": _text(row["prompt"]), "completion": _text(row["completion"])}
        # nested extra fields (lists, objects) as JSON, not Python's repr
        record.update({k: _text(v) if isinstance(v, (list, dict)) else v for k, v in row.items()
                       if k not in INTERNAL_COLUMNS and k not in drop})
        records.append(record)
    return pd.DataFrame.from_records(records)


def influences_frame(query_ids: list[str], train_ids: list[str], scores: np.ndarray, method: str | None = None,
                     per_token: list[list[list[float]]] | None = None) -> pd.DataFrame:
    """One row per (query, train) pair, queries outermost."""
    frame = pd.DataFrame({
        "query_id": np.repeat(np.asarray(query_ids, dtype=object), len(train_ids)),
        "train_id": np.tile(np.asarray(train_ids, dtype=object), len(query_ids)),
    })
    if method is not None:
        frame["method"] = method
    frame["influence_score"] = scores.reshape(-1).astype(np.float64)
    if per_token is not None:
        frame["per_token_scores"] = [json.dumps(tokens) for per_query in per_token for tokens in per_query]
    return frame


def write_csvs(query: pd.DataFrame, train: pd.DataFrame, influences: pd.DataFrame,
               out_query: str | Path, out_train: str | Path, out_influences: str | Path) -> None:
    """Write all three or none: each goes to a temporary name, and the renames happen only at the end."""
    import contextlib

    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in (out_query, out_train, out_influences)]
        for frame, tmp in zip((query, train, influences), tmps):
            frame.to_csv(tmp, index=False)


def messages_of(value) -> list[dict] | None:
    """The message list of a prompt/completion cell (the tables store chat turns as JSON; the data stage holds
    them as lists), or None for text."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return value
    if isinstance(value, str) and value.startswith("[{"):
        try:
            messages = json.loads(value)
        except json.JSONDecodeError:
            return None
        if isinstance(messages, list) and all(isinstance(m, dict) and "content" in m for m in messages):
            return messages
    return None


def readable(value) -> str:
    """A cell as a person reads it: chat turns as "[role] content" paragraphs, plain text as it is."""
    messages = messages_of(value)
    if messages is None:
        return value if isinstance(value, str) else ""
    return "\n\n".join(f"[{m.get('role', '?')}] {m['content']}" for m in messages)


def save_sweep(path: str | Path, scores: np.ndarray, damping: list[float], query_ids: list[str],
               row_ids: list[str]) -> None:
    """A damping sweep's scores: `scores` [damping values, queries, rows] (the training rows, then the planted
    copies), one slice per relative damping factor in `damping`."""
    arrays = {"scores": scores.astype(np.float32), "damping": np.asarray(damping, dtype=np.float64),
              "query_ids": np.asarray(query_ids, dtype=str), "row_ids": np.asarray(row_ids, dtype=str)}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def load_sweep(path: str | Path) -> dict:
    with np.load(path) as data:
        return {"scores": data["scores"], "damping": data["damping"].tolist(),
                "query_ids": data["query_ids"].tolist(), "row_ids": data["row_ids"].tolist()}
