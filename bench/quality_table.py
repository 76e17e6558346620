"""A run's attribution quality as README tables, from its own validation files: each method's LDS with its 95%
interval and its margin over the best baseline (lds.csv), planted recall (planted_summary.csv), and each
preconditioned method against its plain counterpart (EK-FAC against identity, a Bergson variant against the plain
cosine), paired (lds.csv); the noise ceiling of the repeated retrains (lds.csv) and the removal check (removal.csv)
where the run has them (a run built only to removal.csv gets its removal rows alone). `--versus DIR`: each method's
LDS minus the same method's in another workdir's run measured against the same retrains (e.g. an ensemble against
its first member alone), paired; where both ran the removal check with the same reference retrains, also each
method's loss rise minus the other's, paired. `--retrains DIR`: every LDS of
--workdir's scores (and of --versus's) against another workdir's retrains of the same subsets instead of its own (e.g.
an adapter trained for one epoch scored against retrains of two: the `lds` stage's own function on that workdir's
query_losses.json, written under --out). `--subsets 0-9`: every LDS from those retrained subsets only (of --retrains
or of the workdir itself), to choose a setting on some subsets and report it on the others (`--subsets 10-19`), so
that the LDS it is reported with was not the one it was chosen on. Every LDS interval resamples both the retrained
subsets and the queries' target-word clusters.

    uv run python bench/quality_table.py --workdir DIR --run smol [--run real ...] [--versus OTHER_DIR]
    uv run python bench/quality_table.py --workdir DIR --run smol --retrains RETRAINS_DIR --out OUT [--versus OTHER_DIR]
    uv run python bench/quality_table.py --workdir DIR --run smol --subsets 0-9 --out OUT [--retrains ...] [--versus ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd



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


def paired_table(folder: Path, run: str) -> list[str]:
    """Each preconditioned method minus its plain counterpart, paired (the same subsets and queries), as lds.csv
    has it: its interval resamples both the subsets and the queries' clusters."""
    lds = pd.read_csv(folder / "lds.csv")
    if "minus_plain" not in lds:
        raise SystemExit(f"{folder / 'lds.csv'} predates the paired columns; rerun its lds job (snakemake "
                         f"{folder / 'lds.csv'} --force)")
    return [f"| {run} | {row.method} - {row.plain} | "
            f"{signed(row.minus_plain, row.minus_plain_ci95_low, row.minus_plain_ci95_high)} |"
            for row in lds[lds.kind == "method"].itertuples() if isinstance(row.plain, str)]


def versus_table(run_dir: Path, other_dir: Path, run: str, seed: int = 0, losses_json: Path | None = None) -> list[str]:
    """Each method of `run_dir` minus the same method of `other_dir` (another configuration of the run, LDS against
    the same retrains: the actual losses must agree, or both read `losses_json`), paired, with an interval that
    resamples both the subsets and the queries' clusters (validation.subset_and_cluster_bootstrap)."""
    import numpy as np

    from playpen_attribution.validation import lds_of_predictions, method_predictions, subset_and_cluster_bootstrap

    (mine, actual, counted, clusters), (theirs, other_actual, _, _) = (method_predictions(d, losses_json)
                                                                       for d in (run_dir, other_dir))
    if actual.shape != other_actual.shape or not np.allclose(actual, other_actual):
        raise SystemExit(f"{run_dir} and {other_dir} measure against different retrains; compare runs of the same LDS")
    shared = [m for m in mine if m in theirs]

    def statistics(draw):
        stats = {}
        for m in shared:
            a, b = (lds_of_predictions(p[m][draw], actual[draw]) for p in (mine, theirs))
            stats.update({f"a:{m}": a, f"b:{m}": b, f"diff:{m}": a - b})
        return stats

    result = subset_and_cluster_bootstrap(statistics, len(actual), counted, clusters, seed=seed)
    return [f"| {run} | {m} | {result[f'a:{m}'][0]:.3f} | {result[f'b:{m}'][0]:.3f} | {signed(*result[f'diff:{m}'])} |"
            for m in shared]


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


def has_removal_check(results: Path) -> bool:
    """Whether results/<run> holds a removal check's retrains (its reference's, at least)."""
    from playpen_attribution.removal import REFERENCE

    return (results / "validation" / "removal" / "losses" / REFERENCE).is_dir()


