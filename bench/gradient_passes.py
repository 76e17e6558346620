"""Gradient passes over the training tokens per run, counted from the jobs' own log lines, beside wall time.

Every stage that runs a forward+backward pass over a tokenized dataset logs one line per pass
(`gradient pass: R rows, T tokens of <dataset> (<purpose>)`, playpen_attribution.stage). This script runs the
demo's attribution in three steps in one working directory and sums, for the jobs each step ran, the training
tokens they passed over, in units of the whole training set:

  fresh, 1 variant     EK-FAC + bergson_cosine from the trained adapter
  + 3 variants         the same run with bergson_dot, bergson_cosine_train and bergson_cosine_mixed added
  fresh, 4 variants    all four Bergson variants + EK-FAC from scratch (Bergson and Kronfluence outputs removed)

Then Kronfluence's passes over a shard's training rows against the number of queries (8, 32, 300: the demo's
queries repeated), counted where the rows go through the model (the task's training loss), with one pass per
query batch (`query_batches_per_pass: 1`, as before) and with the default (all batches kept for one pass).

    uv run python bench/gradient_passes.py [--workdir DIR]
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RUN, bench_arguments, docs_table, machine_line, snakemake  # noqa: E402

from playpen_attribution.stage import token_count  # noqa: E402

PASS = re.compile(r"gradient pass: (\d+) rows, (\d+) tokens of (\S+) \((.*)\)")
ONE = ["ekfac", "bergson_cosine"]
FOUR = ["ekfac", "bergson_cosine", "bergson_dot", "bergson_cosine_train", "bergson_cosine_mixed"]


def overlay(workdir: Path, methods: list[str]) -> list[str]:
    import yaml

    path = workdir / f"methods-{len(methods)}.yaml"
    path.write_text(yaml.safe_dump({"runs": {RUN: {"attribution": {"methods": methods}}}}))
    return ["--configfile", str(path)]


def query_count(workdir: Path) -> int:
    import datasets

    return len(datasets.load_from_disk(str(workdir / "results" / RUN / "data/tokens/query")))


def passes_since(workdir: Path, start: float, train_tokens: int) -> Counter:
    """Training-set passes (tokens passed / all training tokens) by purpose, from the logs written after `start`."""
    counts: Counter = Counter()
    for log in (workdir / "logs" / RUN).glob("*.log"):
        if log.stat().st_mtime < start:
            continue
        for rows, tokens, dataset, purpose in PASS.findall(log.read_text()):
            if dataset.endswith("data/tokens/train"):
                counts[re.sub(r", shard \d+$", "", purpose)] += int(tokens) / train_tokens
    return counts


def step(workdir: Path, name: str, methods: list[str], train_tokens: int) -> tuple[str, float, Counter]:
    start = time.time()
    snakemake(workdir, f"results/{RUN}/influences.csv", "--cores", "2", *overlay(workdir, methods))
    return name, time.time() - start, passes_since(workdir, start, train_tokens)


def main() -> None:
    import shutil

    import datasets

    args, workdir = bench_arguments(__doc__, 1, "bench-passes-")
    print(f"preparing the demo's adapter and tokens in {workdir} ...", flush=True)
    snakemake(workdir, "--cores", "2", f"results/{RUN}/adapter", f"results/{RUN}/data/tokens/train",
              f"results/{RUN}/data/tokens/query")
    train = datasets.load_from_disk(str(workdir / "results" / RUN / "data/tokens/train"))
    train_tokens = token_count(train)
    steps = [step(workdir, "fresh, 1 variant", ONE, train_tokens), step(workdir, "+ 3 variants", FOUR, train_tokens)]
    results = workdir / "results" / RUN
    for folder in ("bergson", "kronfluence"):
        shutil.rmtree(results / folder)
    for table in ("query.csv", "train.csv", "influences.csv", "query_losses.json"):
        (results / table).unlink()
    steps.append(step(workdir, "fresh, 4 variants", FOUR, train_tokens))

    with docs_table("gradient-passes", args.docs):
        print(kronfluence_passes(workdir, train))
        purposes = sorted({p for _, _, counts in steps for p in counts})
        print(f"\n{machine_line()}, {time.strftime('%Y-%m-%d')}")
        print(f"demo run: {len(train)} training rows ({train_tokens} tokens), {query_count(workdir)} queries, 2 shards; "
              f"passes over the training rows in units of the whole training set")
        print("| step | wall s | " + " | ".join(purposes) + " |")
        print("|---|---:|" + "---:|" * len(purposes))
        for name, wall, counts in steps:
            print(f"| {name} | {wall:.1f} | " + " | ".join(f"{counts.get(p, 0):.2f}" for p in purposes) + " |")


def kronfluence_passes(workdir: Path, train) -> str:
    """Training-row passes of one Kronfluence scoring for 8, 32 and 300 queries, counted, not computed."""
    import datasets

    import playpen_attribution.influence as influence

    results = workdir / "results" / RUN
    rows = train.select(range(16))
    query = datasets.load_from_disk(str(results / "data/tokens/query"))
    influence.fit_factors(str(results / "adapter"), results / "data/tokens/train", workdir / "identity-factors",
                          strategy="identity", modules="lora")
    seen = {"train": 0}
    original = influence.make_task

    def counting_task(*args, **kwargs):
        task = original(*args, **kwargs)
        train_loss = task.compute_train_loss

        def compute_train_loss(batch, model, sample=False):
            seen["train"] += batch["input_ids"].shape[0]
            return train_loss(batch, model, sample)

        task.compute_train_loss = compute_train_loss
        return task

    influence.make_task = counting_task
    lines = ["| queries | query batches of 8 | passes, one per batch | passes, default |", "|---:|---:|---:|---:|"]
    for n in (8, 32, 300):
        queries = query.select([i % len(query) for i in range(n)])
        passes = []
        for per_pass in (1, None):
            seen["train"] = 0
            influence.score_pairs(str(results / "adapter"), workdir / "identity-factors", queries, rows,
                                  query_batch_size=8, query_batches_per_pass=per_pass)
            passes.append(seen["train"] / len(rows))
        lines.append(f"| {n} | {-(-n // 8)} | {passes[0]:g} | {passes[1]:g} |")
    influence.make_task = original
    return "\n".join(lines)


if __name__ == "__main__":
    main()
