"""Bergson attribution on the one tokenization: reduce the query set to one gradient, score training rows.

A variant is `dot` or `cosine` (unit-normalized gradients), optionally preconditioned with a dense
(autocorrelation) Hessian from the training rows, the query rows, or both mixed (Bergson's `mix`):
`dot`, `cosine`, `dot_train`, `cosine_mixed`, ... Its method name in the CSVs is `bergson_<variant>`.
`trackstar` is `cosine_mixed` on gradients normalised by the adapter's Adam second moments (Bergson's
`IndexConfig.optimizer_state`, TrackStar's optimizer normalisation): its index, per-query gradients and
preconditioners are collected in their own gradient space (`bergson/adam/`), from the `optimizer.pt` training saved.
Preconditioned `dot` applies H^-1 to the query; preconditioned `cosine` applies H^-1/2 to both sides,
so the same Hessian is given to the reduce and the score step. Scores are <query, train> of gradients
of the summed completion loss: positive = helpful, as for the influence functions.

Bergson's build-then-query workflow: the training rows' gradients are collected once per shard into a Bergson
index (`Build`, the only pass over the training tokens besides a `_train`/`_mixed` preconditioner's fit), and every
variant's scores come from that index through Bergson's `Attributor`, with no model: a new variant, or a new
preconditioner, reuses the index. The query side runs Bergson's own commands (`Build` for the per-query gradients,
`Reduce`, `Hessian`, `Mix`) on the adapter folder, with its LoRA layers tracked. Every output is written atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from playpen_attribution.io import atomic_path, write_csv_atomic, write_json_atomic
from playpen_attribution.methods import gradient_space, parse_variant
from playpen_attribution.modeling import (
    adapter_view_with_absolute_base,
    is_adapter,
    model_type_of,
    refuse_float16_for_gemma3,
)
from playpen_attribution.settings import (
    BergsonGradients,
    BergsonHessian,
    BergsonMix,
    BergsonReduce,
    BergsonScoring,
    BergsonTrak,
)
from playpen_attribution.stage import log_gradient_pass, token_count
from playpen_attribution.training import OPTIMIZER_FILE

log = logging.getLogger(__name__)

INDEX_ROWS = "row_ids.json"  # beside Bergson's files in an index: the training rows it holds, in order


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




def optimizer_state_of(model_dir, normalize: str | None) -> str:
    """Bergson's `optimizer_state` for a gradient space: the adapter's saved Adam state for "adam", else none."""
    if normalize in (None, "raw"):
        return ""
    if normalize != "adam":
        raise ValueError(f"unknown gradient normalisation {normalize!r}; expected raw or adam")
    path = Path(model_dir) / OPTIMIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: TrackStar normalises gradients by the optimizer state that "
                                f"training saves beside the adapter; retrain it (snakemake {model_dir} --force)")
    return str(path.resolve())


def _index_config(run_path: Path, model, tokens_dir, settings: BergsonGradients, split: str = "train",
                  optimizer_state: str = ""):
    from bergson.config.config import DataConfig, DistributedConfig, IndexConfig

    # Bergson loads the model itself: "auto" takes the checkpoint's own dtype, which is never float16 for Gemma 3
    refuse_float16_for_gemma3(model_type_of(model), settings.precision, "attribution.bergson.precision")

    return IndexConfig(
        run_path=str(run_path),
        overwrite=True,
        model=str(model),
        # One process per job, whatever GPUs the node shows: Bergson's launcher would otherwise start one worker
        # per visible GPU, and its workers would not have the split-preconditioner fix below (it patches this
        # process only). Scale out with attribution.shards: one job, and one GPU, per shard.
        distributed=DistributedConfig(nnode=1, nproc_per_node=1),
        precision=settings.precision,
        projection_dim=settings.projection_dim,
        projection_seed=settings.seed,
        token_batch_size=settings.token_batch_size,
        drop_columns=False,
        data=DataConfig(dataset=str(Path(tokens_dir).resolve()), split=split),
        # TrackStar: every gradient divided by sqrt(Adam's second moment) + eps before projection
        optimizer_state=optimizer_state,
    )


def _inversion(damping_factor: float | None, hessian_dir):
    """How a preconditioner is inverted; damping is read only where there is one (gradient collections and plain
    variants are not given it)."""
    from bergson.config.config import InversionConfig

    return InversionConfig(damping_factor=damping_factor) if hessian_dir else InversionConfig()


def _preprocess(damping_factor: float | None, unit_normalize: bool, hessian_dir, aggregation: str = "none"):
    from bergson.config.config import PreprocessConfig

    return PreprocessConfig(
        unit_normalize=unit_normalize,
        hessian_path=str(Path(hessian_dir).resolve()) if hessian_dir else None,
        inversion_cfg=_inversion(damping_factor, hessian_dir),
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


def _log_pass(tokens_dir, purpose: str) -> None:
    import datasets

    data = datasets.load_from_disk(str(tokens_dir))
    log_gradient_pass(tokens_dir, len(data), token_count(data), purpose)


def _seed(settings: BergsonGradients) -> None:
    import torch

    torch.manual_seed(settings.seed)


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def query_gradients_stage(model_dir, query_tokens_dir, out_dir, settings: BergsonGradients,
                          normalize: str = "raw") -> None:
    """Rule `bergson_query_gradients`: one gradient per query (no aggregation, no preprocessing; `normalize` "adam":
    divided by the adapter's Adam second moments); every variant's per-query scores start from these."""
    from bergson.cli.commands import Build

    _seed(settings)
    state = optimizer_state_of(model_dir, normalize)
    with _bergson_output(out_dir) as run_path, _bergson_model(model_dir) as model:
        Build(index_cfg=_index_config(run_path, model, query_tokens_dir, settings, optimizer_state=state),
              preprocess_cfg=_preprocess(None, False, None)).execute()
    _log_pass(query_tokens_dir, "bergson per-query gradients")


def hessian_stage(model_dir, tokens_dir, out_dir, settings: BergsonHessian, normalize: str = "raw") -> None:
    """Rule `bergson_hessian`: a dense (autocorrelation) preconditioner from one side's gradients (in the gradient
    space `normalize` names)."""
    from bergson.cli.commands import Hessian
    from bergson.config.config import HessianConfig

    _seed(settings)  # the sampled-label Fisher draws labels from the model
    state = optimizer_state_of(model_dir, normalize)
    with _bergson_output(out_dir) as run_path, _bergson_model(model_dir) as model:
        Hessian(hessian_cfg=HessianConfig(method="autocorrelation",
                                          use_dataset_labels=settings.fisher == "empirical"),
                index_cfg=_index_config(run_path, model, tokens_dir, settings, optimizer_state=state)).execute()
    _log_pass(tokens_dir, "bergson preconditioner")


def mix_stage(query_hessian_dir, train_hessian_dir, out_dir, settings: BergsonMix) -> None:
    """Rule `bergson_mix`: query and training preconditioners mixed (Chang et al. 2024, A.1.3)."""
    from bergson.cli.commands import Mix

    with _bergson_output(out_dir) as run_path:
        Mix(query_path=str(Path(query_hessian_dir).resolve()), index_path=str(Path(train_hessian_dir).resolve()),
            output_path=str(run_path),
            target_downweight_components=settings.mix_downweight_components).execute()


def reduce_stage(model_dir, query_tokens_dir, out_dir, variant: str, hessian_dir, settings: BergsonReduce) -> None:
    """Rule `bergson_reduce`: the whole query set as one gradient (mean or sum of the preprocessed queries)."""
    from bergson.cli.commands import Reduce

    unit_normalize, _ = parse_variant(variant)
    _seed(settings)
    state = optimizer_state_of(model_dir, gradient_space(variant))
    with _bergson_output(out_dir) as run_path, _bergson_model(model_dir) as model:
        Reduce(index_cfg=_index_config(run_path, model, query_tokens_dir, settings, optimizer_state=state),
               preprocess_cfg=_preprocess(settings.damping_factor, unit_normalize, hessian_dir,
                                          aggregation=settings.aggregation)).execute()
    _log_pass(query_tokens_dir, f"bergson reduced query, {variant}")


def _shard_split(rows) -> str:
    return f"train[{int(rows[0])}:{int(rows[-1]) + 1}]" if len(rows) else "train[0:0]"


def index_stage(model_dir, train_tokens_dir, out_dir, *, shard: int, shards: int,
                settings: BergsonGradients, normalize: str = "raw") -> None:
    """Rule `bergson_index`: the raw (projected) gradient of every training row of one contiguous shard, in
    Bergson's index format (no normalization, no preconditioner: those belong to the variants), with the rows'
    ids beside it. The one pass over these rows' tokens that every variant shares."""
    import datasets
    from bergson.cli.commands import Build

    from playpen_attribution.tables import shard_indices

    train = datasets.load_from_disk(str(train_tokens_dir))
    rows = shard_indices(len(train), shards, shard)
    shard_rows = train.select(rows)
    _seed(settings)
    state = optimizer_state_of(model_dir, normalize)
    with _bergson_output(out_dir) as run_path, _bergson_model(model_dir) as model:
        Build(index_cfg=_index_config(run_path, model, train_tokens_dir, settings, split=_shard_split(rows),
                                      optimizer_state=state),
              preprocess_cfg=_preprocess(None, False, None)).execute()
        write_json_atomic({"row_ids": list(shard_rows["row_id"]), "shard": shard, "shards": shards},
                          Path(run_path) / INDEX_ROWS)
    log_gradient_pass(train_tokens_dir, len(shard_rows), token_count(shard_rows), f"bergson index, shard {shard}")


