"""Kronfluence influence functions on the one tokenization: fit factors once, score pairs in shards.

Score of a (query q, training row t) pair = g_q^T (H + damping)^-1 g_t, where g is the gradient of the
summed completion cross-entropy with respect to the tracked modules and H the strategy's curvature
approximation (identity, diagonal, K-FAC, EK-FAC). Positive = helpful: a gradient step on t lowers q's loss.

Factors live in `<factors_dir>/influence/factors_<strategy>_<n>/` beside `<factors_dir>/metadata.json`
(the if-query tools' layout). The metadata says which model, adapter weights, modules and data they were
fitted on; scoring with factors from another model is refused with the differences named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from playpen_attribution.io import atomic_path, write_json_atomic
from playpen_attribution.methods import KRONFLUENCE_STRATEGIES
from playpen_attribution.modeling import (
    collate,
    completion_loss,
    load_for_attribution,
    load_tokenizer,
    pad_token_id,
)
from playpen_attribution.provenance import tree_hash
from playpen_attribution.settings import FactorFit, KronfluenceScoring, KronfluenceSweep
from playpen_attribution.stage import log_gradient_pass, token_count

log = logging.getLogger(__name__)

STRATEGIES = KRONFLUENCE_STRATEGIES
ANALYSIS_NAME = "influence"
MLP_MODULE_PATTERN = re.compile(r".*mlp.*(proj|dense|fc).*")  # the if-query tools' rule
LAYER_PATTERN = re.compile(r"\.layers\.(\d+)\.")


class FactorsError(ValueError):
    """Factors that are missing, incomplete or fitted on another model."""


# ----------------------------------------------------------------------------------------------
# model, modules, batches
# ----------------------------------------------------------------------------------------------
def model_identity(model_ref: str, revision: str | None) -> dict:
    """What the factors must match: for a local folder, a hash of its weights (the path is recorded as given,
    so a moved project keeps its factors); for a hub id, the id and revision."""
    path = Path(model_ref)
    identity = {"model": str(model_ref), "revision": revision, "weights_hash": None}
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        identity["weights_hash"] = tree_hash(weights[0]) if len(weights) == 1 else \
            tree_hash(path) if weights else None
    return identity


def select_modules(model, kind: str, layer_stride: int = 1) -> list[str]:
    """Names of the Linear modules to track.

    `lora`: the adapter's lora_A/lora_B layers. `mlp`: the if-query tools' rule, every Linear whose name
    matches `.*mlp.*(proj|dense|fc).*` (LoRA sublayers excluded). Either way a module whose name holds
    a layer index is kept when index % layer_stride == 0; one without an index is always kept.
    """
    import torch.nn as nn

    if layer_stride < 1:
        raise ValueError(f"layer_stride must be at least 1, got {layer_stride}")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        is_lora = ".lora_A." in name or ".lora_B." in name
        if kind == "lora":
            if not is_lora:
                continue
        elif kind == "mlp":
            if is_lora or not MLP_MODULE_PATTERN.match(name):
                continue
        else:
            raise ValueError(f"unknown module kind {kind!r}; choose lora or mlp")
        layer = LAYER_PATTERN.search(name)
        if layer and int(layer.group(1)) % layer_stride:
            continue
        names.append(name)
    if not names:
        raise ValueError(f"no {kind} modules found to track (layer stride {layer_stride}); "
                         + ("is the model a LoRA adapter?" if kind == "lora" else "check the model architecture"))
    return names


def make_task(tracked_modules: list[str], fisher: str = "empirical"):
    from kronfluence.task import Task

    class CompletionLossTask(Task):
        """Loss and measurement: the summed completion cross-entropy of each sequence."""

        def compute_train_loss(self, batch, model, sample=False):
            return completion_loss(model, batch, sample=sample and fisher == "sampled")

        def compute_measurement(self, batch, model):
            return completion_loss(model, batch)

        def get_influence_tracked_modules(self):
            return tracked_modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CompletionLossTask()


def _unpadded(row: dict, index: int, has_labels: bool, source: Path) -> dict:
    """A row without its padding: the attended tokens (one contiguous run, padding on either side), labels from
    input_ids where the set has none."""
    ids = row["input_ids"]
    mask = row.get("attention_mask") or [1] * len(ids)
    attended = [i for i, m in enumerate(mask) if m]
    if not attended:
        raise ValueError(f"{source}, row {index}: attention_mask is all zeros; drop the row")
    first, last = attended[0], attended[-1] + 1
    if len(attended) != last - first:
        raise ValueError(f"{source}, row {index}: attention_mask has gaps (packed sequences?); give one sequence "
                         f"per row, padded on the left or the right")
    labels = row["labels"][first:last] if has_labels else ids[first:last]
    return {"input_ids": ids[first:last], "labels": labels}


def load_token_dataset(path: str | Path, split: str = "train"):
    """A pre-tokenized `save_to_disk` folder (a Dataset, or a DatasetDict and one of its splits) as unpadded rows
    of input_ids and labels.

    if-query's sets are padded to a fixed length with an attention_mask; the model must not attend to the
    padding and the factors must not count it, so every row keeps only its attended tokens (left or right
    padding). Without a `labels` column (a pretraining set), every attended token is a label.
    """
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset {path} does not exist (expected a save_to_disk folder)")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{path} is a DatasetDict with splits {sorted(dataset)}; choose one with --split")
        dataset = dataset[split]
    columns = set(dataset.column_names)
    if "input_ids" not in columns:
        raise ValueError(f"dataset {path} has columns {sorted(columns)}; it needs input_ids (attention_mask and "
                         f"labels are optional)")
    has_labels = "labels" in columns
    if not has_labels:
        log.info("%s has no labels column: the loss is taken on every attended token (labels = input_ids)", path)
    keep = ["input_ids"] + [c for c in ("attention_mask", "labels") if c in columns]
    dataset = dataset.select_columns(keep + [c for c in ("row_id",) if c in columns])
    if has_labels and not _has_padding(dataset):  # the workflow's own tokens: nothing to strip
        return dataset.remove_columns([c for c in ("attention_mask",) if c in columns])
    # in memory: a cache file would be written into the input folder
    return dataset.map(lambda row, index: _unpadded(row, index, has_labels, path), with_indices=True,
                       remove_columns=[c for c in ("attention_mask",) if c in columns], keep_in_memory=True,
                       desc="unpadding")


def _has_padding(dataset) -> bool:
    import pyarrow.compute as pc

    if "attention_mask" not in dataset.column_names or len(dataset) == 0:
        return False
    return pc.min(pc.list_flatten(dataset.data.column("attention_mask"))).as_py() == 0


class TokenRows:
    """A map-style torch dataset over tokenized rows (input_ids, labels), for Kronfluence's loaders."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["input_ids", "labels"])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[int(index)]


