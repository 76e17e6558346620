"""Before/after check of a restructuring: do two runs' result folders hold the same tables?

    uv run python bench/compare_runs.py BEFORE/results/demo AFTER/results/demo

Every CSV under the first folder is read from both: columns, row order and every non-float value must be equal;
float columns are compared value by value (NaN equal to NaN) and reported by their largest absolute difference.
Exits 1 when a table is missing, its shape or text differs, or a float differs by more than --atol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def compare(before: Path, after: Path, atol: float) -> list[str]:
    problems = []
    for path in sorted(before.rglob("*.csv")):
        name = path.relative_to(before)
        other = after / name
        if not other.is_file():
            problems.append(f"{name}: missing after")
            continue
        a, b = pd.read_csv(path), pd.read_csv(other)
        if list(a.columns) != list(b.columns) or a.shape != b.shape:
            problems.append(f"{name}: columns or shape differ ({a.shape} vs {b.shape})")
            continue
        worst = {}
        for column in a.columns:
            x, y = a[column], b[column]
            if x.dtype.kind == "f" and y.dtype.kind == "f":
                both_nan = x.isna() & y.isna()
                if not (x.isna() == y.isna()).all():
                    problems.append(f"{name}: {column}: missing values differ")
                diff = float(np.nanmax(np.abs((x - y)[~both_nan]), initial=0.0))
                if diff:
                    worst[column] = diff
                if diff > atol:
                    problems.append(f"{name}: {column} differs by up to {diff:.3g} (> {atol:g})")
            elif not x.fillna("<NA>").astype(str).equals(y.fillna("<NA>").astype(str)):
                rows = int((x.fillna("<NA>").astype(str) != y.fillna("<NA>").astype(str)).sum())
                problems.append(f"{name}: {column}: {rows} of {len(x)} values differ")
        status = "equal" if not worst else "floats within " + ", ".join(f"{c} {d:.2g}" for c, d in worst.items())
        print(f"{name}: {a.shape[0]} rows, {status}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--atol", type=float, default=0.0, help="largest absolute float difference accepted")
    args = parser.parse_args()
    problems = compare(args.before, args.after, args.atol)
    for line in problems:
        print("DIFFERENT:", line)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
