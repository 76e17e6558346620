"""A run's attribution quality as README tables, from its own validation files: each method's LDS with its 95%
interval and its margin over the best baseline (lds.csv), planted recall (planted_summary.csv), and each
preconditioned method against its plain counterpart (EK-FAC against identity, a Bergson variant against the plain
cosine), paired per query with the same word-clustered bootstrap the LDS uses (lds_per_query.csv); the noise ceiling
of the repeated retrains (lds.csv) and the removal check (removal.csv) where the run has them. `--versus DIR`: each
method's LDS minus the same method's in another workdir's run measured against the same retrains (e.g. an ensemble
against its first member alone), paired per query.

    uv run python bench/quality_table.py --workdir DIR --run smol [--run real ...] [--versus OTHER_DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from playpen_attribution.baselines import is_baseline
from playpen_attribution.scores import mean_and_cluster_interval, plain_counterpart


def interval(value, low, high) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def signed(value, low, high) -> str:
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def lds_table(folder: Path, run: str) -> list[str]:
    lds = pd.read_csv(folder / "lds.csv")
    planted = pd.read_csv(folder / "planted_summary.csv") if (folder / "planted_summary.csv").is_file() else None
    recall = dict(zip(planted.method, planted.recall_at_1)) if planted is not None else {}
    means = dict(zip(lds.method, lds.lds))
    lines = []
    for row in lds[lds.kind == "method"].itertuples():
        lines.append(f"| {run} | {row.method} | {interval(row.lds, row.ci95_low, row.ci95_high)} | {row.best_baseline} "
                     f"| {means[row.best_baseline]:.3f} | "
                     f"{signed(row.margin, row.margin_ci95_low, row.margin_ci95_high)} | {recall.get(row.method, '')} |")
    return lines


def paired_table(folder: Path, run: str, seed: int = 0) -> list[str]:
    """Each preconditioned method minus its plain counterpart, per query, with the clustered interval."""
    per_query = pd.read_csv(folder / "lds_per_query.csv")
    methods = [m for m in per_query.method.unique() if not is_baseline(m)]
    lines = []
    for method in methods:
        plain = plain_counterpart(method, methods)
        if plain is None:
            continue
        a = per_query[per_query.method == method].set_index("query_id")
        b = per_query[per_query.method == plain].set_index("query_id").loc[a.index]
        diff = (a.lds - b.lds).to_numpy()
        mean, low, high = mean_and_cluster_interval(diff, a.counted.to_numpy(), list(a.cluster), seed=seed)
        lines.append(f"| {run} | {method} - {plain} | {signed(mean, low, high)} |")
    return lines


def versus_table(folder: Path, other: Path, run: str, seed: int = 0) -> list[str]:
    """Each method of `folder` minus the same method of `other` (another configuration of the run, LDS against the
    same retrains: the actual losses must agree), paired per query."""
    import json

    import numpy as np

    mine, theirs = (json.loads((f / "lds" / "query_losses.json").read_text()) for f in (folder, other))
    if mine["subsets"].keys() != theirs["subsets"].keys() or not all(
            np.allclose(mine["subsets"][k]["query_losses"], theirs["subsets"][k]["query_losses"]) for k in mine["subsets"]):
        raise SystemExit(f"{folder} and {other} measure against different retrains; compare runs of the same LDS")
    a_all, b_all = (pd.read_csv(f / "lds_per_query.csv") for f in (folder, other))
    lines = []
    for method in [m for m in a_all.method.unique() if not is_baseline(m) and m in set(b_all.method)]:
        a = a_all[a_all.method == method].set_index("query_id")
        b = b_all[b_all.method == method].set_index("query_id").loc[a.index]
        mean, low, high = mean_and_cluster_interval((a.lds - b.lds).to_numpy(), a.counted.to_numpy(), list(a.cluster),
                                                    seed=seed)
        lines.append(f"| {run} | {method} | {a.lds[a.counted].mean():.3f} | {b.lds[a.counted].mean():.3f} | "
                     f"{signed(mean, low, high)} |")
    return lines


def ceiling_table(folder: Path, run: str) -> list[str]:
    lds = pd.read_csv(folder / "lds.csv")
    if "noise_ceiling" not in lds or lds.noise_ceiling.isna().all():
        return [f"| {run} | {int(lds.repeats.max()) if 'repeats' in lds else 1} | not known (one repeat) | |"]
    row = lds.iloc[0]
    best = lds[lds.kind == "method"].sort_values("lds").iloc[-1]
    return [f"| {run} | {int(row.repeats)} | {interval(row.noise_ceiling, row.noise_ceiling_ci95_low, row.noise_ceiling_ci95_high)} "
            f"| {best.method} {best.lds:.3f} |"]


def removal_table(folder: Path, run: str) -> list[str]:
    if not (folder / "removal.csv").is_file():
        return []
    table = pd.read_csv(folder / "removal.csv")
    lines = []
    for row in table[~table.selection.str.startswith("random-")].itertuples():
        margins = "".join(f" | {signed(getattr(row, f'over_{r}'), getattr(row, f'over_{r}_ci95_low'), getattr(row, f'over_{r}_ci95_high'))}"
                          if row.kind == "method" else " | " for r in ("random", "tfidf"))
        lines.append(f"| {run} | {row.fraction:g} | {row.selection} | {row.removed} | "
                     f"{signed(row.loss_rise, row.ci95_low, row.ci95_high)}{margins} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--run", action="append", required=True)
    parser.add_argument("--versus", type=Path, help="another workdir with the same runs, to compare each method with")
    args = parser.parse_args()
    print("| run | method | LDS [95%] | best baseline | its LDS | margin [95%] | planted recall@1 |")
    print("|---|---|---|---|---|---|---|")
    for run in args.run:
        print("\n".join(lds_table(args.workdir / "results" / run / "validation", run)))
    print("\n| run | preconditioned - plain | LDS difference [95%], paired per query |")
    print("|---|---|---|")
    for run in args.run:
        print("\n".join(paired_table(args.workdir / "results" / run / "validation", run)))
    print("\n| run | repeats | noise ceiling [95%] | best method's LDS |")
    print("|---|---|---|---|")
    for run in args.run:
        print("\n".join(ceiling_table(args.workdir / "results" / run / "validation", run)))
    if args.versus:
        print(f"\n| run | method | LDS here | LDS in {args.versus.name} | difference [95%], paired per query |")
        print("|---|---|---|---|---|")
        for run in args.run:
            print("\n".join(versus_table(args.workdir / "results" / run / "validation",
                                         args.versus / "results" / run / "validation", run)))
    rows = [line for run in args.run for line in removal_table(args.workdir / "results" / run / "validation", run)]
    if rows:
        print("\n| run | fraction | removed by | rows | loss rise [95%] | over random [95%] | over TF-IDF [95%] |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
