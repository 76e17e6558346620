"""Overhead of the workflow's Kronfluence stages against a bare Kronfluence call on the same inputs.

Three timings, each the median of --repeats runs on a run's adapter and tokens (the demo's, or with --run rehearsal
Gemma 3 1B's widths and vocabulary on real taboo transcripts, where the work dominates):
  bare        one Python process: load the adapter, fit the factors, score every query against every
              training row with Kronfluence directly (a minimal Task, the same batch sizes and modules)
  package     the same work through the package functions the rules call (fit_factors + score_shard_stage
              per shard), in one process: the wrapper's own cost (metadata, hashes, atomic writes, shards)
  workflow    `snakemake --forcerun fit_factors kronfluence_scores` on the same targets, --cores N (the bare and
              package processes get N torch threads): adds Snakemake's start-up and one Python process per job
Ratios are against `bare`, measured in one run (the machine is shared: compare ratios, not seconds).

    uv run python bench/kronfluence_overhead.py [--workdir DIR] [--strategy ekfac] [--repeats 3]
    uv run python bench/kronfluence_overhead.py --run rehearsal --stages bare,workflow --cores 2 --repeats 1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (add_run_options, bench_arguments, docs_table, print_table, run_paths, run_settings, snakemake,  # noqa: E402
                    snakemake_command, timed, use_threads)


BARE = r"""
import sys, tempfile, torch, datasets, torch.nn.functional as F
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs

adapter, train_dir, query_dir, strategy, cov_bs, lam_bs, train_bs, stride = sys.argv[1:]
model = AutoPeftModelForCausalLM.from_pretrained(adapter, attn_implementation="eager").eval()
tok = AutoTokenizer.from_pretrained(adapter)
layer = lambda n: int(n.split(".layers.")[1].split(".")[0])
tracked = [n for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n) and layer(n) % int(stride) == 0]

def loss(batch, model):
    # logits only where a completion token is predicted: Gemma 3's 262,144-word logits of every position would not fit
    keep = torch.nonzero((batch["labels"][:, 1:] != -100).any(dim=0)).flatten()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"][:, keep + 1].reshape(-1),
                           ignore_index=-100, reduction="sum")

class T(Task):
    def compute_train_loss(self, batch, model, sample=False): return loss(batch, model)
    def compute_measurement(self, batch, model): return loss(batch, model)
    def get_influence_tracked_modules(self): return tracked
    def get_attention_mask(self, batch): return batch["attention_mask"]

