"""The data stage: load transcripts, give every row a stable id, filter, convert to prompt/completion.

Two kinds of source:
- playpen: `colab-potsdam/playpen-data` (config `interactions`) from the hub at a revision, or a local
  folder of the same shape; rows have `messages` and `meta`.
- json: the if-query tools' `train.json` / `query.json` (pair_id, prompt, completion, extra fields).

Row ids are assigned on the raw split before any filter (`train-000042`), so they do not change
when a filter changes; a content hash beside each id tells when the upstream data drifted.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from playpen_attribution.io import write_json_atomic, write_parquet_atomic

log = logging.getLogger(__name__)

META_FIELDS = ["game", "game_role", "outcome", "experiment", "model", "player_name", "task_id"]
SEED_REQUIRED_FIELDS = ("pair_id", "prompt", "completion")


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file or split, the row and the fix."""


def content_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable row."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# playpen source
# ----------------------------------------------------------------------------------------------
def describe_source(source: dict) -> str:
    if source.get("hub"):
        return f"{source['hub']} (config {source.get('name', 'interactions')}, revision {source['revision']})"
    return f"{source['path']} (config {source.get('name', 'interactions')})"


def resolve_dataset_commit(source: dict) -> str | None:
    """The commit sha a hub source's revision (a branch such as `main`, a tag or a sha) points at now, for the data
    report; None for a local folder, or offline (with a warning: the report then cannot say which commit it was)."""
    if not source.get("hub"):
        return None
    revision = source["revision"]
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(source["hub"], revision=revision).sha
    except Exception as err:  # offline, or a mirror without the API
        log.warning("could not resolve revision %r of %s to a commit: %s", revision, source["hub"], err)
        return None


def load_playpen_split(source: dict, split: str) -> list[dict]:
    """Load one raw split as a list of {messages, meta} rows, from the hub or a local folder.

    A local folder with a dataset card (`configs:` metadata) loads through the same
    `datasets.load_dataset(folder, name)` call as the hub id.
    """
    import datasets

    where = source.get("hub") or source["path"]
    name = source.get("name", "interactions")
    try:
        if source.get("hub"):
            ds = datasets.load_dataset(where, name, revision=source["revision"], split=split)
        else:
            if not Path(where).is_dir():
                raise DataError(f"data source folder {where} does not exist; check data.source.path in the config")
            # A fresh cache per load: in offline mode `datasets` may otherwise return a stale cached
            # build of a folder with the same name, so an edited local folder would not be reread.
            with tempfile.TemporaryDirectory(prefix="playpen-load-") as cache_dir:
                ds = datasets.load_dataset(where, name, split=split, cache_dir=cache_dir, keep_in_memory=True)
                return _checked_rows(ds, split, source)
    except ValueError as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"cannot load split {split!r} of {describe_source(source)}: {err}") from err
    return _checked_rows(ds, split, source)


def _checked_rows(ds, split: str, source: dict) -> list[dict]:
    missing = {"messages", "meta"} - set(ds.column_names)
    if missing:
        raise DataError(
            f"split {split!r} of {describe_source(source)} lacks column(s) {sorted(missing)}; "
            f"it has {ds.column_names}. A playpen source needs `messages` and `meta`."
        )
    return ds.to_list()


def assign_ids(rows: list[dict], split: str) -> list[dict]:
    """Give every raw row its id (`<split>-<index>`) and content hash, before any filtering."""
    out = []
    for index, row in enumerate(rows):
        out.append({"row_id": f"{split}-{index:06d}", "content_hash": content_hash(row), **row})
    return out


def filter_episodes(
    rows: list[dict], *, game: str, role: str, drop_outcomes: list[str], null_outcome: str, label: str
) -> tuple[list[dict], dict]:
    """Keep one game and role, drop unwanted outcomes; return the rows and the count after each step."""
    for row in rows:
        meta = row.get("meta")
        if not isinstance(meta, dict) or "game" not in meta or "game_role" not in meta or "outcome" not in meta:
            raise DataError(
                f"{label}, row {row['row_id']}: `meta` must be a struct with game, game_role and outcome; got {meta!r}"
            )
    counts = {"raw": len(rows)}
    games = collections.Counter(r["meta"]["game"] for r in rows)
    if game not in games:
        raise DataError(
            f"{label}: no episode of game {game!r}; games present: {dict(sorted(games.items()))}. "
            f"Fix data.game in the config."
        )
    rows = [r for r in rows if r["meta"]["game"] == game]
    counts["game"] = len(rows)
    roles = collections.Counter(r["meta"]["game_role"] for r in rows)
    if role not in roles:
        raise DataError(
            f"{label}: game {game!r} has no role {role!r}; roles present: {dict(sorted(roles.items()))}. "
            f"Fix data.role in the config."
        )
    rows = [r for r in rows if r["meta"]["game_role"] == role]
    counts["role"] = len(rows)
    rows = [r for r in rows if r["meta"]["outcome"] not in drop_outcomes]
    if null_outcome == "drop":
        rows = [r for r in rows if r["meta"]["outcome"] is not None]
    counts["outcome"] = len(rows)
    return rows, counts


