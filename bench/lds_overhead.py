"""Wall time of the LDS target on the demo, and the share spent outside training and scoring.

Builds the demo (once), then times `snakemake --forcerun lds_retrain` of `results/demo/validation/lds.csv` on one
core (retrains, query losses under every retrain, the LDS table), --repeats times. Inside the jobs the stages
record the trainer's own time per retrain and the time of each loss pass (adapter load included); the rest of
the wall time is process starts, imports, model loading for training, data copies and Snakemake itself.

    uv run python bench/lds_overhead.py [--workdir DIR] [--repeats 1]
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RUN, bench_arguments, docs_table, machine_line, snakemake, snakemake_command, timed  # noqa: E402

TARGET = f"results/{RUN}/validation/lds.csv"


def inside_seconds(workdir: Path) -> tuple[float, float, int]:
    """Trainer and query-loss seconds, from the `time: ...` lines the LDS stages write into their logs."""
    logs = workdir / "logs" / RUN
    times = {}
    for log in [*logs.glob("lds_retrain_*.log"), logs / "lds_losses.log"]:
        for what, seconds in re.findall(r"time: (.*): ([\d.]+) s", log.read_text()):
            times[what] = float(seconds)
    train = [s for what, s in times.items() if what.startswith("training subset-")]  # train_adapter's line
    losses = [s for what, s in times.items() if what.startswith("query losses subset")]
    return sum(train), sum(losses), len(train)


def main() -> None:
    args, workdir = bench_arguments(__doc__, 1, "bench-lds-")
    print(f"preparing the demo in {workdir} ...", flush=True)
    snakemake(workdir, TARGET, "--cores", "2")
    rows = []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        wall = timed(snakemake_command(workdir, "--cores", "1", "--forcerun", "lds_retrain", "--", TARGET))
        train, losses, subsets = inside_seconds(workdir)
        rows.append((wall, train, losses, subsets))
    wall = statistics.median(r[0] for r in rows)
    train = statistics.median(r[1] for r in rows)
    losses = statistics.median(r[2] for r in rows)
    with docs_table("lds-overhead", args.docs):
        print(f"\n{machine_line()}")
        print(f"inputs: demo run, {rows[0][3]} retrains, one core, median of {len(rows)}")
        print(f"{'part':<28} {'s':>7} {'share':>7}")
        for name, value in (("LDS target, wall", wall), ("training (trainer time)", train),
                            ("query losses (load + forward)", losses), ("everything else", wall - train - losses)):
            print(f"{name:<28} {value:>7.1f} {value / wall:>7.0%}")


if __name__ == "__main__":
    main()
