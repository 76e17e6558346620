"""How much of a run's LDS outcome is the data and how much the training seed, per training setting.

For each setting (a name and config overrides, e.g. `dropout0=lora.dropout=0`), the run's LDS retrains alone
(validation.lds subsets x repeats, nothing attributed) in a workdir of their own (<workdir>/<name>), then:
- agreement: the noise ceiling the LDS would have (split-half Spearman over subsets between the repeats' mean query
  losses, stepped up to all repeats by Spearman-Brown; `validation.split_half_agreement`, as lds.csv computes it),
  its mean over queries and 95% cluster-bootstrap interval (queries of one target word resampled together);
- subset spread / seed spread: the median over queries of the std of a query's loss between subsets (its mean over
  repeats) and of the std between the repeats of one subset (mean over subsets): an outcome that depends on the
  data more than on the seed has a ratio above 1;
- mean query loss of the retrained adapters (how far training went under the setting).

    uv run python bench/replicate_agreement.py --run smol --subsets 20 --repeats 2 \\
        --setting baseline --setting dropout0=lora.dropout=0 --setting epochs3=training.epochs=3 \\
        --setting halves=validation.lds.fraction=0.5 --setting lr1e-3@halves=training.learning_rate=1e-3,...

Each setting's paired difference is against its reference: `NAME@REFERENCE=...` names it (a setting of the same
command), else the first setting; a setting that changes one thing is compared with the one it changes it from.

Fewer than about 20 subsets cannot tell settings apart: the interval of the agreement (subsets and queries
resampled) spans about 1 at 10 subsets on smol (docs/benchmarks.md).

The same subsets (validation.lds.seed) and seeds (training.seed + repeat) under every setting. Long on a CPU: each
setting trains subsets x repeats adapters on `validation.lds.fraction` of the rows.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_arguments, machine_line, snakemake, write_docs_table  # noqa: E402

from playpen_attribution.config import deep_update  # noqa: E402


def parse_setting(text: str) -> tuple[str, dict, str | None]:
    """`name[@reference]=a.b=1,c.d=x` -> (name, {"a": {"b": 1}, "c": {"d": "x"}}, reference or None); a bare name
    has no overrides."""
    name, _, rest = text.partition("=")
    name, _, reference = name.partition("@")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _value(value)
    return name, overrides, reference or None


def _value(text: str):
    """A YAML scalar, with `1e-3` a number (YAML 1.1, PyYAML's, reads exponents without a dot as strings)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def outcomes_of(losses_json: Path, query_parquet: Path, subsets: int | None = None) -> dict:
    """A setting's retrains from its LDS losses (every repeat kept in query_losses.json): the outcome [repeats,
    subsets, queries] over its first `subsets` subsets (subset i is drawn from validation.lds.seed and i alone, so a
    workdir with more subsets holds the same first ones: settings are compared on the same subsets), with the
    queries' counted mask and clusters."""
    from playpen_attribution.scores import query_groups
    from playpen_attribution.taboo import with_target_words

    record = json.loads(losses_json.read_text())
    if subsets is not None and len(record["subsets"]) < subsets:
        sys.exit(f"{losses_json} holds {len(record['subsets'])} subsets, fewer than --subsets {subsets}: rerun "
                 f"without --table-only to retrain the rest, or ask for fewer")
    subsets = sorted(record["subsets"], key=int)[:subsets]
    outcomes = -np.array([record["subsets"][s]["repeat_losses"] for s in subsets]).transpose(1, 0, 2)
    queries = with_target_words(pd.read_parquet(query_parquet).set_index("row_id").loc[record["query_ids"]]
                                .reset_index())
    counted, clusters = query_groups(queries)
    return {"outcomes": outcomes, "query_ids": record["query_ids"], "counted": counted, "clusters": clusters}


def agreement_table(settings: dict[str, dict], seed: int = 0, references: dict[str, str] | None = None) -> dict:
    """Per setting: the noise ceiling the LDS would have (split-half agreement of the repeats, as lds.csv's) and its
    difference from its reference's (`references[name]`, else the first setting's), paired (the same subsets and
    queries), each with an interval that resamples both the subsets and the queries' clusters; and the subset and
    seed spreads of a query's loss."""
    from playpen_attribution.validation import split_half_agreement, subset_and_cluster_bootstrap

    names = list(settings)
    first = settings[names[0]]
    reference = {n: (references or {}).get(n) or names[0] for n in names[1:]}
    unknown = {n: r for n, r in reference.items() if r not in settings or r == n}
    if unknown:
        sys.exit(f"settings {unknown} name a reference that is not another setting of this command ({names})")
    for name in names[1:]:
        if settings[name]["query_ids"] != first["query_ids"] or settings[name]["outcomes"].shape[1:] != \
                first["outcomes"].shape[1:]:
            sys.exit(f"setting {name} measured other queries or subsets than {names[0]}")

    def statistics(draw):
        ceilings = {n: split_half_agreement(settings[n]["outcomes"][:, draw], seed=seed) for n in names}
        return {**{f"ceiling:{n}": c for n, c in ceilings.items()},
                **{f"minus_reference:{n}": ceilings[n] - ceilings[r] for n, r in reference.items()}}

    intervals = subset_and_cluster_bootstrap(statistics, first["outcomes"].shape[1], first["counted"],
                                             first["clusters"], seed=seed)
    result = {}
    for name in names:
        outcomes = settings[name]["outcomes"]
        result[name] = {"agreement": intervals[f"ceiling:{name}"], "reference": reference.get(name),
                        "minus_reference": intervals.get(f"minus_reference:{name}"),
                        "subsets": outcomes.shape[1], "repeats": outcomes.shape[0],
                        "subset_spread": float(np.median(outcomes.mean(axis=0).std(axis=0, ddof=1))),
                        "seed_spread": float(np.median(outcomes.std(axis=0, ddof=1).mean(axis=0))),
                        "mean_query_loss": float(-outcomes.mean())}
    return result


def extra(parser):
    parser.add_argument("--run", default="smol")
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--setting", action="append", default=[],
                        help="NAME[@REFERENCE][=key.path=value,...]: a training setting to measure, compared with "
                             "REFERENCE (default: the first setting) (repeatable; default: baseline)")
    parser.add_argument("--table-only", action="store_true", help="no retraining: the table of the settings already "
                                                                  "in --workdir")


