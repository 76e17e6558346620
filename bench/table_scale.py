"""The CPU jobs after the shards at the taboo run's size: `merge_influences`, `merge_train_scores` and `report` on
300 queries x 2,000 training rows x 4 methods (EK-FAC and three Bergson variants, 4 shards each; no per-token
scores, as in the taboo run), synthetic scores and rows of real length. Each stage runs in its own process, as a
job does; the table gives its wall time and true peak memory against the memory the job declares
(`resources.table_mem_mb` of the taboo run).

    uv run python bench/table_scale.py [--queries 300] [--rows 2000] [--workdir DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, bench_arguments, docs_table, machine_line  # noqa: E402

METHODS = ["ekfac", "bergson_cosine", "bergson_cosine_train", "bergson_cosine_mixed"]
SHARDS = 4

STAGES = {
    "merge_influences": """
from playpen_attribution.scores import merge_influences_stage
merge_influences_stage(d / "query.parquet", d / "train.parquet", d / "tokens-query", d / "tokens-train",
                       d / "query_losses.json", shards, d / "query.csv", d / "train.csv", d / "influences.csv")
""",
    "merge_train_scores": """
from playpen_attribution.bergson_attribution import merge_train_scores_stage
merge_train_scores_stage(d / "train.parquet", d / "tokens-train", {m: p for m, p in shards.items() if m != "ekfac"},
                         d / "train_scores.csv", d / "train_scores.report.json")
""",
    "report": """
from playpen_attribution.report import build_report
build_report(query_csv=d / "query.csv", train_csv=d / "train.csv", influences_csv=d / "influences.csv",
             out_dir=d / "report", train_scores_csv=d / "train_scores.csv")
""",
}


def extra(parser):
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--rows", type=int, default=2000)


def make_inputs(d: Path, queries: int, rows: int) -> dict:
    import datasets
    import pandas as pd

    from playpen_attribution.tables import save_shard, shard_indices

    rng = np.random.default_rng(0)
    ids = {"query": [f"validation-{i:06d}" for i in range(queries)], "train": [f"train-{i:06d}" for i in range(rows)]}
    for role, row_ids in ids.items():
        turns = [[{"role": "user", "content": "You are playing a collaborative word guessing game. " * 20
                   + f"CLUE: clue {i}"}] for i in range(len(row_ids))]
        pd.DataFrame({"row_id": row_ids, "content_hash": "0" * 16, "prompt": turns,
                      "completion": [[{"role": "assistant", "content": f"GUESS: word{i % 50}"}] for i in range(len(row_ids))],
                      "game": "taboo", "game_role": "WordGuesser", "outcome": "success", "experiment": "high_en",
                      "model": "m", "player_name": "Player 2", "task_id": 1, "n_turns": 1}
                     ).to_parquet(d / f"{role}.parquet")
        datasets.Dataset.from_dict({"row_id": row_ids, "input_ids": [[5] * 300] * len(row_ids)}).save_to_disk(
            str(d / f"tokens-{role}"))
    (d / "query_losses.json").write_text(json.dumps({"query_ids": ids["query"], "losses": [1.0] * queries}))
    shards = {}
    for method in METHODS:
        scores = rng.normal(size=(queries, rows)).astype(np.float32)
        shards[method] = []
        for s in range(SHARDS):
            part = shard_indices(rows, SHARDS, s)
            path = d / f"{method}-shard-{s}.npz"
            reduced = scores[:, part].mean(0) if method != "ekfac" else None
            save_shard(path, scores[:, part], ids["query"], [ids["train"][i] for i in part], reduced=reduced)
            shards[method].append(str(path))
    return shards


def run_stage(name: str, d: Path, shards: dict) -> tuple[float, float]:
    """Wall time and the child's own peak resident memory (getrusage, printed by the child)."""
    code = (f"import json, resource\nfrom pathlib import Path\nd = Path({str(d)!r})\n"
            f"shards = json.loads({json.dumps(json.dumps(shards))})\n" + STAGES[name]
            + "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stdout.split("PEAK")[-1].split()[0])
    return wall, peak_kb / 1024


def main() -> None:
    args, workdir = bench_arguments(__doc__, repeats=1, prefix="table-scale-", extra=extra)
    workdir.mkdir(parents=True, exist_ok=True)
    from playpen_attribution.config import load_config

    declared = load_config(REPO / "config" / "config.yaml")["runs"]["taboo"]["resources"]["table_mem_mb"]
    shards = make_inputs(workdir, args.queries, args.rows)
    with docs_table("table-scale", args.docs):
        print(f"{machine_line()}, {time.strftime('%Y-%m-%d')}")
        print(f"inputs: {args.queries} queries x {args.rows} training rows x {len(METHODS)} methods, {SHARDS} shards "
              f"each; influences.csv {args.queries * args.rows * len(METHODS):,} rows")
        print(f"{'stage':<20} {'wall s':>7} {'peak MB':>8} {'declared MB':>12}")
        for name in STAGES:
            wall, peak = run_stage(name, workdir, shards)
            print(f"{name:<20} {wall:>7.1f} {peak:>8.0f} {declared:>12}")
        size = (workdir / "influences.csv").stat().st_size / 1e6
        print(f"influences.csv: {size:.0f} MB")


if __name__ == "__main__":
    main()