def _dataloader_kwargs(tokenizer, pad_to: int | None = None):
    """Batches padded to the batch's longest row, or to `pad_to` for all batches (per-token scores are
    concatenated across training batches, so every batch must have the same width)."""
    from kronfluence.utils.dataset import DataLoaderKwargs

    pad_id = pad_token_id(tokenizer)
    return DataLoaderKwargs(collate_fn=lambda rows: collate(rows, pad_id, pad_to), num_workers=0)


def _analyzer(model, task, output_dir: Path):
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model

    model = prepare_model(model, task)
    return Analyzer(analysis_name=ANALYSIS_NAME, model=model, task=task, output_dir=str(output_dir),
                    cpu=not torch.cuda.is_available(), disable_tqdm=True, log_level=logging.WARNING)


# ----------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------
def factors_name(strategy: str, num_examples: int) -> str:
    return f"{strategy}_{num_examples}"


def fit_factors(
    model_ref: str,
    dataset_dir: str | Path,
    output_dir: str | Path,
    *,
    revision: str | None = None,
    strategy: str = "ekfac",
    modules: str = "mlp",
    layer_stride: int = 1,
    covariance_batch_size: int = 8,
    lambda_batch_size: int = 4,
    max_examples: int | None = None,
    dtype: str = "float32",
    fisher: str = "empirical",
    seed: int = 0,
    split: str = "train",
) -> dict:
    """Fit covariance, eigendecomposition and lambda factors (as the strategy needs) and write metadata.

    `dataset_dir` is a `save_to_disk` dataset with input_ids (and optionally attention_mask, labels), or a
    DatasetDict folder and its `split` (the seed's `--hessian-dataset`, or the workflow's `data/tokens/train`);
    padding is stripped as `load_token_dataset` says. Writes `output_dir` atomically and returns the metadata.
    """
    import torch
    from kronfluence.arguments import FactorArguments
    from kronfluence.factor.config import FactorConfig

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    dataset_dir = Path(dataset_dir)
    dataset = load_token_dataset(dataset_dir, split)
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    model = load_for_attribution(model_ref, revision, dtype)
    tracked = select_modules(model, modules, layer_stride)
    tokenizer = load_tokenizer(model_ref, revision)
    task = make_task(tracked, fisher)
    name = factors_name(strategy, len(dataset))
    output_dir = Path(output_dir)
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
    with atomic_path(output_dir, directory=True) as tmp:
        analyzer = _analyzer(model, task, tmp)
        loader = _dataloader_kwargs(tokenizer)
        torch.manual_seed(seed)  # the true Fisher samples labels; seeded, the same inputs give the same factors
        config, tokens = FactorConfig.CONFIGS[strategy], token_count(dataset)
        for stage, batch_size in (("fit_covariance_matrices", covariance_batch_size),
                                  ("fit_lambda_matrices", lambda_batch_size)):
            if stage == "fit_lambda_matrices":
                analyzer.perform_eigendecomposition(factors_name=name, factor_args=factor_args,
                                                    overwrite_output_dir=True)
            getattr(analyzer, stage)(factors_name=name, dataset=TokenRows(dataset), per_device_batch_size=batch_size,
                                     dataloader_kwargs=loader, factor_args=factor_args, overwrite_output_dir=True)
            if (config.requires_covariance_matrices if stage == "fit_covariance_matrices"
                    else config.requires_lambda_matrices):
                log_gradient_pass(dataset_dir, len(dataset), tokens, f"kronfluence {stage}")
        metadata = {
            **model_identity(model_ref, revision),
            "factors_name": name,
            "strategy": strategy,
            "dataset_path": str(dataset_dir),
            "split": split,
            "data_hash": tree_hash(dataset_dir),
            "num_examples": len(dataset),
            "modules": modules,
            "tracked_modules": tracked,
            "layer_stride": layer_stride,
            "dtype": dtype,
            "fisher": fisher,
            "seed": seed,
        }
        write_json_atomic(metadata, tmp / "metadata.json")
    return metadata