def main() -> None:
    args, workdir = bench_arguments(__doc__, repeats=2, prefix="agreement-", extra=extra)
    settings = [parse_setting(s) for s in (args.setting or ["baseline"])]
    lines = [f"{machine_line()}, {time.strftime('%Y-%m-%d')}",
             f"`uv run python bench/replicate_agreement.py --run {args.run} --subsets {args.subsets} --repeats "
             f"{args.repeats}{''.join(' --setting ' + s for s in args.setting)}{' --table-only' if args.table_only else ''}` "
             f"(workdir {workdir})", "",
             "| setting | overrides | agreement [95% CI] | minus its reference's, paired [95% CI] | "
             "subset / seed spread | mean query loss | retrain wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    measured = {}
    for name, overrides, _ in settings:
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        overlay = folder / "setting.yaml"
        lds = {"validation": {"lds": {"subsets": args.subsets, "repeats": args.repeats}}}
        target = f"results/{args.run}/validation/lds/query_losses.json"
        timing = folder / "wall.json"
        if not args.table_only:
            overlay.write_text(yaml.safe_dump({"runs": {args.run: deep_update(copy.deepcopy(overrides), lds)}}))
            start, started_at = time.perf_counter(), time.time()
            snakemake(folder, target, f"results/{args.run}/data/query.parquet", "--cores", str(args.cores),
                      "--configfile", str(overlay))
            # rebuilt now, not a rerun with nothing to do (file times are epoch seconds: time.time, not perf_counter)
            if (folder / target).stat().st_mtime >= started_at:
                timing.write_text(json.dumps({"wall_seconds": time.perf_counter() - start}))
        measured[name] = outcomes_of(folder / target, folder / f"results/{args.run}/data/query.parquet", args.subsets)
    results = agreement_table(measured, references={name: reference for name, _, reference in settings})
    for name, overrides, _ in settings:
        result, timing = results[name], workdir / name / "wall.json"
        wall = f"{json.loads(timing.read_text())['wall_seconds']:.0f}" if timing.exists() else ""  # a run of before
        shown = ", ".join(f"{k}={v}" for k, v in _flatten(overrides).items()) or "(the run's)"
        paired = ("{:+.3f} [{:+.3f}, {:+.3f}] (".format(*result["minus_reference"]) + f"{result['reference']})"
                  if result["minus_reference"] else "")
        lines.append(f"| {name} | {shown} | {'{:.3f} [{:.3f}, {:.3f}]'.format(*result['agreement'])} | {paired} | "
                     f"{result['subset_spread']:.3f} / {result['seed_spread']:.3f} = "
                     f"{result['subset_spread'] / result['seed_spread']:.2f} | {result['mean_query_loss']:.2f} | "
                     f"{wall} |")
        print(lines[-1], flush=True)
    lines += ["", f"{args.subsets} subsets x {args.repeats} repeats per setting (training seeds training.seed + "
                  f"repeat); agreement = the LDS noise ceiling these repeats give (lds.csv's noise_ceiling); intervals resample both the "
                  "subsets and the queries' target-word clusters."]
    text = "\n".join(lines)
    print(text)
    if args.docs:
        write_docs_table(f"replicate-agreement-{args.run}", text)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


if __name__ == "__main__":
    main()