def removal_versus_table(run_dir: Path, other_dir: Path, run: str, seed: int = 0) -> list[str]:
    """Each method's loss rise after removing its top rows here minus the same method's in `other_dir` (another
    configuration of the run whose removal check retrained the same reference and seeds, e.g. the same run scoring
    another adapter), per fraction, paired per query and training seed: the interval resamples the training seeds
    and the queries' target-word clusters together (validation.shared_and_cluster_bootstrap, as removal.csv's own).
    Both sides' rises are over the same reference, so the difference is that of the losses after removal."""
    import numpy as np

    from playpen_attribution.removal import REFERENCE, read_removal_losses, read_removal_selections
    from playpen_attribution.scores import query_groups, read_run_tables
    from playpen_attribution.taboo import with_target_words
    from playpen_attribution.validation import shared_and_cluster_bootstrap

    def removal_check(results: Path):
        folder = results / "validation" / "removal"
        if not has_removal_check(results):
            raise SystemExit(f"{folder} holds no removal check (validation.removal.fractions) to compare")
        queries = with_target_words(read_run_tables(results / "query.csv", results / "train.csv")[0])
        kinds = read_removal_selections(sorted((folder / "rows").glob("*.json")))[0]
        losses = read_removal_losses(sorted((folder / "losses").glob("*/repeat-*.json")), queries.query_id.tolist())
        return queries, kinds, losses

    (queries, kinds, mine), (other_queries, other_kinds, theirs) = (removal_check(d) for d in (run_dir, other_dir))
    reference = mine[(REFERENCE, "0")]
    if (other_queries.query_id.tolist() != queries.query_id.tolist()
            or theirs[(REFERENCE, "0")].shape != reference.shape
            or not np.allclose(theirs[(REFERENCE, "0")], reference)):
        raise SystemExit(f"{run_dir} and {other_dir} retrained different references (queries, seeds or rows); "
                         "compare removal checks of the same run and training")
    keys = sorted(key for key in mine if kinds.get(key[0]) == "method" and other_kinds.get(key[0]) == "method"
                  and key in theirs and theirs[key].shape == mine[key].shape)
    counted, clusters = query_groups(queries)

    def per_query(shared):
        (repeats,) = shared
        return {key: mine[key][repeats].mean(axis=0) - theirs[key][repeats].mean(axis=0) for key in keys}

    result = shared_and_cluster_bootstrap(per_query, (len(reference),), counted, clusters, seed=seed)
    return [f"| {run} | {float(fraction):g} | {selection} | {signed(*result[(selection, fraction)])} |"
            for selection, fraction in sorted(keys, key=lambda key: (float(key[1]), key[0]))]


def lds_against_retrains(run_dir: Path, retrains_losses: Path, out: Path, seed: int = 0) -> Path:
    """The `lds` stage (validation.lds_stage, what the rule calls) on `run_dir`'s scores with another run's retrained
    query losses; `out` gets lds.csv, lds_per_query.csv and a copy of the run's planted_summary.csv, so the tables
    below read it as a run's validation folder."""
    import shutil

    from playpen_attribution.validation import lds_stage

    if not retrains_losses.is_file():
        raise SystemExit(f"{retrains_losses} is missing: --retrains names a workdir whose LDS retrains have run")
    out.mkdir(parents=True, exist_ok=True)
    train_scores = run_dir / "train_scores.csv"
    lds_stage(run_dir / "query.csv", run_dir / "train.csv", run_dir / "influences.csv", retrains_losses,
              out / "lds.csv", out / "lds_per_query.csv", random_seed=seed,
              train_scores_csv=train_scores if train_scores.is_file() else None)
    planted = run_dir / "validation" / "planted_summary.csv"
    if planted.is_file():
        shutil.copyfile(planted, out / "planted_summary.csv")
    return out


def parse_subsets(spec: str) -> list[str]:
    """`0-9,15` -> the subset numbers "0" to "9" and "15" (query_losses.json's keys)."""
    chosen = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or (last and int(last) < int(first)):
            raise SystemExit(f"--subsets {spec}: {part!r} is not a subset number or a range like 0-9")
        chosen += [str(s) for s in range(int(first), int(last or first) + 1)]
    return sorted(set(chosen), key=int)


