"""A training job's time with TRL's fused LM head projecting every position (TRL's default off CUDA and XPU) and
only the labelled ones (`label_positions_only_lm_head`, what `train_adapter` does), back to back in one process,
and whether the two trainings end with the same weights.

Each repeat trains one epoch of the run's LoRA settings on the first `--rows` training rows of the run's own
tokens and base model (built in --workdir first: for smol the GGUF's conversion and the tokenization), once each
way, alternating so that a host slowing down mid-run hits both. The time is `train_adapter`'s whole call (model
load and adapter writing included), the same work a retrain job does per subset.

    uv run python bench/training_step.py --run smol [--rows 16] [--repeats 2] [--workdir DIR] [--docs]
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, bench_arguments, docs_table, machine_line, snakemake  # noqa: E402


def extra(parser):
    parser.add_argument("--run", default="smol", help="the run whose base model, tokens and LoRA settings are used")
    parser.add_argument("--rows", type=int, default=16, help="training rows per training (one epoch)")


def main() -> None:
    args, workdir = bench_arguments(__doc__, repeats=2, prefix="training-step-", extra=extra)
    import dataclasses

    import datasets
    import torch
    from safetensors.torch import load_file

    from playpen_attribution import training as training_module
    from playpen_attribution.config import load_config, run_config
    from playpen_attribution.settings import Lora, Training
    from playpen_attribution.training import label_positions_only_lm_head, train_adapter

    results = workdir / "results" / args.run
    snakemake(workdir, "--cores", "2", str(results.relative_to(workdir) / "base_model"),
              str(results.relative_to(workdir) / "data/tokens/train"))
    run = run_config(load_config(REPO / "config" / "config.yaml"), args.run)
    lora, training = Lora.from_run(run), dataclasses.replace(Training.from_run(run), epochs=1)
    rows = workdir / "bench-training-step" / "tokens"
    shutil.rmtree(rows.parent, ignore_errors=True)
    tokens = datasets.load_from_disk(str(results / "data/tokens/train"))
    subset = tokens.select(range(min(args.rows, len(tokens))))
    subset.save_to_disk(str(rows))
    labelled = sum(sum(1 for t in labels if t != -100) for labels in subset["labels"])
    positions = sum(len(ids) for ids in subset["input_ids"])

    ways = {"every position (TRL's CPU default)": contextlib.nullcontext,
            "labelled positions only": label_positions_only_lm_head}
    seconds = {way: [] for way in ways}
    weights = {}
    for repeat in range(args.repeats):
        for way, block in ways.items():
            training_module.label_positions_only_lm_head = block
            out = rows.parent / f"adapter-{len(weights)}"
            start = time.perf_counter()
            train_adapter(results / "base_model", rows, out, lora=lora, training=training,
                          max_length=run["tokenization"]["max_length"], dtype="float32")
            seconds[way].append(time.perf_counter() - start)
            weights.setdefault(way, load_file(out / "adapter_model.safetensors"))
            shutil.rmtree(out)
    training_module.label_positions_only_lm_head = label_positions_only_lm_head
    first, second = weights.values()
    same = first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    with docs_table("training-step", args.docs):
        print(f"{machine_line()}")
        print(f"`uv run python bench/training_step.py --run {args.run} --rows {args.rows} --repeats {args.repeats}`: "
              f"one epoch on {args.rows} rows ({positions} token positions, {labelled} of them labelled), "
              f"batch {training.batch_size}, LoRA r {lora.r}, fp32, torch threads {torch.get_num_threads()}")
        print()
        print("| LM head projects | train_adapter s (min / median / max) | ratio to every position (median) |")
        print("|---|---|---:|")
        base = statistics.median(seconds[next(iter(ways))])
        for way, times in seconds.items():
            print(f"| {way} | {min(times):.1f} / {statistics.median(times):.1f} / {max(times):.1f} | "
                  f"{statistics.median(times) / base:.2f} |")
        print()
        print(f"Trained weights bit-identical both ways: {same}.")


if __name__ == "__main__":
    main()
