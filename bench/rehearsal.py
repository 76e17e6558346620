"""A whole run's DAG end to end from a clean results/, then each job's wall time and peak memory from its Snakemake
benchmark file, beside the memory plan's estimate for that stage (results/<run>/plan.json).

The rehearsal (default): the taboo run's DAG on Gemma 3 1B's shapes (random weights, 262,144-token vocabulary) and
real taboo transcripts. `--run smol`: the real pretrained SmolLM2-135M-Instruct on the real transcripts.

    uv run python bench/rehearsal.py                 # 2 layers, 24 training episodes, on this machine's CPU
    uv run python bench/rehearsal.py --docs          # ... and write the table into docs/benchmarks.md
    uv run python bench/rehearsal.py --gpu           # 26 layers, bf16, every real guesser episode, on a GPU box
    uv run python bench/rehearsal.py --run smol --docs     # the pretrained model (at most an hour on 2 cores)
    uv run python bench/rehearsal.py --gpu --quick  # bench/gpu_check.sh: training, factors, one score shard and
                                                    # one Bergson index shard at 26 layers, in minutes on one GPU

A benchmark, not a test: about half an hour (rehearsal) or an hour (smol) on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, bench_arguments, machine_line, snakemake_command, write_docs_table  # noqa: E402

from playpen_attribution.devices import GPU_PEAK_LINE  # noqa: E402
from playpen_attribution.ensemble import MEMBER_DIR_PATTERN  # noqa: E402
from playpen_attribution.stage import PEAK_RSS_LINE  # noqa: E402

PEAK_PATTERN = re.escape(PEAK_RSS_LINE).replace(r"\{:\.0f\}", r"([\d.]+)")
GPU_PEAK_PATTERN = re.escape(GPU_PEAK_LINE).replace(r"\{:\.0f\}", r"([\d.]+)")

RUN = "rehearsal"
TARGET_FILES = ("influences.csv", "train_scores.csv", "report/index.html")
# --quick: the stages whose GPU memory and speed a first GPU run must check, on the first of two shards
QUICK_TARGET_FILES = ("adapter", "kronfluence/factors/ekfac", "kronfluence/scores/ekfac/shard-0.npz",
                      "bergson/index/shard-0", "plan.json")
GPU_OVERLAY = {"runs": {RUN: {
    "model": {"random": {"architecture": "resources/models/gemma-3-1b-it.config.json", "num_layers": None,
                         "tokenizer_vocab_size": 4096}},
    "data": {"max_rows": {"train": None, "query": None}},
    "attribution": {"bergson": {"precision": "bf16"}},
}}}


def extra(parser):
    parser.add_argument("--run", default=RUN, help="the run to build (default: rehearsal)")
    parser.add_argument("--gpu", action="store_true", help="rehearsal: 26 layers, bf16, all real guesser episodes")
    parser.add_argument("--quick", action="store_true",
                        help="only training, the EK-FAC fit, one score shard and one Bergson index shard")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--overlay", type=Path, action="append", default=[],
                        help="a config overlay (Snakemake --configfile) over the run's settings, e.g. an ensemble")
    parser.add_argument("--table-only", action="store_true",
                        help="no run: the table of the run already in --workdir (its wall time from rehearsal.json)")


def read_benchmarks(workdir: Path, run: str = RUN) -> list[dict]:
    """Each job's wall time and memory: Snakemake's sampled max RSS, and the true peak the job logged itself. Jobs in
    folders are read too: an ensemble member's attribution jobs (`ensemble/member-1/bergson_index_0`) and the members'
    means (`ensemble_mean_scores/<shard>`)."""
    rows = []
    root = workdir / "benchmarks" / run
    for path in sorted(root.rglob("*.tsv")):
        with open(path) as handle:
            record = next(csv.DictReader(handle, delimiter="\t"))
        job = path.relative_to(root).with_suffix("").as_posix()
        log = workdir / "logs" / run / f"{job}.log"
        text = log.read_text() if log.is_file() else ""
        found, gpu = re.findall(PEAK_PATTERN, text), re.findall(GPU_PEAK_PATTERN, text)
        rate = re.findall(r"throughput: \d+ tokens of gradient passes in [\d.]+ s, (\d+) tokens/s", text)
        rows.append({"job": job, "seconds": float(record["s"]), "sampled_rss_mb": float(record["max_rss"]),
                     "peak_mb": float(found[-1]) if found else None,
                     # on CUDA: the tensors' peak and the caching allocator's (what the card must hold)
                     "gpu_allocated_mb": float(gpu[-1][0]) if gpu else None,
                     "gpu_reserved_mb": float(gpu[-1][1]) if gpu else None,
                     "tokens_per_s": float(rate[-1]) if rate else None})
    return rows


def plan_kind(job: str, kinds) -> str | None:
    """The plan's job kind of a benchmarked job (`kronfluence_scores_ekfac_0` -> `kronfluence_scores`; a member's
    `ensemble/member-1/bergson_index_0` -> `bergson_index`; `ensemble_mean_scores/<shard>` -> `ensemble_mean_scores`)."""
    job = re.sub("^" + MEMBER_DIR_PATTERN, "", job)
    for kind in sorted(kinds, key=len, reverse=True):
        if job == kind or job.startswith(kind + "_") or job.startswith(kind + "/"):
            return kind
    return None


def plan_estimates(workdir: Path, device: str, run: str = RUN) -> dict[str, float]:
    """Estimated peak (MB) of each job kind on this device, from the run's memory plan."""
    path = workdir / "results" / run / "plan.json"
    if not path.is_file():
        return {}
    plan = json.loads(path.read_text())
    return {job: stage["total_gb"] * 1000 for job, stage in plan["cpu_jobs" if device == "cpu" else "jobs"].items()}


