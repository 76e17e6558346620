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
from pathlib import Path

import numpy as np

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
