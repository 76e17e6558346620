"""The memory plan against measured peaks at Gemma 3 1B's full depth: 26 layers (random weights, the published
widths and 262,144-word vocabulary), rows of 240 and 1,024 tokens cut from the real taboo transcripts, batch 1 and
2, fp32, on this machine's CPU. Three stages, each a fresh process running the package function its rule runs:

  train_adapter       one optimizer step of TRL's SFTTrainer (LoRA r16 on every projection, dropout 0.05, the loss
                      on the last COMPLETION_TOKENS tokens of each row, as the taboo run)
  fit_factors         EK-FAC: covariances, eigendecomposition and eigenvalue corrections over `batch` rows in one batch
                      (Kronfluence on the LoRA layers of layer 0: layer_stride 26 keeps the eigendecomposition to
                      one 6,912-wide factor, minutes on 2 cores; every layer's activations are kept all the same,
                      since the backward pass reaches layer 0 through all 26)
  kronfluence_scores  one query against `batch` training rows in one batch, from those factors

Peak = the process's getrusage maximum (MiB); plan = `plan.stage_estimates` for the same settings and lengths
(GB x 1000, as bench/rehearsal.py compares them). A case whose plan exceeds --max-gb is not run (it would not fit
this machine), and its plan is printed beside "not run".

    uv run python bench/plan_at_length.py [--workdir DIR] [--lengths 240 1024] [--batches 1 2] [--stages ...] [--docs]

A benchmark, not a test: about half an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line, write_docs_table  # noqa: E402

ARCHITECTURE = REPO / "resources/models/gemma-3-1b-it.config.json"
SOURCE = {"kind": "playpen", "path": str(REPO / "resources/real-taboo/playpen-real"), "name": "interactions"}
COMPLETION_TOKENS = 16
LAYER_STRIDE = 26
STAGES = ("train_adapter", "fit_factors", "kronfluence_scores")

LORA = {"r": 16, "alpha": 32, "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def training(batch: int) -> dict:
    return {"epochs": 1, "learning_rate": 2e-4, "batch_size": batch, "gradient_accumulation": 1, "warmup_ratio": 0.0,
            "weight_decay": 0.0, "lr_scheduler": "linear", "seed": 0, "logging_steps": 1}


def kronfluence_scoring(batch: int) -> dict:
    return {"train_batch_size": batch, "query_batch_size": 1, "query_gradient_rank": None,
            "query_batches_per_pass": None, "per_token_scores": False, "per_token_max_gb": 4, "dtype": "float32",
            "damping_factor": None}


# What one measuring process runs: the stage's package function, then its own peak on the last line.
STEP = r"""
import json, resource, sys
from pathlib import Path
stage, args = sys.argv[1], json.loads(sys.argv[2])
if stage == "train_adapter":
    from playpen_attribution.settings import Lora, Training
    from playpen_attribution.training import train_adapter
    train_adapter(args["model"], args["train"], args["out"], lora=Lora(**{**args["lora"],
                  "target_modules": tuple(args["lora"]["target_modules"])}), training=Training(**args["training"]),
                  max_length=args["length"], dtype="auto")
elif stage == "fit_factors":
    from playpen_attribution.influence import fit_factors
    fit_factors(args["adapter"], args["train"], args["out"], strategy="ekfac", modules="lora",
                layer_stride=args["layer_stride"], covariance_batch_size=args["batch"], lambda_batch_size=args["batch"])
else:
    from playpen_attribution.influence import score_shard_stage
    from playpen_attribution.settings import KronfluenceScoring
    score_shard_stage(args["adapter"], args["factors"], args["query"], args["train"], args["out"], shard=0, shards=1,
                      settings=KronfluenceScoring(**args["scoring"]))
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_inputs(workdir: Path, lengths: list[int], batches: list[int]) -> None:
    """The 26-layer random model (once) and, per length, token folders of 1..max(batches) training rows and one query,
    each row exactly `length` tokens of consecutive transcript text."""
    import datasets

    from playpen_attribution.model_sources import build_random_model, corpus_from_source
    from playpen_attribution.modeling import load_tokenizer

    texts = corpus_from_source(SOURCE)
    model_dir = workdir / "model"
    if not model_dir.exists():
        print("building the 26-layer random model ...", flush=True)
        build_random_model(texts, model_dir, architecture=ARCHITECTURE, num_layers=None, tokenizer_vocab_size=4096)
    tokenizer = load_tokenizer(model_dir)
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    for length in lengths:
        rows = []
        for i in range(max(batches) + 1):
            ids = [tokenizer.bos_token_id] + stream[i * length:(i + 1) * length - 1]
            assert len(ids) == length, "the transcripts are too short for these rows"
            rows.append({"row_id": f"row-{length}-{i}", "input_ids": ids, "attention_mask": [1] * length,
                         "labels": [-100] * (length - COMPLETION_TOKENS) + ids[-COMPLETION_TOKENS:]})
        datasets.Dataset.from_list(rows[:1]).save_to_disk(str(workdir / f"tokens-{length}" / "query"))
        for batch in batches:
            folder = workdir / f"tokens-{length}" / f"train-{batch}"
            if not folder.exists():
                datasets.Dataset.from_list(rows[1:1 + batch]).save_to_disk(str(folder))