def read_factors_metadata(factors_dir: str | Path) -> dict:
    factors_dir = Path(factors_dir)
    meta_path = factors_dir / "metadata.json"
    if not factors_dir.is_dir():
        raise FactorsError(f"factors folder {factors_dir} does not exist; run fit-hessians first")
    if not meta_path.is_file():
        raise FactorsError(f"{factors_dir} has no metadata.json: it is not a complete factors folder "
                           f"(was fitting interrupted?); fit the factors again")
    metadata = json.loads(meta_path.read_text())
    inner = factors_dir / ANALYSIS_NAME / f"factors_{metadata['factors_name']}"
    if not (inner / "factor_arguments.json").is_file():
        raise FactorsError(f"{inner} is missing or incomplete; fit the factors again")
    return metadata


def check_factors_match(metadata: dict, model_ref: str, revision: str | None, tracked: list[str]) -> None:
    """Refuse factors fitted on another model, other weights or other modules, saying what differs."""
    current = model_identity(model_ref, revision)
    # a local folder is known by its weights, wherever it now lies; a hub model by its id and revision
    keys = ("weights_hash",) if current["weights_hash"] else ("model", "revision")
    differences = [f"{key}: factors have {metadata.get(key)!r}, the model has {current[key]!r}"
                   for key in keys if metadata.get(key) != current[key]]
    if metadata["tracked_modules"] != tracked:
        missing = sorted(set(metadata["tracked_modules"]) - set(tracked))[:5]
        extra = sorted(set(tracked) - set(metadata["tracked_modules"]))[:5]
        differences.append(f"tracked modules differ (in factors only: {missing}; in model only: {extra})")
    if differences:
        raise FactorsError("these factors were fitted on a different model:\n  " + "\n  ".join(differences)
                           + "\nFit factors for this model (fit-hessians / the fit_factors rule).")


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
PER_TOKEN_MAX_GB = 4.0


def per_token_gb(queries: int, rows: int, tokens: int) -> float:
    """Size of a dense [queries, rows, tokens] fp32 array of per-token scores, in GB."""
    return queries * rows * tokens * 4 / 1e9