def subset_losses(losses_json: Path, subsets: list[str], out: Path) -> Path:
    """A copy of the retrains' query_losses.json holding only `subsets` (their losses and repeats unchanged), for an
    LDS from those subsets alone."""
    if not losses_json.is_file():
        raise SystemExit(f"{losses_json} is missing: --subsets needs a workdir whose LDS retrains have run")
    losses = json.loads(losses_json.read_text())
    missing = [s for s in subsets if s not in losses["subsets"]]
    if missing:
        raise SystemExit(f"{losses_json} has no retrains of subset(s) {missing} (it has "
                         f"{sorted(losses['subsets'], key=int)}); choose --subsets among them")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**losses, "subsets": {s: losses["subsets"][s] for s in subsets}}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--run", action="append", required=True)
    parser.add_argument("--versus", type=Path, help="another workdir with the same runs, to compare each method with")
    parser.add_argument("--retrains", type=Path,
                        help="another workdir whose LDS retrains (the same subsets) every LDS is measured against")
    parser.add_argument("--subsets", help="the LDS from these retrained subsets only, e.g. 0-9 or 0-4,10-14")
    parser.add_argument("--out", type=Path,
                        help="with --retrains or --subsets: where each run's recomputed LDS tables go")
    parser.add_argument("--seed", type=int,
                        help="with --retrains: the random baseline's and the bootstrap's seed (default: the run's "
                             "validation.lds.seed in config/config.yaml, as the lds rule reads it)")
    args = parser.parse_args()
    if (args.retrains or args.subsets) and not args.out:
        parser.error("--retrains and --subsets need --out, the folder their recomputed lds.csv files go to")
    recompute = bool(args.retrains or args.subsets)

    def losses(run: str) -> Path | None:
        if not recompute:
            return None
        retrained = (args.retrains or args.workdir) / "results" / run / "validation" / "lds" / "query_losses.json"
        if args.subsets:
            return subset_losses(retrained, parse_subsets(args.subsets), args.out / run / "query_losses.json")
        return retrained

    def lds_seed(run: str) -> int:
        from playpen_attribution.config import load_config, run_config

        if args.seed is not None:
            return args.seed
        return run_config(load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml"),
                          run)["validation"]["lds"]["seed"]

    folders = {run: (lds_against_retrains(args.workdir / "results" / run, losses(run), args.out / run, lds_seed(run))
                     if recompute else args.workdir / "results" / run / "validation") for run in args.run}
    # a run built only to its removal check (removal.csv, no LDS retrains) has removal tables and no LDS ones
    with_lds = [run for run in args.run if (folders[run] / "lds.csv").exists()]
    for run in sorted(set(args.run) - set(with_lds)):
        print(f"{run}: no lds.csv in {folders[run]} (its LDS has not run): the removal check only")
    print("| run | method | LDS [95%] | best baseline | its LDS | margin [95%] | planted recall@1 |")
    print("|---|---|---|---|---|---|---|")
    for run in with_lds:
        print("\n".join(lds_table(folders[run], run)))
    print("\n| run | preconditioned - plain | LDS difference [95%], paired |")
    print("|---|---|---|")
    for run in with_lds:
        print("\n".join(paired_table(folders[run], run)))
    print("\n| run | repeats | noise ceiling [95%] | best method's LDS |")
    print("|---|---|---|---|")
    for run in with_lds:
        print("\n".join(ceiling_table(folders[run], run)))
    if args.versus:
        print(f"\n| run | method | LDS here | LDS in {args.versus.name} | difference [95%], paired |")
        print("|---|---|---|---|---|")
        for run in with_lds:
            print("\n".join(versus_table(args.workdir / "results" / run, args.versus / "results" / run, run,
                                          losses_json=losses(run))))
    rows = [line for run in args.run for line in removal_table(args.workdir / "results" / run / "validation", run)]
    if rows:
        print("\n| run | fraction | removed by | rows | loss rise [95%] | over random [95%] | over TF-IDF [95%] |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        if args.versus:
            print(f"\n| run | fraction | removed by | loss rise here minus in {args.versus.name} [95%], paired |")
            print("|---|---|---|---|")
            for run in args.run:
                if has_removal_check(args.versus / "results" / run):
                    print("\n".join(removal_versus_table(args.workdir / "results" / run,
                                                          args.versus / "results" / run, run)))


if __name__ == "__main__":
    main()
