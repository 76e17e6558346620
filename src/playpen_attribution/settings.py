"""Typed settings of each stage, built from a run's validated config in one place.

Each class names the config section it comes from and holds exactly the keys its stage reads. A rule passes
`as_params(...)` of it (a plain dict: Snakemake reruns a job when a param changes), and its script turns the
dict back into the class (`from_params`), so a stage cannot read a key its rule did not pass, and changing a
key reruns only the stages whose class holds it (tests/test_workflow.py checks that against the DAG).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from playpen_attribution.methods import parse_variant

Settings = TypeVar("Settings")


def _section(run: dict[str, Any], path: str) -> dict[str, Any]:
    for key in path.split("."):
        run = run[key]
    return run


class _FromConfig:
    SECTION: ClassVar[str]

    @classmethod
    def from_run(cls, run: dict[str, Any], **overrides):
        """The settings from a run's (validated) config section; `overrides` replace config values."""
        section = _section(run, cls.SECTION)
        values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name not in overrides}
        return from_params(cls, {**values, **overrides})


def as_params(settings) -> dict[str, Any]:
    """A rule's params: the fields as plain values (tuples as lists), in field order."""
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(settings).items()}


def from_params(cls: type[Settings], params: dict[str, Any]) -> Settings:
    """The settings back from a rule's params; a missing or unknown key is an error naming both lists."""
    names = [f.name for f in dataclasses.fields(cls)]
    if set(params) != set(names):
        raise TypeError(f"{cls.__name__} takes exactly {names}; got {sorted(params)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


@dataclass(frozen=True)
class Tokenization(_FromConfig):
    """Rule `tokenize`: how an episode becomes tokens and labels."""
    SECTION: ClassVar[str] = "tokenization"
    max_length: int
    render: str
    loss_on: str


@dataclass(frozen=True)
class Lora(_FromConfig):
    """The adapter's shape (`train_adapter`, `lds_retrain`)."""
    SECTION: ClassVar[str] = "lora"
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class Training(_FromConfig):
    """The optimisation (`train_adapter`, `lds_retrain`). `training.evaluate` is not here: it decides whether
    `train_adapter` is given the eval split (an input), and the retrains never evaluate."""
    SECTION: ClassVar[str] = "training"
    epochs: int
    learning_rate: float
    batch_size: int
    gradient_accumulation: int
    warmup_ratio: float
    weight_decay: float
    lr_scheduler: str
    seed: int
    logging_steps: int


@dataclass(frozen=True)
class FactorFit(_FromConfig):
    """Rule `fit_factors`: which modules Kronfluence tracks and how its factors are fitted."""
    SECTION: ClassVar[str] = "attribution.kronfluence"
    modules: str
    layer_stride: int
    max_examples: int | None
    covariance_batch_size: int
    lambda_batch_size: int
    fisher: str
    dtype: str
    seed: int


@dataclass(frozen=True)
class KronfluenceScoring(_FromConfig):
    """Rules `kronfluence_scores` and `planted_kronfluence_scores`: pairwise scores from fitted factors."""
    SECTION: ClassVar[str] = "attribution.kronfluence"
    train_batch_size: int
    query_batch_size: int | None
    query_gradient_rank: int | None
    query_batches_per_pass: int | None
    per_token_scores: bool
    per_token_max_gb: float
    dtype: str
    damping_factor: float | None

    def score_pairs_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `influence.score_pairs`."""
        kwargs = dataclasses.asdict(self)
        kwargs["per_token"] = kwargs.pop("per_token_scores")
        return kwargs


@dataclass(frozen=True)
class KronfluenceSweep(_FromConfig):
    """Rule `damping_sweep_kronfluence`: the sweep sets its own damping and never keeps per-token scores."""
    SECTION: ClassVar[str] = "attribution.kronfluence"
    train_batch_size: int
    query_batch_size: int | None
    query_gradient_rank: int | None
    query_batches_per_pass: int | None
    dtype: str


@dataclass(frozen=True)
class BergsonGradients(_FromConfig):
    """What every Bergson gradient collection reads (`bergson_query_gradients`, `bergson_index`)."""
    SECTION: ClassVar[str] = "attribution.bergson"
    precision: str
    projection_dim: int
    seed: int
    token_batch_size: int


class _VariantDamping:
    """For the settings of a Bergson variant's stage: the run's damping only where the variant has a preconditioner
    (None otherwise, so a damping change never reruns a plain variant)."""

    @classmethod
    def for_variant(cls, run: dict[str, Any], variant: str):
        return cls.from_run(run, **({"damping_factor": None} if parse_variant(variant)[1] is None else {}))


@dataclass(frozen=True)
class BergsonHessian(BergsonGradients):
    """Rule `bergson_hessian`: gradients, and which labels the Fisher uses."""
    fisher: str


@dataclass(frozen=True)
class BergsonReduce(_VariantDamping, BergsonGradients):
    """Rule `bergson_reduce`: gradients, how the queries are combined, and the preconditioner's damping."""
    aggregation: str
    damping_factor: float | None


@dataclass(frozen=True)
class BergsonMix(_FromConfig):
    """Rule `bergson_mix`: how much of the training preconditioner the mixed one keeps."""
    SECTION: ClassVar[str] = "attribution.bergson"
    mix_downweight_components: int


@dataclass(frozen=True)
class BergsonScoring(_VariantDamping, _FromConfig):
    """Rules `bergson_scores`, `planted_bergson_scores`: an index against the queries, no model; only the damping."""
    SECTION: ClassVar[str] = "attribution.bergson"
    damping_factor: float | None


@dataclass(frozen=True)
class BergsonTrak(_FromConfig):
    """Rule `bergson_trak`: Bergson's TRAK pipeline (one random projection of the whole gradient, its own
    dimension; the Gram's damping), over the run's ensemble of adapters (the rule's inputs)."""
    SECTION: ClassVar[str] = "attribution.bergson"
    precision: str
    trak_projection_dim: int
    trak_loss_batch_size: int
    token_batch_size: int
    damping_factor: float
    seed: int


@dataclass(frozen=True)
class PlantedCopies(_FromConfig):
    """Rule `planted_copies`: how many queries get a copy among the training rows, chosen with which seed."""
    SECTION: ClassVar[str] = "validation.planted"
    queries: int
    seed: int


@dataclass(frozen=True)
class LdsSubsets(_FromConfig):
    """Rule `lds_retrain`: the share of training rows each random subset keeps, and the subsets' seed."""
    SECTION: ClassVar[str] = "validation.lds"
    fraction: float
    seed: int


@dataclass(frozen=True)
class RemovalChoice(_FromConfig):
    """Rule `removal_rows`: the shares of training rows each selection removes, and the random draws' seed (given
    to the random selections only: a new seed never re-chooses a method's rows)."""
    SECTION: ClassVar[str] = "validation.removal"
    fractions: tuple[float, ...]
    seed: int | None


# Every class a rule's params come from (the config test checks each field is a key of its section).
STAGE_SETTINGS = (Tokenization, Lora, Training, FactorFit, KronfluenceScoring, KronfluenceSweep, BergsonGradients,
                  BergsonHessian, BergsonReduce, BergsonMix, BergsonScoring, BergsonTrak, PlantedCopies, LdsSubsets,
                  RemovalChoice)