def _stored_gradients(path, dtype) -> dict:
    """A Bergson gradient folder (index, per-query gradients, reduced query) as {module: [rows, dim]} tensors."""
    from bergson.data import column_offsets, load_gradients
    from bergson.utils.utils import numpy_to_tensor

    grads = load_gradients(path)
    sizes = json.loads((Path(path) / "info.json").read_text())["grad_sizes"]
    # copied out of the read-only memory map: Bergson's search normalizes the queries in place
    return {name: numpy_to_tensor(np.array(grads[:, lo:hi])).to(dtype)
            for name, (lo, hi) in column_offsets(sizes).items()}


@contextmanager
def _modules_in_index_order():
    """Bergson's `Attributor.search` sums the per-module scores over `set(ordered_modules)`, whose order, and so the
    float32 rounding of the sum, changes with each process's string-hash seed: the same inputs gave scores ~1e-7
    apart from run to run. Within the block, the module's `set` keeps the index's module order (a list)."""
    import bergson.query.attributor as attributor_module

    attributor_module.set = lambda items=(): list(dict.fromkeys(items))
    try:
        yield
    finally:
        del attributor_module.set


def _index_scores(index_dir, query_gradients_dir, hessian_dir, *, unit_normalize: bool,
                  damping_factor: float | None):
    """Bergson's `Attributor` on one index and every query's raw gradient, preconditioned and normalized as the
    variant says: (attributor, [queries, rows] scores as numpy, mask of the rows Bergson gave no gradient)."""
    import torch
    from bergson.data import load_gradients
    from bergson.query.attributor import Attributor

    dtype = torch.float32  # scores in fp32 whatever precision the gradients were kept in
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attributor = Attributor(index_dir, device=device, dtype=dtype, unit_norm=unit_normalize,
                            inversion_cfg=_inversion(damping_factor, hessian_dir),
                            hessian_path=str(Path(hessian_dir).resolve()) if hessian_dir else None)
    attributor.processor.check_saved_projection(Path(query_gradients_dir), "The per-query gradients")
    with torch.inference_mode():
        # the per-query gradients are raw: search preconditions and normalizes them as this variant says
        with _modules_in_index_order():
            values, order = attributor.search(_stored_gradients(query_gradients_dir, dtype), k=None)
        per_query = torch.empty_like(values).scatter_(1, order, values).float().cpu().numpy()
    # Bergson gives no gradient to a row with fewer than two tokens: its index row stays zero. Such a row is
    # reported as unscored (NaN), never given a score of 0.
    raw = load_gradients(index_dir)
    unscored = ~np.any(raw.view(np.uint8).reshape(len(raw), -1), axis=1)
    per_query[:, unscored] = np.nan
    return attributor, per_query, unscored