def measure(stage: str, args: dict, threads: int) -> tuple[float | None, float]:
    """(peak MiB, wall s) of one stage in a fresh process; no peak where the process failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STEP, stage, json.dumps(args)], capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:  # (-9: killed, most likely by the kernel's OOM killer)
        print(f"{stage} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None, wall
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"], wall


def planned_mb(length: int, batch: int) -> dict[str, float]:
    from playpen_attribution.config import load_config, run_config
    from playpen_attribution.model_sources import read_architecture
    from playpen_attribution.plan import stage_estimates

    run = run_config(load_config(REPO / "config" / "config.yaml"), "rehearsal")
    run["model"] = {"random": {"architecture": str(ARCHITECTURE)}, "dtype": "auto"}
    run["lora"] = LORA
    run["training"] = {**run["training"], **training(batch)}
    run["attribution"]["methods"] = ["ekfac"]
    run["attribution"]["shards"] = 1
    run["attribution"]["kronfluence"].update(covariance_batch_size=batch, lambda_batch_size=batch,
                                             layer_stride=LAYER_STRIDE, **kronfluence_scoring(batch))
    lengths = {"train_rows": batch, "queries": 1, "longest_sequence": length,
               "longest_completion": COMPLETION_TOKENS}
    estimates = stage_estimates(run, read_architecture(ARCHITECTURE), lengths, "cpu")
    return {stage: sum(estimates[stage].values()) * 1000 for stage in STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--lengths", type=int, nargs="+", default=[240, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-gb", type=float, default=21.0,
                        help="cases whose plan exceeds this are not run (default: this machine's 24 GB less a margin)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="measure only these (the Kronfluence stages score the first training case's adapter: "
                             "without train_adapter, a --workdir that holds it)")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="plan-at-length-"))
    build_inputs(workdir, args.lengths, args.batches)

    # one adapter for every Kronfluence case: the first training case's (one step; its values do not change what a
    # stage holds)
    adapter = workdir / "out" / f"train_adapter-{args.lengths[0]}-{args.batches[0]}"
    rows = []
    for length in args.lengths:
        tokens = workdir / f"tokens-{length}"
        for batch in args.batches:
            plan = planned_mb(length, batch)
            for stage in args.stages:
                out = workdir / "out" / f"{stage}-{length}-{batch}"
                case = {"model": str(workdir / "model"), "train": str(tokens / f"train-{batch}"), "length": length,
                        "batch": batch, "lora": LORA, "training": training(batch), "layer_stride": LAYER_STRIDE,
                        "scoring": kronfluence_scoring(batch), "query": str(tokens / "query"),
                        "adapter": str(adapter), "factors": str(workdir / "out" / f"fit_factors-{length}-{batch}"),
                        "out": str(out) + (".npz" if stage == "kronfluence_scores" else "")}
                if plan[stage] > args.max_gb * 1000:
                    rows.append((stage, length, batch, None, None, plan[stage]))
                    print(f"{stage} {length} tokens x {batch}: not run, plan {plan[stage]:.0f} MB", flush=True)
                    continue
                peak, wall = measure(stage, case, args.threads)
                rows.append((stage, length, batch, peak, wall, plan[stage]))
                print(f"{stage} {length} tokens x {batch}: peak {peak} MiB, plan {plan[stage]:.0f} MB, "
                      f"{wall:.0f} s", flush=True)
    table = format_table(rows, args)
    print("\n" + table)
    (workdir / "plan_at_length.json").write_text(json.dumps(rows, indent=1))
    if args.docs:
        write_docs_table("plan-at-length-table", table)


def format_table(rows, args) -> str:
    measured = [plan / peak for _, _, _, peak, _, plan in rows if peak]
    lines = [f"{machine_line()}, {time.strftime('%Y-%m-%d')}",
             f"`uv run python bench/plan_at_length.py --lengths {' '.join(map(str, args.lengths))} "
             f"--batches {' '.join(map(str, args.batches))}"
             + (f" --stages {' '.join(args.stages)}" if list(args.stages) != list(STAGES) else "") + "`", "",
             "| stage | tokens | batch | wall s | peak MB | plan MB | plan / peak |", "|---|---:|---:|---:|---:|---:|---:|"]
    for stage, length, batch, peak, wall, plan in rows:
        if wall is None:
            lines.append(f"| {stage} | {length} | {batch} | not run | | {plan:.0f} | |")
        elif peak is None:
            lines.append(f"| {stage} | {length} | {batch} | {wall:.0f} | failed | {plan:.0f} | |")
        else:
            lines.append(f"| {stage} | {length} | {batch} | {wall:.0f} | {peak:.0f} | {plan:.0f} | "
                         f"{plan / peak:.2f} |")
    if measured:
        lines += ["", f"Plan / peak over the {len(measured)} measured cases: {min(measured):.2f} to "
                      f"{max(measured):.2f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
