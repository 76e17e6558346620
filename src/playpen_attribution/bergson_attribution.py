"""Bergson attribution on the one tokenization: reduce the query set to one gradient, score training rows.

A variant is `dot` or `cosine` (unit-normalized gradients), optionally preconditioned with a dense
(autocorrelation) Hessian from the training rows, the query rows, or both mixed (Bergson's `mix`):
`dot`, `cosine`, `dot_train`, `cosine_mixed`, ... Its method name in the CSVs is `bergson_<variant>`.
Preconditioned `dot` applies H^-1 to the query; preconditioned `cosine` applies H^-1/2 to both sides,
so the same Hessian is given to the reduce and the score step. Scores are <query, train> of gradients
of the summed completion loss: positive = helpful, as for the influence functions.

Every step runs in-process through Bergson's own commands (`Build`, `Reduce`, `Hessian`, `Mix`,
`Score`) on the adapter folder, with its LoRA layers tracked, and writes its output atomically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from playpen_attribution.io import atomic_path, write_csv_atomic, write_json_atomic
from playpen_attribution.modeling import adapter_view_with_absolute_base, is_adapter

log = logging.getLogger(__name__)

VARIANT_PATTERN = r"(dot|cosine)(_(train|query|mixed))?"
METHOD_PREFIX = "bergson_"


def parse_variant(variant: str) -> tuple[bool, str | None]:
    """(unit_normalize, preconditioner side or None) of a variant name such as `cosine_mixed`."""
    match = re.fullmatch(VARIANT_PATTERN, variant)
    if not match:
        raise ValueError(f"unknown Bergson variant {variant!r}: expected dot or cosine, optionally followed by "
                         f"_train, _query or _mixed (e.g. cosine_mixed)")
    return match.group(1) == "cosine", match.group(3)


def is_bergson_method(method: str) -> bool:
    return method.startswith(METHOD_PREFIX)


def variant_of(method: str) -> str:
    return method.removeprefix(METHOD_PREFIX)


def _patch_split_preconditioner() -> None:
    """Bergson 2.5.1 stacks the per-module H^-1/2 matrices of a dense preconditioner into one tensor for
    cosine scoring, which fails when modules differ in gradient size (LoRA A/B of q vs k/v projections under
    grouped-query attention, with projection_dim 0). Apply each module's matrix on its own instead: the
    same product, without the equal-size requirement."""
    import bergson.score.score as bergson_score

    def split_transform(hessians, modules, device, dtype):
        matrices = {m: hessians[m].to(device, dtype) for m in modules}

        def transform(grads):
            return {m: grads[m].to(device, dtype, non_blocking=True) @ matrices[m] for m in modules}

        return transform

    bergson_score._make_split_hessian = split_transform


@contextmanager
def _bergson_model(model_dir):
    """The model folder as Bergson must see it: absolute (a relative path that looks like org/name sends
    peft/bergson to the Hub), and for an adapter a view whose base path is absolute too (Bergson resolves it
    from the working directory, the adapter records it relative to itself)."""
    if is_adapter(model_dir):
        with adapter_view_with_absolute_base(model_dir) as view:
            yield view
    else:
        yield Path(model_dir).resolve()


def _index_config(run_path: Path, model, tokens_dir, settings: dict, split: str = "train"):
    from bergson.config.config import DataConfig, DistributedConfig, IndexConfig

    return IndexConfig(
        run_path=str(run_path),
        overwrite=True,
        model=str(model),
        # One process per job, whatever GPUs the node shows: Bergson's launcher would otherwise start one worker
        # per visible GPU, and its workers would not have the split-preconditioner fix below (it patches this
        # process only). Scale out with attribution.shards: one job, and one GPU, per shard.
        distributed=DistributedConfig(nnode=1, nproc_per_node=1),
        precision=settings["precision"],
        projection_dim=settings["projection_dim"],
        projection_seed=settings["seed"],
        token_batch_size=settings["token_batch_size"],
        drop_columns=False,
        data=DataConfig(dataset=str(Path(tokens_dir).resolve()), split=split),
    )


def _preprocess(settings: dict, unit_normalize: bool, hessian_dir, aggregation: str = "none"):
    from bergson.config.config import InversionConfig, PreprocessConfig

    return PreprocessConfig(
        unit_normalize=unit_normalize,
        hessian_path=str(Path(hessian_dir).resolve()) if hessian_dir else None,
        inversion_cfg=InversionConfig(damping_factor=settings["damping_factor"]),
        aggregation=aggregation,
    )


@contextmanager
def _bergson_output(out_dir):
    """A temporary run path that becomes `out_dir` on success; Bergson's own `.part` sibling is cleaned too."""
    with atomic_path(out_dir, directory=True) as tmp:
        try:
            yield tmp
        finally:
            shutil.rmtree(f"{tmp}.part", ignore_errors=True)