def score_shard_stage(index_dir, query_tokens_dir, reduced_dir, query_gradients_dir, hessian_dir, out_path, *,
                      variant: str, settings: BergsonScoring) -> None:
    """Rule `bergson_scores`: one shard's index scored against the reduced query (one score per row) and against
    every query on its own ([queries, rows], for influences.csv), with Bergson's `Attributor` (no model, no
    gradients computed). `dot` applies H^-1 to the queries; `cosine` H^-1/2 to both sides, then unit norms."""
    import datasets
    import torch

    from playpen_attribution.tables import save_shard

    unit_normalize, _ = parse_variant(variant)
    index_dir = Path(index_dir)
    query_ids = list(datasets.load_from_disk(str(query_tokens_dir))["row_id"])
    train_ids = json.loads((index_dir / INDEX_ROWS).read_text())["row_ids"]
    attributor, per_query, unscored = _index_scores(index_dir, query_gradients_dir, hessian_dir,
                                                    unit_normalize=unit_normalize,
                                                    damping_factor=settings.damping_factor)
    attributor.processor.check_saved_projection(Path(reduced_dir), "The reduced query")
    with torch.inference_mode():
        # the reduced query already carries its preprocessing (from `bergson_reduce`): only the index side's applies
        device = next(iter(attributor.grads.values())).device
        reduced_query = _stored_gradients(reduced_dir, torch.float32)
        reduced = sum(reduced_query[m].to(device) @ attributor.grads[m].T for m in attributor.ordered_modules)[0]
    reduced = reduced.float().cpu().numpy()
    reduced[unscored] = np.nan
    if per_query.shape != (len(query_ids), len(train_ids)):
        raise RuntimeError(f"Bergson returned scores of shape {per_query.shape} for {len(query_ids)} queries and "
                           f"{len(train_ids)} training rows in {index_dir}")
    save_shard(out_path, per_query, query_ids, train_ids, reduced=reduced)