def split_last_assistant_turn(messages: list[dict], label: str, row_id: str) -> tuple[list[dict], list[dict]] | None:
    """prompt = every message before the last assistant turn; completion = [that turn]. None if there is none."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{label}, row {row_id}: message {i} needs string `role` and `content`, got {message!r}; "
                            f"fix or drop this episode upstream")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        return None
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    completion = [{"role": "assistant", "content": messages[last]["content"]}]
    return prompt, completion


def playpen_to_frame(rows: list[dict], label: str) -> tuple[pd.DataFrame, list[dict]]:
    """Convert filtered episodes to a prompt/completion table; return it and the skipped rows."""
    records, skipped = [], []
    for row in rows:
        converted = split_last_assistant_turn(row["messages"], label, row["row_id"])
        if converted is None:
            skipped.append({"row_id": row["row_id"], "reason": "no assistant turn after a prompt"})
            continue
        prompt, completion = converted
        meta = row["meta"]
        records.append(
            {
                "row_id": row["row_id"],
                "content_hash": row["content_hash"],
                "prompt": prompt,
                "completion": completion,
                "n_turns": len(row["messages"]),
                **{field: meta.get(field) for field in META_FIELDS},
            }
        )
    return pd.DataFrame.from_records(records), skipped


def split_config(data_cfg: dict, split_role: str) -> dict:
    """The values that decide one split's table ("train", "query" or "eval"), and nothing else.

    The rule for each split gets only these as params, so editing the query set never rewrites the
    training table (which would retrain the adapter and refit the factors). "eval" (the rows training evaluates on)
    has its own setting (`data.splits.eval`, a json source's `eval` file) and no row cap: no query setting changes
    it, so a new query selection never retrains.
    """
    if split_role == "eval":
        data_cfg = {**data_cfg, "max_rows": {**data_cfg["max_rows"], "eval": None}}
    source = data_cfg["source"]
    if source["kind"] == "json":
        if split_role not in source:
            raise DataError(f"data.source has no {split_role!r} file; a json source's eval rows are source.eval")
        return {"source": {"kind": "json", "path": source[split_role]},
                "max_rows": data_cfg["max_rows"][split_role]}
    for key in ("game", "role"):
        if not data_cfg.get(key):
            raise DataError(f"data.{key} is required for a playpen source (e.g. game: taboo, role: WordGuesser)")
    return {"source": source, "split": data_cfg["splits"][split_role], "game": data_cfg["game"],
            "role": data_cfg["role"], "drop_outcomes": data_cfg["drop_outcomes"],
            "null_outcome": data_cfg["null_outcome"], "max_rows": data_cfg["max_rows"][split_role]}


def prepare_playpen(cfg: dict) -> tuple[pd.DataFrame, dict]:
    """Load, id, filter and convert one playpen split (`cfg` from `split_config`)."""
    source, split = cfg["source"], cfg["split"]
    commit = resolve_dataset_commit(source)
    if commit:  # load the commit the report names, whatever the branch does meanwhile
        source = {**source, "revision": commit}
    label = f"split {split!r} of {describe_source(source)}"
    raw = assign_ids(load_playpen_split(source, split), split)
    rows, counts = filter_episodes(raw, game=cfg["game"], role=cfg["role"], drop_outcomes=cfg["drop_outcomes"],
                                   null_outcome=cfg["null_outcome"], label=label)
    frame, skipped = playpen_to_frame(rows, label)
    if cfg["game"] == "taboo" and len(frame):
        from playpen_attribution.taboo import add_episode_target_words

        # the word each episode is about, from the transcripts (the describer's prompt names it)
        frame = add_episode_target_words(frame, raw)
        counts["target_word_known"] = int(frame["target_word"].notna().sum())
    counts["converted"] = len(frame)
    if skipped:
        log.warning("%s: skipped %d episode(s) with no assistant turn: %s", label, len(skipped),
                    [s["row_id"] for s in skipped[:10]])
    frame = _cap_and_check(frame, cfg["max_rows"], label, counts)
    report = {"source": describe_source(source), "split": split, "counts": counts, "skipped": skipped}
    if cfg["source"].get("hub"):
        report["revision"], report["commit"] = cfg["source"]["revision"], commit
    return frame, report


# ----------------------------------------------------------------------------------------------
# the if-query tools' JSON source
# ----------------------------------------------------------------------------------------------
def load_pair_json(path: str | Path) -> pd.DataFrame:
    """Read the seed's train.json/query.json: a list of {pair_id, prompt, completion, ...extra}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects with pair_id, prompt, completion; got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: the list is empty; add at least one {{pair_id, prompt, completion}} object")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}, item {index}: expected an object, got {type(item).__name__}")
        missing = [f for f in SEED_REQUIRED_FIELDS if f not in item]
        if missing:
            ident = f" (pair_id {item['pair_id']!r})" if "pair_id" in item else ""
            raise DataError(f"{path}, item {index}{ident}: missing field(s) {missing}; each item needs "
                            f"{list(SEED_REQUIRED_FIELDS)}")
        for field in ("prompt", "completion"):
            if not isinstance(item[field], str):
                raise DataError(f"{path}, item {index} (pair_id {item['pair_id']!r}): `{field}` must be a string")
    ids = [str(item["pair_id"]) for item in items]
    duplicates = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if duplicates:
        raise DataError(f"{path}: duplicate pair_id(s) {duplicates[:10]}; every pair_id must be unique")
    records = []
    for item, row_id in zip(items, ids):
        extra = {k: v for k, v in item.items() if k not in SEED_REQUIRED_FIELDS}
        records.append({"row_id": row_id, "content_hash": content_hash(item), "prompt": item["prompt"],
                        "completion": item["completion"], **extra})
    return pd.DataFrame.from_records(records)


def prepare_json(cfg: dict) -> tuple[pd.DataFrame, dict]:
    path = cfg["source"]["path"]
    frame = load_pair_json(path)
    counts = {"raw": len(frame)}
    frame = _cap_and_check(frame, cfg["max_rows"], str(path), counts)
    return frame, {"source": str(path), "counts": counts, "skipped": []}


def _cap_and_check(frame: pd.DataFrame, max_rows: int | None, label: str, counts: dict) -> pd.DataFrame:
    if frame.empty:
        raise DataError(f"{label}: no rows left after filtering ({counts}); loosen the filter in the config")
    if max_rows is not None and len(frame) > max_rows:
        frame = frame.iloc[:max_rows].reset_index(drop=True)
    counts["kept"] = len(frame)
    return frame


# ----------------------------------------------------------------------------------------------
# stage entry point (rule `prepare_data`)
# ----------------------------------------------------------------------------------------------
def prepare_split(cfg: dict, out_rows: str | Path, out_report: str | Path) -> dict:
    """Write one split's table as parquet and a report of what each step kept (`cfg` from `split_config`)."""
    prepare = prepare_json if cfg["source"]["kind"] == "json" else prepare_playpen
    frame, report = prepare(cfg)
    # the same episode text under other metadata (another experiment, model or task id) is still a duplicate
    # for attribution: compare what is trained on, prompt and completion, not the whole row
    report["duplicates"] = duplicate_groups(frame["row_id"], [content_hash([p, c]) for p, c in
                                                              zip(frame["prompt"], frame["completion"])])
    write_parquet_atomic(frame, out_rows)
    write_json_atomic(report, out_report)
    log.info("%s: %s", out_rows, report["counts"])
    return report


def duplicate_groups(row_ids, keys) -> dict:
    """Rows whose key (a hash of their text or tokens) repeats another row's: the groups of ids (first 100) and the
    number of rows that repeat an earlier one."""
    groups: dict = collections.defaultdict(list)
    for row_id, key in zip(row_ids, keys):
        groups[key].append(row_id)
    repeated = [ids for ids in groups.values() if len(ids) > 1]
    return {"rows_repeating_an_earlier_row": sum(len(ids) - 1 for ids in repeated), "groups": repeated[:100]}


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a stage parquet file as plain Python objects (lists of dicts, not numpy arrays)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