def collate(rows):
    w = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), w), tok.pad_token_id); mask = torch.zeros((len(rows), w), dtype=torch.long)
    labels = torch.full((len(rows), w), -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"]); ids[i, :n] = torch.tensor(r["input_ids"]); mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

train = datasets.load_from_disk(train_dir).select_columns(["input_ids", "labels"])
query = datasets.load_from_disk(query_dir).select_columns(["input_ids", "labels"])
task = T()
model = prepare_model(model, task)
with tempfile.TemporaryDirectory() as out:
    analyzer = Analyzer("bare", model=model, task=task, output_dir=out, cpu=not torch.cuda.is_available(),
                        disable_tqdm=True)
    kw = DataLoaderKwargs(collate_fn=collate, num_workers=0)
    args = FactorArguments(strategy=strategy)
    analyzer.fit_covariance_matrices("f", dataset=train, per_device_batch_size=int(cov_bs), dataloader_kwargs=kw,
                                     factor_args=args, overwrite_output_dir=True)
    analyzer.perform_eigendecomposition("f", factor_args=args, overwrite_output_dir=True)
    analyzer.fit_lambda_matrices("f", dataset=train, per_device_batch_size=int(lam_bs), dataloader_kwargs=kw,
                                 factor_args=args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("s", factors_name="f", query_dataset=query, train_dataset=train,
                                     per_device_query_batch_size=len(query),
                                     per_device_train_batch_size=int(train_bs), dataloader_kwargs=kw,
                                     overwrite_output_dir=True)
    print(tuple(analyzer.load_pairwise_scores("s")["all_modules"].shape))
"""

PACKAGE = r"""
import sys, tempfile, json
from pathlib import Path
from playpen_attribution.influence import fit_factors_stage, score_shard_stage
from playpen_attribution.settings import FactorFit, KronfluenceScoring

adapter, train_dir, query_dir, strategy, run = sys.argv[1:]
run = json.loads(run); shards = run["attribution"]["shards"]
with tempfile.TemporaryDirectory() as out:
    factors = Path(out) / "factors"
    fit_factors_stage(adapter, train_dir, factors, strategy=strategy, settings=FactorFit.from_run(run))
    for shard in range(shards):
        score_shard_stage(adapter, factors, query_dir, train_dir, Path(out) / f"shard-{shard}.npz", shard=shard,
                          shards=shards, settings=KronfluenceScoring.from_run(run))
"""


def extra(parser) -> None:
    parser.add_argument("--strategy", default="ekfac", choices=["diagonal", "kfac", "ekfac"])
    parser.add_argument("--stages", default="bare,package,workflow", help="which timings, comma-separated")
    add_run_options(parser)


def main() -> None:
    from playpen_attribution.modeling import adapter_view_with_absolute_base

    args, workdir = bench_arguments(__doc__, 3, "bench-kronfluence-", extra=extra)
    stages = args.stages.split(",")
    paths = run_paths(workdir, args.run)
    adapter, train_dir, query_dir = paths["adapter"], paths["train"], paths["query"]
    print(f"preparing the {args.run} inputs in {workdir} ...", flush=True)
    snakemake(workdir, "--cores", "2", str(adapter.relative_to(workdir)), str(train_dir.relative_to(workdir)),
              str(query_dir.relative_to(workdir)))

    settings = run_settings(args.run)
    kf = settings["kronfluence"]
    if kf["modules"] != "lora" or kf["max_examples"] or kf["fisher"] != "empirical" or kf["hessian_dataset"]:
        sys.exit("the bare baseline tracks LoRA modules with the empirical Fisher on every training row; "
                 "the run's config must use those settings for a like-for-like comparison")
    shards = settings["shards"]
    targets = [f"results/{args.run}/kronfluence/scores/{args.strategy}/shard-{i}.npz" for i in range(shards)]
    use_threads(args.cores)

    timings = {stage: [] for stage in ("bare", "package", "workflow") if stage in stages}
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        if "bare" in timings:
            # the adapter names its base relative to itself (a portable run); PEFT's loader wants a path it can open
            with adapter_view_with_absolute_base(adapter) as view:
                timings["bare"].append(timed(
                    [sys.executable, "-c", BARE, str(view), str(train_dir), str(query_dir), args.strategy,
                     str(kf["covariance_batch_size"]), str(kf["lambda_batch_size"]), str(kf["train_batch_size"]),
                     str(kf["layer_stride"])]))
        if "package" in timings:
            timings["package"].append(timed(
                [sys.executable, "-c", PACKAGE, str(adapter), str(train_dir), str(query_dir), args.strategy,
                 json.dumps({"attribution": settings})]))
        if "workflow" in timings:
            timings["workflow"].append(timed(snakemake_command(
                workdir, "--cores", str(args.cores), "--forcerun", "fit_factors", "kronfluence_scores", "--",
                *targets)))
        print({stage: round(values[-1], 1) for stage, values in timings.items()}, flush=True)

    import datasets

    n_train, n_query = len(datasets.load_from_disk(str(train_dir))), len(datasets.load_from_disk(str(query_dir)))
    with docs_table(f"kronfluence-overhead-{args.run}", args.docs):
        print_table(timings, f"{args.run} run, {n_train} training rows x {n_query} queries, strategy {args.strategy}, "
                             f"{shards} score shards, --cores {args.cores}")


if __name__ == "__main__":
    main()
