"""What a method's name says: its family and whether it has a preconditioner (and so a damping to choose).

Names: Kronfluence strategies (identity, diagonal, kfac, ekfac) and Bergson variants
bergson_{dot,cosine}[_{train,query,mixed}], where the suffix names the preconditioner's side."""

from __future__ import annotations

import re

KRONFLUENCE_STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
BERGSON_METHOD = re.compile(r"bergson_(dot|cosine)(?:_(train|query|mixed))?")


def is_bergson(method: str) -> bool:
    return BERGSON_METHOD.fullmatch(method) is not None


def has_preconditioner(method: str) -> bool:
    """identity and the plain Bergson variants use raw gradients; every other method inverts a curvature."""
    found = BERGSON_METHOD.fullmatch(method)
    if found:
        return found.group(2) is not None
    return method in KRONFLUENCE_STRATEGIES and method != "identity"


def damping_sweep_methods(run: dict) -> list[str]:
    """The methods a run's damping sweep rescores: those named in validation.damping.methods, else every method
    of the run with a preconditioner; none where no damping factors are given."""
    sweep = run["validation"]["damping"]
    if not sweep["factors"]:
        return []
    named = sweep["methods"]
    return list(named) if named is not None else [m for m in run["attribution"]["methods"] if has_preconditioner(m)]