TRAK_SCORES = "scores.npz"  # in a bergson_trak folder: the training rows' scores, in the shards' format
TRAK_PLANTED = "planted.npz"  # and the planted copies', where the run plants some


def read_score_store(scores_dir, queries: int, rows: int) -> np.ndarray:
    """A Bergson score directory (`scores.bin` + `info.json`, read by Bergson's own `load_scores`) as a float64
    [queries, rows] array; refused unless it holds exactly that many per-row scores, every cell written (Bergson
    zero-fills the file first, so an unwritten cell would read as a score of 0)."""
    from bergson.data import load_scores

    store = load_scores(Path(scores_dir))
    if store.offsets is not None or store.num_scores != queries or len(store) != rows:
        kind = "per-token" if store.offsets is not None else "per-row"
        raise ValueError(f"{scores_dir}: Bergson wrote {store.num_scores} x {len(store)} {kind} scores where "
                         f"{queries} queries x {rows} rows per row were asked; rerun the job (snakemake --force)")
    if not store.is_written():
        raise ValueError(f"{scores_dir}: Bergson left some of the {queries} x {rows} scores unwritten (an interrupted "
                         f"scoring pass); rerun the job (snakemake --force)")
    return np.stack([np.asarray(store.get(slice(None), q), dtype=np.float64) for q in range(queries)])


def trak_stage(model_dirs: list, train_tokens_dir, query_tokens_dir, out_dir, settings: BergsonTrak, *,
               aggregation: str = "mean", planted_tokens_dir=None) -> None:
    """Rule `bergson_trak`: Bergson's TRAK pipeline (`bergson.cli.trak.trak`, Park et al. 2023) over the ensemble of
    adapters `model_dirs`: per member, gradients of the negative log-odds projected as one vector
    (`trak_projection_dim`), the queries whitened by the inverse Gram of the training rows' gradients, each row's
    score weighted by its 1 - p (mean label-token probability); the members' scores, each divided by the mean
    entry of its inverse Gram, averaged (member i projects with seed + i).

    The planted copies, where given, are scored in the same job as extra rows after the training rows; the Gram is
    fitted on the training rows only (`stats_sample_size`), so the training rows' scores do not depend on them.
    Writes `scores.npz` ([queries, rows] and the reduced score: the mean, or sum, of the per-query scores, which is
    the score against the aggregated query because TRAK is linear in the query gradient) and `planted.npz`."""
    import datasets
    from bergson.cli.trak import trak
    from bergson.config.config import InversionConfig, PreprocessConfig, QuerySetConfig, ScoreConfig, TrakConfig

    from playpen_attribution.tables import save_shard

    train = datasets.load_from_disk(str(train_tokens_dir))
    query_ids = list(datasets.load_from_disk(str(query_tokens_dir))["row_id"])
    planted = datasets.load_from_disk(str(planted_tokens_dir)) if planted_tokens_dir else None
    gradients = BergsonGradients(precision=settings.precision, projection_dim=settings.trak_projection_dim,
                                 seed=settings.seed, token_batch_size=settings.token_batch_size)
    _seed(gradients)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.bergson-", dir=out_dir.parent) as scratch, \
            atomic_path(out_dir, directory=True) as tmp, ExitStack() as stack:
        scored = train if planted is None else datasets.concatenate_datasets([train, planted.select_columns(
            train.column_names)])
        scored_dir = Path(scratch) / "rows"
        scored.save_to_disk(str(scored_dir))
        models = [str(stack.enter_context(_bergson_model(d))) for d in model_dirs]
        index_cfg = _index_config(Path(scratch) / "trak", models[0], scored_dir, gradients)
        index_cfg.projection_target = "global"  # one projection of the whole gradient, as TRAK sketches it
        index_cfg.loss_fn = "log_odds"  # TRAK's model output function
        trak(index_cfg, TrakConfig(
            query=QuerySetConfig(dataset=str(Path(query_tokens_dir).resolve()), split="train", aggregation="none"),
            preprocess_cfg=PreprocessConfig(inversion_cfg=InversionConfig(damping_factor=settings.damping_factor)),
            score_cfg=ScoreConfig(), checkpoints=models, stats_sample_size=len(train),
            loss_batch_size=settings.trak_loss_batch_size))
        scores = read_score_store(Path(scratch) / "trak" / "scores", len(query_ids), len(scored))
        reduce = np.mean if aggregation == "mean" else np.sum
        rows = len(train)
        save_shard(tmp / TRAK_SCORES, scores[:, :rows], query_ids, list(train["row_id"]),
                   reduced=reduce(scores[:, :rows], axis=0))
        if planted is not None:
            save_shard(tmp / TRAK_PLANTED, scores[:, rows:], query_ids, list(planted["row_id"]),
                       reduced=reduce(scores[:, rows:], axis=0))
        write_json_atomic({"members": [str(d) for d in model_dirs], "rows": rows,
                           "planted": 0 if planted is None else len(planted)}, tmp / "trak.json")
    # per member: the Gram's pass over the training rows, and the scoring pass over them and the copies
    members = len(model_dirs)
    log_gradient_pass(train_tokens_dir, (len(train) + len(scored)) * members,
                      (token_count(train) + token_count(scored)) * members,
                      f"bergson TRAK, {members} member(s): Gram and scores")


