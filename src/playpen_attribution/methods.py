"""The attribution methods, parsed once from their names: the schema check, the rules, the audits and the report
all ask a `Method` what a name means instead of matching the name themselves.

Names: Kronfluence strategies (identity, diagonal, kfac, ekfac) and Bergson variants
bergson_{dot,cosine}[_{train,query,mixed}], where the suffix names the side the preconditioner is fitted on, and
bergson_trackstar: TrackStar (Chang et al. 2024) through Bergson, the mixed-preconditioned cosine of gradients first
normalised by the adapter's Adam second moments (its own gradient space: `Method.gradient_space` "adam"), and
bergson_trak: TRAK (Park et al. 2023) through Bergson's own pipeline. Every method's scores are averaged over the
adapters of `attribution.ensemble` (TRAK inside its own job, the others as the mean of the members' score shards).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KRONFLUENCE_STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
BERGSON_PREFIX = "bergson_"
# Snakemake wildcard constraints: a Kronfluence strategy; a Bergson variant (the method name without the prefix)
STRATEGY_PATTERN = "|".join(KRONFLUENCE_STRATEGIES)
VARIANT_PATTERN = r"(dot|cosine)(_(train|query|mixed))?|trackstar"
# TrackStar: unit-normalised, mixed preconditioner, on Adam-normalised gradients
TRACKSTAR = "trackstar"
# TRAK: Bergson's TRAK pipeline (its own rule: Gram, query, scores and the 1 - p weights in one job per ensemble)
TRAK = "trak"
METHOD_NAMES = (*KRONFLUENCE_STRATEGIES,
                *(f"{BERGSON_PREFIX}{kind}{side}" for side in ("", "_train", "_query", "_mixed")
                  for kind in ("dot", "cosine")),
                BERGSON_PREFIX + TRACKSTAR, BERGSON_PREFIX + TRAK)


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "kronfluence" or "bergson"
    # the Kronfluence strategy, or the Bergson variant: the name its rules' wildcards and folders use
    kind: str
    unit_normalize: bool
    # kronfluence: the curvature approximation (None for identity); bergson: train, query or mixed (None = plain)
    preconditioner: str | None

    @property
    def is_bergson(self) -> bool:
        return self.family == "bergson"

    @property
    def is_trak(self) -> bool:
        return self.family == "bergson" and self.kind == TRAK

    @property
    def gradient_space(self) -> str:
        """Which gradients a Bergson method scores: "raw" (the LoRA gradients) or "adam" (divided by the square root
        of the adapter's Adam second moments, TrackStar's optimizer normalisation)."""
        return gradient_space(self.kind) if self.is_bergson and not self.is_trak else "raw"

    @property
    def plain(self) -> str | None:
        """The same method without a preconditioner (a Kronfluence strategy's is identity); None for a plain one."""
        if self.preconditioner is None:
            return None
        if self.is_bergson:  # TrackStar's: the plain cosine of raw gradients; TRAK's: the plain dot product
            return BERGSON_PREFIX + ("cosine" if self.unit_normalize else "dot")
        return "identity"

    def folder(self, area: str = "") -> str:
        """Where this method's files live under results/<run>/<area>: `kronfluence/<strategy>` or
        `bergson/<variant>` (`area` e.g. "validation/planted")."""
        return "/".join(p for p in (area, self.family, self.kind) if p)


def parse_variant(variant: str) -> tuple[bool, str | None]:
    """(unit_normalize, preconditioner side or None) of a Bergson variant name such as `cosine_mixed`."""
    match = re.fullmatch(VARIANT_PATTERN, variant)
    if not match:
        raise ValueError(f"unknown Bergson variant {variant!r}: expected dot or cosine, optionally followed by "
                         f"_train, _query or _mixed (e.g. cosine_mixed), or trackstar")
    if variant == TRACKSTAR:
        return True, "mixed"
    return match.group(1) == "cosine", match.group(3)


def gradient_space(variant: str) -> str:
    """"adam" for TrackStar (gradients normalised by the optimizer's second moments), "raw" for every other
    Bergson variant."""
    return "adam" if variant == TRACKSTAR else "raw"


def parse_method(name: str) -> Method:
    if name.startswith(BERGSON_PREFIX):
        variant = name.removeprefix(BERGSON_PREFIX)
        if variant == TRAK:  # whitened by the Gram of the training rows' gradients: a "train" preconditioner
            return Method(name, "bergson", TRAK, False, "train")
        unit_normalize, side = parse_variant(variant)
        return Method(name, "bergson", variant, unit_normalize, side)
    if name in KRONFLUENCE_STRATEGIES:
        return Method(name, "kronfluence", name, False, None if name == "identity" else name)
    raise ValueError(f"unknown method {name!r}; methods are {list(METHOD_NAMES)}")


def is_bergson(method: str) -> bool:
    return method.startswith(BERGSON_PREFIX)


def has_preconditioner(method: str) -> bool:
    """identity and the plain Bergson variants use raw gradients; every other method inverts a curvature."""
    return parse_method(method).preconditioner is not None


def damping_sweep_methods(run: dict) -> list[str]:
    """The methods a run's damping sweep rescores: those named in validation.damping.methods, else every method
    of the run with a preconditioner the sweep can rescore (not TRAK: its Gram is inverted inside its one job);
    none where no damping factors are given."""
    sweep = run["validation"]["damping"]
    if not sweep["factors"]:
        return []
    named = sweep["methods"]
    return list(named) if named is not None else [m for m in run["attribution"]["methods"]
                                                   if has_preconditioner(m) and not parse_method(m).is_trak]
