"""Kronfluence influence functions on the one tokenization: fit factors once, score pairs in shards.

Score of a (query q, training row t) pair = g_q^T (H + damping)^-1 g_t, where g is the gradient of the
summed completion cross-entropy with respect to the tracked modules and H the strategy's curvature
approximation (identity, diagonal, K-FAC, EK-FAC). Positive = helpful: a gradient step on t lowers q's loss.

Factors live in `<factors_dir>/influence/factors_<strategy>_<n>/` beside `<factors_dir>/metadata.json`
(the first seed's layout). The metadata says which model, adapter weights, modules and data they were
fitted on; scoring with factors from another model is refused with the differences named.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from playpen_attribution.io import atomic_path, write_json_atomic
from playpen_attribution.provenance import tree_hash

log = logging.getLogger(__name__)

STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
ANALYSIS_NAME = "influence"
MLP_MODULE_PATTERN = re.compile(r".*mlp.*(proj|dense|fc).*")  # the first seed's rule
LAYER_PATTERN = re.compile(r"\.layers\.(\d+)\.")
IGNORE_INDEX = -100


class FactorsError(ValueError):
    """Factors that are missing, incomplete or fitted on another model."""


# ----------------------------------------------------------------------------------------------
# model, modules, batches
# ----------------------------------------------------------------------------------------------
def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose float32, float16 or bfloat16") from None


def load_for_attribution(model_ref: str, revision: str | None, dtype: str):
    """Load a hub id or local folder (base model or LoRA adapter) in eval mode on the best device."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype), "attn_implementation": "eager"}
    if revision:
        kwargs["revision"] = revision
    if Path(model_ref).is_dir() and (Path(model_ref) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(model_ref), **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_ref), **kwargs)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    return model


def model_identity(model_ref: str, revision: str | None) -> dict:
    """What the factors must match: the model reference and, for local folders, a hash of the weights."""
    path = Path(model_ref)
    identity = {"model": str(path.resolve()) if path.exists() else model_ref, "revision": revision,
                "weights_hash": None}
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        identity["weights_hash"] = tree_hash(weights[0]) if len(weights) == 1 else \
            tree_hash(path) if weights else None
    return identity