def check_per_token_size(queries: int, rows: int, tokens: int, max_gb: float) -> None:
    size = per_token_gb(queries, rows, tokens)
    if size > max_gb:
        raise ValueError(
            f"per-token scores of {queries} queries x {rows} training rows x {tokens} tokens would take {size:.1f} GB "
            f"(limit {max_gb:g} GB, attribution.kronfluence.per_token_max_gb); turn them off "
            f"(attribution.kronfluence.per_token_scores: false, or drop --per-token-scores), score fewer queries, "
            f"or use more shards (attribution.shards)")


def score_pairs(
    model_ref: str,
    factors_dir: str | Path,
    query_dataset,
    train_dataset,
    *,
    revision: str | None = None,
    train_batch_size: int = 8,
    query_batch_size: int | None = 8,
    query_gradient_rank: int | None = None,
    query_batches_per_pass: int | None = None,
    per_token: bool = False,
    per_token_max_gb: float = PER_TOKEN_MAX_GB,
    dtype: str = "float32",
    damping_factor: float | None = 1e-8,
    model=None,
) -> dict:
    """Scores of every query against every training row: {"scores": [Q, T], "per_token": [Q, T, S] or None}.

    Queries go in batches of `query_batch_size` (None = all in one): each batch holds its logits and the gradients
    of its backward pass. The preconditioned gradients of `query_batches_per_pass` batches (None = all) are kept
    together, and the training rows stream past them once (Kronfluence's `query_gradient_accumulation_steps`):
    `query_passes` passes over the training rows, one whatever the number of queries by default.
    `query_gradient_rank` stores the query gradients at that rank (Kronfluence's low-rank option, for large
    models). `model`: the model already loaded from `model_ref`
    (one load per call of run-query; Kronfluence wraps its modules in place). Per-token scores are a dense [Q, T, S] array:
    refused before any model is loaded when it would exceed `per_token_max_gb`. Scores are computed in a
    private temporary folder, so concurrent calls on one factors folder never overwrite each other.
    """
    from kronfluence.arguments import ScoreArguments

    width = max((len(x) for x in train_dataset["input_ids"]), default=0)
    if per_token:
        check_per_token_size(len(query_dataset), len(train_dataset), width, per_token_max_gb)
    metadata = read_factors_metadata(factors_dir)
    model = model if model is not None else load_for_attribution(model_ref, revision, dtype)
    tracked = select_modules(model, metadata["modules"], metadata["layer_stride"])
    check_factors_match(metadata, model_ref, revision, tracked)
    tokenizer = load_tokenizer(model_ref, revision)
    task = make_task(tracked, metadata.get("fisher", "empirical"))
    name = metadata["factors_name"]
    query_batch, batches_per_pass, _ = query_batching(len(query_dataset), query_batch_size, query_batches_per_pass)
    score_args = ScoreArguments(compute_per_token_scores=per_token, damping_factor=damping_factor,
                                query_gradient_low_rank=query_gradient_rank,
                                query_gradient_accumulation_steps=batches_per_pass)
    with tempfile.TemporaryDirectory(prefix="scores-", dir=os.environ.get("TMPDIR")) as scratch:
        analysis_dir = Path(scratch) / ANALYSIS_NAME
        analysis_dir.mkdir()
        (analysis_dir / f"factors_{name}").symlink_to(Path(factors_dir).resolve() / ANALYSIS_NAME / f"factors_{name}")
        analyzer = _analyzer(model, task, Path(scratch))
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name=name,
            query_dataset=TokenRows(query_dataset),
            train_dataset=TokenRows(train_dataset),
            per_device_query_batch_size=query_batch,
            per_device_train_batch_size=train_batch_size,
            dataloader_kwargs=_dataloader_kwargs(tokenizer, pad_to=width if per_token else None),
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].float().cpu().numpy()
    result = {"scores": scores if scores.ndim == 2 else scores.sum(-1), "per_token": None}
    if per_token:
        result["per_token"] = scores
    return result