def _seed(settings: dict) -> None:
    import torch

    torch.manual_seed(settings["seed"])


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def query_gradients_stage(model_dir, query_tokens_dir, out_dir, settings: dict) -> None:
    """Rule `bergson_query_gradients`: one raw gradient per query (no aggregation, no preprocessing);
    every variant's per-query scores start from these."""
    from bergson.cli.commands import Build

    _seed(settings)
    with _bergson_output(out_dir) as run_path, _bergson_model(model_dir) as model:
        Build(index_cfg=_index_config(run_path, model, query_tokens_dir, settings),
              preprocess_cfg=_preprocess(settings, False, None)).execute()


def hessian_stage(model_dir, tokens_dir, out_dir, settings: dict) -> None:
    """Rule `bergson_hessian`: a dense (autocorrelation) preconditioner from one side's gradients."""
    from bergson.cli.commands import Hessian
    from bergson.config.config import HessianConfig

    _seed(settings)  # the sampled-label Fisher draws labels from the model
    with _bergson_output(out_dir) as run_path, _bergson_model(model_dir) as model:
        Hessian(hessian_cfg=HessianConfig(method="autocorrelation",
                                          use_dataset_labels=settings["fisher"] == "empirical"),
                index_cfg=_index_config(run_path, model, tokens_dir, settings)).execute()


def mix_stage(query_hessian_dir, train_hessian_dir, out_dir, settings: dict) -> None:
    """Rule `bergson_mix`: query and training preconditioners mixed (Chang et al. 2024, A.1.3)."""
    from bergson.cli.commands import Mix

    with _bergson_output(out_dir) as run_path:
        Mix(query_path=str(Path(query_hessian_dir).resolve()), index_path=str(Path(train_hessian_dir).resolve()),
            output_path=str(run_path),
            target_downweight_components=settings["mix_downweight_components"]).execute()


def reduce_stage(model_dir, query_tokens_dir, out_dir, variant: str, hessian_dir, settings: dict) -> None:
    """Rule `bergson_reduce`: the whole query set as one gradient (mean or sum of the preprocessed queries)."""
    from bergson.cli.commands import Reduce

    unit_normalize, _ = parse_variant(variant)
    _patch_split_preconditioner()
    _seed(settings)
    with _bergson_output(out_dir) as run_path, _bergson_model(model_dir) as model:
        Reduce(index_cfg=_index_config(run_path, model, query_tokens_dir, settings),
               preprocess_cfg=_preprocess(settings, unit_normalize, hessian_dir,
                                          aggregation=settings["aggregation"])).execute()


def _score(model_dir, train_tokens_dir, query_dir, split: str, preprocess, settings: dict) -> np.ndarray:
    """Bergson scores [rows, queries] of a slice of the training rows; NaN where Bergson wrote nothing
    (rows with fewer than two tokens get no gradient: reported, never given a fake score)."""
    from bergson.cli.commands import Score
    from bergson.config.config import ScoreConfig
    from bergson.data import load_scores

    with tempfile.TemporaryDirectory(prefix="bergson-score-", dir=os.environ.get("TMPDIR")) as scratch, \
            _bergson_model(model_dir) as model:
        run_path = Path(scratch) / "scores"
        # scores accumulate in fp32 whatever precision the model runs in
        Score(score_cfg=ScoreConfig(query_path=str(Path(query_dir).resolve()), precision="fp32"),
              index_cfg=_index_config(run_path, model, train_tokens_dir, settings, split=split),
              preprocess_cfg=preprocess).execute()
        stored = load_scores(run_path)
        scores = np.asarray(stored[:], dtype=np.float32).copy()
        written = np.stack([np.asarray(stored.mmap[f"written_{i}"]) for i in range(stored.num_scores)], axis=1)
    scores[~written] = np.nan
    return scores


