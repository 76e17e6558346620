"""The if-query command-line tools, `fit-hessians` and `run-query`, on the package's functions.

Flags and defaults are the seed README's. `--model` takes a hub id or a local folder, a LoRA adapter
folder included (then the adapter's LoRA layers are tracked; otherwise the seed's MLP rule applies).
Errors print one clear line and exit with status 2; no partial CSV is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from playpen_attribution.data import DataError
from playpen_attribution.influence import PER_TOKEN_MAX_GB
from playpen_attribution.modeling import is_adapter
from playpen_attribution.stage import keep_inputs_unchanged

log = logging.getLogger("playpen_attribution")

STRATEGY_CHOICES = ["ekfac", "kfac", "diagonal"]
DTYPE_CHOICES = ["float32", "float16", "bfloat16"]
# the seed's CSVs carry only the JSON's own extra fields
SEED_EXTRA_EXCLUDED = ("content_hash",)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_dtype(dtype: str) -> None:
    """bf16 and fp16 run on a CPU only through slow reference kernels; fp16 matmuls may be missing."""
    import torch

    if dtype == "float16" and not torch.cuda.is_available():
        _fail("--dtype float16 needs a GPU; on a CPU use --dtype bfloat16 or --dtype float32")


def fit_hessians_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fit-hessians", description="Fit Hessian approximations (Kronfluence factors) "
                                "on a pre-tokenized dataset, once per model and dataset.")
    p.add_argument("--model", required=True, help="HuggingFace model name or path (a LoRA adapter folder works)")
    p.add_argument("--revision", default=None, help="Model revision (branch, tag, or commit hash)")
    p.add_argument("--hessian-dataset", required=True, help="Path to pre-tokenized HuggingFace dataset "
                   "(save_to_disk folder with input_ids, and optionally attention_mask and labels; padding on "
                   "either side is stripped, and without labels every attended token is one)")
    # beyond the seed: a DatasetDict folder's split
    p.add_argument("--split", default="train", help="Split of a DatasetDict folder (default: train)")
    p.add_argument("--output-dir", required=True, help="Output directory for factors and metadata")
    p.add_argument("--factor-batch-size", type=int, default=8, help="Batch size for covariance computation")
    p.add_argument("--lambda-batch-size", type=int, default=4, help="Batch size for lambda computation")
    p.add_argument("--strategy", default="ekfac", choices=STRATEGY_CHOICES, help="Hessian approximation strategy")
    p.add_argument("--layer-stride", type=int, default=1, help="Track every Nth layer's MLP modules")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help="Data type the model is loaded in")
    p.add_argument("--max-examples", type=int, default=None, help="Maximum number of examples to use")
    return p


def fit_hessians(argv: list[str] | None = None) -> None:
    args = fit_hessians_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    keep_inputs_unchanged()  # never write datasets' cache files into the user's dataset folder
    from playpen_attribution.influence import fit_factors

    _check_dtype(args.dtype)
    out = Path(args.output_dir)
    if out.is_dir() and set(os.listdir(out)) - {"metadata.json", "influence"}:
        _fail(f"--output-dir {out} holds other files; give an empty or new folder (it is replaced as a whole)")
    try:
        meta = fit_factors(args.model, args.hessian_dataset, out, revision=args.revision, strategy=args.strategy,
                           modules="lora" if is_adapter(args.model) else "mlp", layer_stride=args.layer_stride,
                           covariance_batch_size=args.factor_batch_size, lambda_batch_size=args.lambda_batch_size,
                           max_examples=args.max_examples, dtype=args.dtype, split=args.split)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    print(f"fitted {meta['strategy']} factors on {meta['num_examples']} examples, "
          f"{len(meta['tracked_modules'])} modules: {out}")


def run_query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run-query", description="Compute influence scores between training and "
                                "query examples with pre-computed factors.")
    p.add_argument("--model", required=True, help="HuggingFace model name or path (a LoRA adapter folder works)")
    p.add_argument("--revision", default=None, help="Model revision (branch, tag, or commit hash)")
    p.add_argument("--factors-dir", required=True, help="Directory containing pre-computed factors and metadata")
    p.add_argument("--train-json", required=True, help="Path to JSON file with training examples")
    p.add_argument("--query-json", required=True, help="Path to JSON file with query examples")
    p.add_argument("--output-dir", required=True, help="Output directory for query.csv, train.csv, influences.csv")
    p.add_argument("--per-token-scores", action="store_true", help="Include per-token influence scores in output")
    p.add_argument("--score-batch-size", type=int, default=8, help="Batch size for score computation")
    # beyond the seed: queries in batches (the seed put every query in one), Kronfluence's low-rank query gradients
    p.add_argument("--query-batch-size", type=int, default=8,
                   help="Queries per batch (each batch holds its logits and the gradients of its backward pass)")
    p.add_argument("--query-batches-per-pass", type=int, default=None,
                   help="Query batches whose preconditioned gradients are kept together while the training examples "
                        "stream past once (Kronfluence's query_gradient_accumulation_steps; default: all, one pass "
                        "over the training examples); lower it where the kept gradients do not fit")
    p.add_argument("--query-gradient-rank", type=int, default=None,
                   help="Store query gradients at this rank (Kronfluence's query_gradient_low_rank), for large models")
    p.add_argument("--per-token-max-gb", type=float, default=PER_TOKEN_MAX_GB,
                   help="Refuse per-token scores whose dense [queries, rows, tokens] array would exceed this")
    p.add_argument("--damping-factor", type=_damping, default=SEED_DAMPING, metavar="{heuristic,NUMBER}",
                   help="Damping added to the Hessian before it is inverted: a number is absolute (default 1e-8, "
                        "Kronfluence's default and the seed's, which leaves the inverse nearly undamped: on a few "
                        "thousand rows most eigenvalues are near 0, so float rounding is amplified up to 1e8 times "
                        "and scores move by a few percent with the batch size, the CPU or its BLAS); heuristic = 0.1 x "
                        "each module's mean eigenvalue (the workflow's default, attribution.kronfluence.damping_factor: "
                        "null), whose scores are the same however rows are batched, to float rounding")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help="Data type the model is loaded in")
    p.add_argument("--max-length", type=int, default=512, help="Maximum sequence length for tokenization")
    p.add_argument("--render", default="auto", choices=["auto", "plain", "chat"],
                   help="How prompt and completion become tokens: plain = prompt + completion + EOS (the seed's, "
                        "for base models); chat = the model's chat template, as the workflow trains; auto = chat "
                        "for an adapter whose manifest says it was trained on chat renderings, plain otherwise")
    return p


# Kronfluence's default absolute damping, which the seed's run-query scored with
SEED_DAMPING = 1e-8


def _damping(value: str) -> float | None:
    """`heuristic` -> None (Kronfluence's 0.1 x mean eigenvalue); otherwise a positive number."""
    if value == "heuristic":
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither 'heuristic' nor a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive (or 'heuristic')")
    return number


def resolve_render(render: str, model: str) -> str:
    """`auto`: the rendering a workflow adapter was trained on (its manifest), else the seed's plain form."""
    if render != "auto":
        return render
    manifest = Path(model) / "manifest.json"
    if is_adapter(model) and manifest.is_file():
        return json.loads(manifest.read_text()).get("render") or "plain"
    return "plain"


def tokenize_json(path: str, tokenizer, max_length: int, render: str = "plain"):
    """The rows of a train.json/query.json and their tokens in the chosen rendering."""
    from playpen_attribution.data import load_pair_json
    from playpen_attribution.tokenization import tokenize_rows

    frame = load_pair_json(path)
    rows = frame.to_dict("records")
    dataset, report = tokenize_rows(rows, tokenizer, max_length, render)
    if report["rows_skipped"]:
        ids = [s["row_id"] for s in report["rows_skipped"]]
        raise DataError(f"{path}: pair_id(s) {ids[:10]} do not fit in --max-length {max_length} even with the "
                        f"prompt cut from the left; raise --max-length")
    return rows, dataset


def run_query(argv: list[str] | None = None) -> None:
    args = run_query_parser().parse_args(argv)
    keep_inputs_unchanged()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from playpen_attribution.influence import FactorsError, check_per_token_size, score_pairs
    from playpen_attribution.modeling import load_for_attribution, load_tokenizer
    from playpen_attribution.scores import per_token_lists, query_losses
    from playpen_attribution.tables import influences_frame, rows_frame, write_csvs

    _check_dtype(args.dtype)
    try:
        train_rows, train_tokens = None, None
        tokenizer = load_tokenizer(args.model, args.revision)
        render = resolve_render(args.render, args.model)
        logging.info("rendering prompt and completion as %s", render)
        query_rows, query_tokens = tokenize_json(args.query_json, tokenizer, args.max_length, render)
        train_rows, train_tokens = tokenize_json(args.train_json, tokenizer, args.max_length, render)
        if args.per_token_scores:  # before the model is loaded
            check_per_token_size(len(query_tokens), len(train_tokens),
                                 max(len(x) for x in train_tokens["input_ids"]), args.per_token_max_gb)
        # one model for the whole call: the query losses first, then Kronfluence wraps its modules for the scores
        model = load_for_attribution(args.model, args.revision, args.dtype)
        losses = query_losses(args.model, query_tokens, revision=args.revision, dtype=args.dtype, model=model)
        result = score_pairs(args.model, args.factors_dir, query_tokens, train_tokens, revision=args.revision, model=model,
                             train_batch_size=args.score_batch_size, query_batch_size=args.query_batch_size,
                             query_gradient_rank=args.query_gradient_rank,
                             query_batches_per_pass=args.query_batches_per_pass, per_token=args.per_token_scores,
                             per_token_max_gb=args.per_token_max_gb, dtype=args.dtype,
                             damping_factor=args.damping_factor)
        query = rows_frame(query_rows, "query_id", drop=SEED_EXTRA_EXCLUDED)
        query.insert(3, "loss", losses)
        per_token = None
        if args.per_token_scores:
            per_token = per_token_lists(result["per_token"], [len(x) for x in train_tokens["input_ids"]])
        influences = influences_frame(query_tokens["row_id"], train_tokens["row_id"], result["scores"],
                                      per_token=per_token)
        out = Path(args.output_dir)
        write_csvs(query, rows_frame(train_rows, "train_id", drop=SEED_EXTRA_EXCLUDED), influences,
                   out / "query.csv", out / "train.csv", out / "influences.csv")
    except (DataError, FactorsError, FileNotFoundError, ValueError) as err:
        # ValueError: e.g. per-token scores too large, refused before any model is loaded
        _fail(str(err))
    print(f"wrote {len(influences)} influence scores to {out}")
