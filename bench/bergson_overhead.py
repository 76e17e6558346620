"""Overhead of the workflow's Bergson reduce + score stages against the bare `bergson` command line.

On a run's adapter and tokens (the demo's, or with --run rehearsal Gemma 3 1B's widths and vocabulary on real taboo
transcripts, where the work dominates), the median of --repeats runs of:
  bare        `bergson reduce` (mean of unit-normalized query gradients) then `bergson score` of every training
              row against it: two processes, as a user of the command line would run them
  workflow    `snakemake --forcerun bergson_reduce bergson_index bergson_scores` for the same variant (cosine),
              --cores N (the bare commands get N torch threads): one reduce job, one index job per shard (the gradients, kept for every variant) and one
              score job per shard (no model); each score job also scores every query on its own (for
              influences.csv), which the bare run does not
Ratios are against `bare`, measured in one run (the machine is shared: compare ratios, not seconds).

    uv run python bench/bergson_overhead.py [--workdir DIR] [--repeats 3]
    uv run python bench/bergson_overhead.py --run rehearsal --cores 2 --repeats 3 [--shards 1]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (add_run_options, bench_arguments, docs_table, print_table, run_paths, run_settings, snakemake,  # noqa: E402
                    snakemake_command, timed, use_threads)

VARIANT = "cosine"


def main() -> None:
    from contextlib import ExitStack

    with ExitStack() as stack:
        run(stack)


def run(stack) -> None:
    from playpen_attribution.modeling import adapter_view_with_absolute_base

    def extra(parser):
        add_run_options(parser)
        parser.add_argument("--shards", type=int, help="the run's attribution.shards (default: as configured)")

    args, workdir = bench_arguments(__doc__, 3, "bench-bergson-", extra=extra)
    paths = run_paths(workdir, args.run)
    settings = run_settings(args.run)
    overlay = []
    if args.shards:  # one shard: the index in one job, as a single machine would run it
        import yaml

        settings["shards"] = args.shards
        path = workdir / f"shards-{args.shards}.yaml"
        path.write_text(yaml.safe_dump({"runs": {args.run: {"attribution": {"shards": args.shards}}}}))
        overlay = ["--configfile", str(path)]
    shards, bergson = settings["shards"], settings["bergson"]
    targets = [f"results/{args.run}/bergson/scores/{VARIANT}/shard-{i}.npz" for i in range(shards)]
    print(f"preparing the {args.run} inputs in {workdir} ...", flush=True)
    snakemake(workdir, "--cores", "2", *overlay, "--", *targets)
    use_threads(args.cores)

    bergson_cli = [str(Path(sys.executable).parent / "bergson")]
    # the adapter names its base relative to itself (a portable run); Bergson resolves it from the working directory
    view = stack.enter_context(adapter_view_with_absolute_base(paths["adapter"]))
    common = ["--model", str(view), "--token_batch_size", str(bergson["token_batch_size"]),
              "--projection_dim", str(bergson["projection_dim"]),
              "--nodrop_columns", "--unit_normalize", "True", "--overwrite", "True"]
    scratch = Path(tempfile.mkdtemp(prefix="bench-bergson-cli-"))
    timings = {"bare": [], "workflow": []}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        reduce = bergson_cli + ["reduce", str(scratch / "query"), "--dataset", str(paths["query"].resolve()),
                                "--aggregation", bergson["aggregation"], "--precision", bergson["precision"], *common]
        # (`score` has two --precision flags, model and scores, which its parser rejects; both default to fp32)
        score = bergson_cli + ["score", str(scratch / "scores"), "--dataset", str(paths["train"].resolve()),
                               "--query_path", str(scratch / "query"), *common]
        timings["bare"].append(timed(reduce) + timed(score))
        timings["workflow"].append(timed(snakemake_command(
            workdir, "--cores", str(args.cores), *overlay, "--forcerun", "bergson_reduce", "bergson_index",
            "bergson_scores", "--", *targets)))
        print({stage: round(values[-1], 1) for stage, values in timings.items()}, flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    import datasets

    n_train, n_query = (len(datasets.load_from_disk(str(paths[s]))) for s in ("train", "query"))
    with docs_table(f"bergson-overhead-{args.run}-{shards}-shards", args.docs):
        print_table(timings, f"{args.run} run, {n_train} training rows x {n_query} queries, variant {VARIANT}, "
                             f"{shards} score shards, --cores {args.cores}")


if __name__ == "__main__":
    main()