def score_shard_stage(model_dir, train_tokens_dir, query_tokens_dir, reduced_dir, query_gradients_dir, hessian_dir,
                      out_path, *, variant: str, shard: int, shards: int, settings: dict) -> None:
    """Rule `bergson_scores`: one contiguous slice of the training rows against the reduced query (one score per
    row) and against every query on its own ([queries, rows], for influences.csv)."""
    import datasets

    from playpen_attribution.tables import save_shard, shard_indices

    unit_normalize, _ = parse_variant(variant)
    _patch_split_preconditioner()
    _seed(settings)
    train = datasets.load_from_disk(str(train_tokens_dir))
    query_ids = datasets.load_from_disk(str(query_tokens_dir))["row_id"]
    rows = shard_indices(len(train), shards, shard)
    split = f"train[{int(rows[0])}:{int(rows[-1]) + 1}]" if len(rows) else "train[0:0]"
    # the reduced query already carries its preprocessing; the score step applies the same Hessian to the
    # training side for cosine (H^-1/2 on both sides), as Bergson requires
    preprocess = _preprocess(settings, unit_normalize, hessian_dir)
    reduced = _score(model_dir, train_tokens_dir, reduced_dir, split, preprocess, settings)[:, 0]
    per_query = _score(model_dir, train_tokens_dir, query_gradients_dir, split, preprocess, settings)
    if per_query.shape != (len(rows), len(query_ids)):
        raise RuntimeError(f"Bergson returned scores of shape {per_query.shape} for {len(rows)} training rows and "
                           f"{len(query_ids)} queries")
    save_shard(out_path, per_query.T, query_ids, train.select(rows)["row_id"], reduced=reduced)


def merge_train_scores_stage(train_rows, train_tokens_dir, shards_by_method: dict, out_csv, out_report) -> None:
    """Rule `merge_train_scores`: one score per training row and variant against the whole query set, ranked
    (1 = most helpful), with the run's metadata; rows Bergson could not score are listed in the report."""
    import datasets
    import pandas as pd

    from playpen_attribution.data import read_rows
    from playpen_attribution.tables import load_shards, rows_frame

    train_ids = list(datasets.load_from_disk(str(train_tokens_dir))["row_id"])
    by_id = {r["row_id"]: r for r in read_rows(train_rows)}
    metadata = rows_frame([by_id[i] for i in train_ids], "train_id").drop(columns=["prompt", "completion"])
    frames, skipped = [], {}
    for method, paths in shards_by_method.items():
        merged = load_shards(paths)
        if merged["train_ids"] != train_ids:
            raise ValueError(f"{method} shards do not cover the tokenized training rows in order; rerun their scoring")
        frame = pd.DataFrame({"train_id": train_ids, "method": method, "score": merged["reduced"]})
        skipped[method] = frame.loc[frame.score.isna(), "train_id"].tolist()
        frame = frame.dropna(subset=["score"])
        frame["rank"] = frame.score.rank(ascending=False, method="first").astype(int)
        frames.append(frame.sort_values("rank"))
    table = pd.concat(frames, ignore_index=True).merge(metadata, on="train_id", how="left")
    write_csv_atomic(table, out_csv)
    write_json_atomic({"skipped_rows": skipped,
                       "why": "Bergson gives no gradient to a row with fewer than two tokens"}, out_report)
    for method, ids in skipped.items():
        if ids:
            log.warning("%s: %d training rows not scored (too short): %s", method, len(ids), ids[:10])