def select_modules(model, kind: str, layer_stride: int = 1) -> list[str]:
    """Names of the Linear modules to track.

    `lora`: the adapter's lora_A/lora_B layers. `mlp`: the first seed's rule, every Linear whose name
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


def collate(rows: list[dict], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad a list of tokenized rows into tensors (attention 0 and labels -100 on padding)."""
    import torch

    width = max(max(len(r["input_ids"]) for r in rows), pad_to or 0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_loss(model, batch: dict, reduction: str = "sum", sample: bool = False):
    """Summed cross-entropy on the completion tokens (labels != -100), next-token shifted.

    With `sample=True`, labels are drawn from the model's own distribution (true Fisher).
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(device)
    if sample:
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1).view(labels.shape)
        labels = torch.where(labels == IGNORE_INDEX, labels, sampled)
    if reduction == "per_example":
        token_losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return token_losses.sum(dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


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

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataLoaderKwargs(collate_fn=lambda rows: collate(rows, pad_id, pad_to), num_workers=0)


def _load_tokenizer(model_ref: str, revision: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_ref), **({"revision": revision} if revision else {}))


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
) -> dict:
    """Fit covariance, eigendecomposition and lambda factors (as the strategy needs) and write metadata.

    `dataset_dir` is a `save_to_disk` dataset with input_ids and labels (the seed's `--hessian-dataset`,
    or the workflow's `data/tokens/train`). Writes `output_dir` atomically and returns the metadata.
    """
    import datasets
    import torch
    from kronfluence.arguments import FactorArguments

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"hessian dataset {dataset_dir} does not exist (expected a save_to_disk folder)")
    dataset = datasets.load_from_disk(str(dataset_dir))
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"hessian dataset {dataset_dir} lacks column(s) {sorted(missing)}; "
                         f"it needs input_ids and labels (attention_mask optional)")
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    model = load_for_attribution(model_ref, revision, dtype)
    tracked = select_modules(model, modules, layer_stride)
    tokenizer = _load_tokenizer(model_ref, revision)
    task = make_task(tracked, fisher)
    name = factors_name(strategy, len(dataset))
    output_dir = Path(output_dir)
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
    with atomic_path(output_dir, directory=True) as tmp:
        analyzer = _analyzer(model, task, tmp)
        loader = _dataloader_kwargs(tokenizer)
        torch.manual_seed(seed)  # the true Fisher samples labels; seeded, the same inputs give the same factors
        for stage, batch_size in (("fit_covariance_matrices", covariance_batch_size),
                                  ("fit_lambda_matrices", lambda_batch_size)):
            if stage == "fit_lambda_matrices":
                analyzer.perform_eigendecomposition(factors_name=name, factor_args=factor_args,
                                                    overwrite_output_dir=True)
            getattr(analyzer, stage)(factors_name=name, dataset=TokenRows(dataset), per_device_batch_size=batch_size,
                                     dataloader_kwargs=loader, factor_args=factor_args, overwrite_output_dir=True)
        metadata = {
            **model_identity(model_ref, revision),
            "factors_name": name,
            "strategy": strategy,
            "dataset_path": str(dataset_dir.resolve()),
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
    differences = [f"{key}: factors have {metadata.get(key)!r}, the model has {current[key]!r}"
                   for key in ("model", "revision", "weights_hash") if metadata.get(key) != current[key]]
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
def score_pairs(
    model_ref: str,
    factors_dir: str | Path,
    query_dataset,
    train_dataset,
    *,
    revision: str | None = None,
    train_batch_size: int = 8,
    per_token: bool = False,
    dtype: str = "float32",
    damping_factor: float | None = 1e-8,
) -> dict:
    """Scores of every query against every training row: {"scores": [Q, T], "per_token": [Q, T, S] or None}.

    All queries go in one query batch: Kronfluence recomputes training gradients per query batch.
    Scores are computed in a private temporary folder, so concurrent calls on one factors folder
    never overwrite each other.
    """
    from kronfluence.arguments import ScoreArguments

    metadata = read_factors_metadata(factors_dir)
    model = load_for_attribution(model_ref, revision, dtype)
    tracked = select_modules(model, metadata["modules"], metadata["layer_stride"])
    check_factors_match(metadata, model_ref, revision, tracked)
    tokenizer = _load_tokenizer(model_ref, revision)
    task = make_task(tracked, metadata.get("fisher", "empirical"))
    name = metadata["factors_name"]
    score_args = ScoreArguments(compute_per_token_scores=per_token, damping_factor=damping_factor)
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
            per_device_query_batch_size=len(query_dataset),
            per_device_train_batch_size=train_batch_size,
            dataloader_kwargs=_dataloader_kwargs(
                tokenizer, pad_to=max(len(x) for x in train_dataset["input_ids"]) if per_token else None),
            score_args=score_args,
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].float().cpu().numpy()
    result = {"scores": scores if scores.ndim == 2 else scores.sum(-1), "per_token": None}
    if per_token:
        result["per_token"] = scores
    return result


def per_token_lists(per_token: np.ndarray, train_lengths: list[int]) -> list[list[list[float]]]:
    """Per-token scores of each pair restricted to the training row's real tokens (padding is on the right).

    Kronfluence's per-token tensor is indexed by position in the padded batch; its entries on padding are 0,
    so the lists still sum to the pair's total score.
    """
    return [[per_token[q, t, :n].tolist() for t, n in enumerate(train_lengths)] for q in range(per_token.shape[0])]


def query_losses(model_ref: str, query_dataset, revision: str | None = None, dtype: str = "float32") -> list[float]:
    """Summed completion cross-entropy of each query (the seed's `loss` column)."""
    import torch

    model = load_for_attribution(model_ref, revision, dtype)
    tokenizer = _load_tokenizer(model_ref, revision)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    with torch.no_grad():
        for start in range(0, len(query_dataset), 8):
            rows = [query_dataset[i] for i in range(start, min(start + 8, len(query_dataset)))]
            losses += completion_loss(model, collate(rows, pad_id), reduction="per_example").float().cpu().tolist()
    return losses


def remove_tree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# workflow stages
# ----------------------------------------------------------------------------------------------
def score_shard_stage(model_dir, factors_dir, query_tokens_dir, train_tokens_dir, out_path, *, shard: int,
                      shards: int, train_batch_size: int, per_token: bool, dtype: str,
                      damping_factor: float | None) -> None:
    """Rule `kronfluence_scores`: every query against one contiguous slice of the training rows."""
    import datasets

    from playpen_attribution.tables import save_shard, shard_indices

    query = datasets.load_from_disk(str(query_tokens_dir))
    train = datasets.load_from_disk(str(train_tokens_dir))
    train = train.select(shard_indices(len(train), shards, shard))
    result = score_pairs(str(model_dir), factors_dir, query, train, train_batch_size=train_batch_size,
                         per_token=per_token, dtype=dtype, damping_factor=damping_factor)
    save_shard(out_path, result["scores"], query["row_id"], train["row_id"], result["per_token"])


def merge_stage(query_rows, train_rows, query_tokens_dir, train_tokens_dir, model_dir, shards_by_method: dict,
                out_query, out_train, out_influences, dtype: str = "float32") -> None:
    """Rule `merge_influences`: the seed's three CSVs, every method in one `influences.csv`."""
    import datasets
    import pandas as pd

    from playpen_attribution.data import read_rows
    from playpen_attribution.tables import influences_frame, load_shards, rows_frame, write_csvs

    query_tokens = datasets.load_from_disk(str(query_tokens_dir))
    train_tokens = datasets.load_from_disk(str(train_tokens_dir))
    by_id = {r["row_id"]: r for r in read_rows(query_rows)}
    query = rows_frame([by_id[i] for i in query_tokens["row_id"]], "query_id")
    query.insert(3, "loss", query_losses(str(model_dir), query_tokens, dtype=dtype))
    by_id = {r["row_id"]: r for r in read_rows(train_rows)}
    train = rows_frame([by_id[i] for i in train_tokens["row_id"]], "train_id")
    lengths = dict(zip(train_tokens["row_id"], (len(x) for x in train_tokens["input_ids"])))
    frames = []
    for method, paths in shards_by_method.items():
        merged = load_shards(paths)
        if merged["train_ids"] != list(train_tokens["row_id"]) or merged["query_ids"] != list(query_tokens["row_id"]):
            raise ValueError(f"{method} shards do not cover the tokenized rows in order; rerun their scoring")
        per_token = None
        if merged["per_token"] is not None:
            per_token = per_token_lists(merged["per_token"], [lengths[t] for t in merged["train_ids"]])
        frames.append(influences_frame(merged["query_ids"], merged["train_ids"], merged["scores"], method, per_token))
    influences = pd.concat(frames, ignore_index=True)
    unscored = influences.influence_score.isna()  # Bergson gives no gradient to a row under two tokens
    if unscored.any():
        log.warning("%d (query, train) pairs have no score and are left out: training rows %s", unscored.sum(),
                    sorted(set(influences.train_id[unscored]))[:10])
    write_csvs(query, train, influences[~unscored], out_query, out_train, out_influences)