def trak_shard_stage(trak_dir, out_path, *, shard: int, shards: int, planted: bool = False) -> None:
    """Rules `bergson_trak_shard` / `planted_bergson_trak`: one contiguous shard of TRAK's scores in the shards'
    format, so the merges read TRAK like every other method."""
    from playpen_attribution.tables import save_shard, shard_indices

    whole = np.load(Path(trak_dir) / (TRAK_PLANTED if planted else TRAK_SCORES), allow_pickle=False)
    rows = shard_indices(len(whole["train_ids"]), shards, shard)
    save_shard(out_path, whole["scores"][:, rows], list(whole["query_ids"]), list(whole["train_ids"][rows]),
               reduced=whole["reduced"][rows])


@contextmanager
def _eigendecompose_once():
    """Bergson inverts a preconditioner from its eigendecomposition whenever an `Attributor` is built; the sweep builds
    one per damping factor and index folder from the same matrices. Within the block, `torch.linalg.eigh` of an input
    it has seen (same dtype, shape and bytes) returns the stored result: the damping only rescales eigenvalues."""
    import hashlib

    import torch

    original, cache = torch.linalg.eigh, {}

    def eigh(matrix, *args, **kwargs):
        if args or kwargs or matrix.requires_grad:
            return original(matrix, *args, **kwargs)
        data = matrix.detach().contiguous().cpu()
        key = (data.dtype, tuple(data.shape), hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest())
        if key not in cache:
            cache[key] = original(matrix)
        return cache[key]

    torch.linalg.eigh = eigh
    try:
        yield
    finally:
        torch.linalg.eigh = original


def damping_sweep_stage(index_dirs: list, query_tokens_dir, query_gradients_dir, hessian_dir, out_path, *,
                        variant: str, damping: list[float]) -> None:
    """Rule `damping_sweep_bergson`: every query against every training row and planted copy (the index folders
    in order), once per damping factor c (preconditioner inverse 1/(lambda + c mean lambda)); no model."""
    import datasets

    from playpen_attribution.tables import save_sweep

    unit_normalize, side = parse_variant(variant)
    if side is None:
        raise ValueError(f"{variant} has no preconditioner: damping does not change it; leave it out of "
                         "validation.damping.methods")
    query_ids = list(datasets.load_from_disk(str(query_tokens_dir))["row_id"])
    row_ids = [r for folder in index_dirs for r in json.loads((Path(folder) / INDEX_ROWS).read_text())["row_ids"]]
    scores = []
    with _eigendecompose_once():
        for scale in damping:
            blocks = [_index_scores(folder, query_gradients_dir, hessian_dir, unit_normalize=unit_normalize,
                                    damping_factor=scale)[1] for folder in index_dirs]
            scores.append(np.concatenate(blocks, axis=1))
            log.info("%s: damping %g scored", variant, scale)
    save_sweep(out_path, np.stack(scores), damping, query_ids, row_ids)


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