# ----------------------------------------------------------------------------------------------
# workflow stages
# ----------------------------------------------------------------------------------------------
def query_batching(queries: int, query_batch_size: int | None,
                   query_batches_per_pass: int | None) -> tuple[int, int, int]:
    """How `score_pairs` goes through `queries` queries: (queries per batch, query batches kept per pass over the
    training rows, passes). Kronfluence streams the rows once per group of `query_batches_per_pass` batches (all of
    them in one group by default)."""
    if not queries:
        return 0, 0, 0
    batch = min(query_batch_size or queries, queries)
    batches = math.ceil(queries / batch)
    per_pass = min(query_batches_per_pass or batches, batches)
    return batch, per_pass, math.ceil(batches / per_pass)


def query_passes(queries: int, query_batch_size: int | None, query_batches_per_pass: int | None) -> int:
    """Passes over the training rows `score_pairs` makes (`query_batching`)."""
    return query_batching(queries, query_batch_size, query_batches_per_pass)[2]


def _log_score_passes(tokens_dir, rows, queries: int, settings, purpose: str) -> None:
    """One logged pass over `rows` per training pass of the scoring (`query_passes`)."""
    tokens = token_count(rows)
    for _ in range(query_passes(queries, settings.query_batch_size, settings.query_batches_per_pass)):
        log_gradient_pass(tokens_dir, len(rows), tokens, purpose)


def fit_factors_stage(model_ref, dataset_dir, output_dir, *, strategy: str, settings: FactorFit) -> dict:
    """Rule `fit_factors`: `fit_factors` with the run's settings."""
    return fit_factors(model_ref, dataset_dir, output_dir, strategy=strategy, **dataclasses.asdict(settings))


def score_shard_stage(model_dir, factors_dir, query_tokens_dir, train_tokens_dir, out_path, *, shard: int,
                      shards: int, settings: KronfluenceScoring) -> None:
    """Rule `kronfluence_scores`: every query against one contiguous slice of the training rows."""
    import datasets

    from playpen_attribution.tables import save_shard, shard_indices

    query = datasets.load_from_disk(str(query_tokens_dir))
    train = datasets.load_from_disk(str(train_tokens_dir))
    train = train.select(shard_indices(len(train), shards, shard))
    result = score_pairs(str(model_dir), factors_dir, query, train, **settings.score_pairs_kwargs())
    _log_score_passes(train_tokens_dir, train, len(query), settings, f"kronfluence scores, shard {shard}")
    save_shard(out_path, result["scores"], query["row_id"], train["row_id"], result["per_token"])


@contextmanager
def relative_damping(scale: float):
    """Damp with `scale` x each module's mean eigenvalue, as Bergson's damping factor does. Kronfluence takes an
    absolute damping, or (given None) a fixed 0.1 x the mean eigenvalue from a module constant; the damping sweep
    needs other multiples, so the constant is set for the duration of the block (restored after)."""
    import kronfluence.factor.config as factor_config

    previous = factor_config.HEURISTIC_DAMPING_SCALE
    factor_config.HEURISTIC_DAMPING_SCALE = scale
    try:
        yield
    finally:
        factor_config.HEURISTIC_DAMPING_SCALE = previous


def damping_sweep_stage(model_dir, factors_dir, query_tokens_dir, train_tokens_dir, copies_dir, out_path, *,
                        damping: list[float], settings: KronfluenceSweep) -> None:
    """Rule `damping_sweep_kronfluence`: every query against every training row and planted copy, once per
    relative damping factor (one pass over the rows per factor and query batch). The model is loaded per factor:
    Kronfluence wraps its modules in place, and a wrapped model no longer matches the factors' module names."""
    import datasets
    import numpy as np

    from playpen_attribution.tables import save_sweep

    query = datasets.load_from_disk(str(query_tokens_dir))
    columns = ["row_id", "input_ids", "labels"]
    parts = [datasets.load_from_disk(str(folder)) for folder in (train_tokens_dir, copies_dir) if folder]
    rows = datasets.concatenate_datasets([part.select_columns(columns) for part in parts])
    scores = []
    for scale in damping:
        with relative_damping(scale):
            result = score_pairs(str(model_dir), factors_dir, query, rows, **dataclasses.asdict(settings),
                                 damping_factor=None)
        scores.append(result["scores"])
        _log_score_passes(train_tokens_dir, rows, len(query), settings, f"kronfluence damping {scale:g}")
    save_sweep(out_path, np.stack(scores), damping, list(query["row_id"]), list(rows["row_id"]))