def table(rows: list[dict], estimates: dict[str, float], wall: float, header: str) -> str:
    """Each job's wall time and peak beside the plan's estimate. On a GPU run (some job logged its CUDA peak) the
    peak compared with the plan is the GPU's (reserved by the caching allocator: what the card must hold), and
    the host peak stays in its own column; otherwise it is the host's."""
    gpu = any(r["gpu_reserved_mb"] for r in rows)

    def compared(row):
        return row["gpu_reserved_mb"] if gpu else row["peak_mb"]

    head = "| job | wall s | tokens/s | host peak MB | sampled MB |" + (
        " GPU allocated MB | GPU reserved MB |" if gpu else "")
    lines = [header, "", head + " plan MB | plan / peak |",
             "|---|---:|---:|---:|---:|" + ("---:|---:|" if gpu else "") + "---:|---:|"]
    for row in sorted(rows, key=lambda r: -r["seconds"]):
        kind = plan_kind(row["job"], estimates)
        estimate = estimates.get(kind) if kind else None
        peak = compared(row)
        cells = [row["job"], f"{row['seconds']:.1f}", f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] else "",
                 f"{row['peak_mb']:.0f}" if row["peak_mb"] else "", f"{row['sampled_rss_mb']:.0f}"]
        if gpu:
            cells += [f"{row[k]:.0f}" if row[k] else "" for k in ("gpu_allocated_mb", "gpu_reserved_mb")]
        cells += [f"{estimate:.0f}" if estimate else "", f"{estimate / peak:.2f}" if estimate and peak else ""]
        lines.append("| " + " | ".join(cells) + " |")
    planned = [r for r in rows if plan_kind(r["job"], estimates) and compared(r)]
    if planned:
        ratios = [estimates[plan_kind(r["job"], estimates)] / compared(r) for r in planned]
        lines.append(f"\nPlan / {'GPU reserved' if gpu else 'host'} peak over the {len(planned)} model-holding jobs: "
                     f"{min(ratios):.2f} to {max(ratios):.2f}.")
    lines.append(f"Whole DAG: {wall / 60:.1f} min wall ({len(rows)} jobs). tokens/s = the job's gradient-pass tokens "
                 f"over its whole wall time (model loading included). Host peak = the job's own getrusage maximum "
                 f"(logged by every stage); sampled = Snakemake's benchmark file, which samples every 30 s after a "
                 f"job's first 30 s and can miss the peak.")
    return "\n".join(lines)


def main() -> None:
    args, workdir = bench_arguments(__doc__, repeats=1, prefix="rehearsal-", extra=extra)
    workdir.mkdir(parents=True, exist_ok=True)
    run = args.run
    options = []
    if args.gpu:
        if run != RUN:
            sys.exit("--gpu overlays the rehearsal run's settings; use it without --run")
        import yaml

        overlay = workdir / "gpu.yaml"
        overlay.write_text(yaml.safe_dump(GPU_OVERLAY))
        options = ["--configfile", str(overlay)]
    for path in args.overlay:
        options += ["--configfile", str(path.resolve())]
    targets = [f"results/{run}/{name}" for name in (QUICK_TARGET_FILES if args.quick else TARGET_FILES)]
    command = snakemake_command(workdir, *targets, "--cores", str(args.cores), *options)
    record = workdir / f"{run}.json"
    if args.table_only:
        # the plan of the finished run, as the current code computes it (memory_plan reruns when its code changed)
        subprocess.run(snakemake_command(workdir, f"results/{run}/plan.json", "--cores", "1", *options),
                       capture_output=True, text=True, check=True)
        wall = json.loads(record.read_text())["wall_seconds"]
    else:
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{run} failed after {wall:.0f} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        record.write_text(json.dumps({"wall_seconds": wall, "date": time.strftime("%Y-%m-%d")}))
    header = (f"{machine_line()}, {time.strftime('%Y-%m-%d')}\n"
              f"`uv run python bench/rehearsal.py{' --gpu' if args.gpu else ''}{'' if run == RUN else ' --run ' + run}"
              f"{''.join(' --overlay ' + p.name for p in args.overlay)}` "
              f"(workdir {workdir.name})")
    text = table(read_benchmarks(workdir, run), plan_estimates(workdir, "cuda" if args.gpu else "cpu", run), wall,
                 header)
    print(text)
    if args.docs:
        write_docs_table(f"{run}-table", text)


if __name__ == "__main__":
    main()
