"""The memory plan: each model-holding stage's peak memory, estimated from the model's config alone (no weights),
against the memory of the device a job gets (`resources.gpu_mem_gb`).

A stage that will not fit is refused while the DAG is built, before any job runs, with the smallest change
that would make it fit. The same numbers give the jobs' `mem_mb`. The estimate is a sum of named parts, so a
reader sees what dominates: weights, LoRA weights with their gradients and Adam state, activations per batch,
logits per batch (262,144 wide for Gemma 3: usually the largest part), factors, preconditioners, per-token
arrays, and the runtime (CUDA context on a GPU; interpreter and libraries on a CPU).

Sizes come from arithmetic on the config (`linear_shapes`); `meta_device_shapes` builds the architecture on
PyTorch's meta device with PEFT's LoRA to check that arithmetic (the `memory_plan` rule does, and a test).
Everything here but `meta_device_shapes` runs without torch, so building the DAG stays fast.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from playpen_attribution.devices import visible_devices
from playpen_attribution.ensemble import run_scored_dirs, scored_training
from playpen_attribution.model_sources import read_architecture, text_config

GB = 1e9
# Resident memory of a stage's process before it holds anything of its own, measured on the CPU rehearsal
# (torch, transformers, peft, the stage's attribution library): the CPU's counterpart of the CUDA context.
RUNTIME_GB = {"cuda": 0.6, "cpu": 0.85}
# Logit-sized buffers alive at a stage's peak (the logits, the loss's log-softmax, the logits' gradient, the loss's
# temporaries), per stage family. CPU: measured on the rehearsal (bench/rehearsal.py; README); training's count is
# of the full logits TRL projected on a CPU before label_positions_only_lm_head, now of its labelled positions only.
# GPU: not measured yet (no GPU was lent), so the conservative count of four where bf16 logits are upcast for the loss.
LOGIT_COPIES = {
    "cpu": {"training": 1.5, "kronfluence": 4, "forward": 2, "bergson": 4.5},
    "cuda": {"training": 4, "kronfluence": 4, "forward": 2, "bergson": 4.5},
}
ADAM_BYTES_PER_PARAM = 16  # fp32 master weight, gradient, two moments
# Copies of the attention scores a layer holds in eager attention: the product, its scaling, the mask added, the
# softmax (the dropout of a p=0 layer returns its input).
SCORE_COPIES = 4
# Measured peak activations over the layers' saved tensors (`activation_floats`), per stage family: fitted on the
# smol run (SmolLM2-135M, 30 layers, 274-token rows: activations are most of every job there), on single steps at
# Gemma 3 1B's full depth at 240 and 1,024 tokens (bench/plan_at_length.py: training's 1.25 from smol over-estimated
# the 1,024-token step by 38%; 1.1 keeps both within 0.89-1.27) and checked on the rehearsal (Gemma 3 1B's widths,
# 2 layers: logits dominate), README "The memory plan". Kronfluence runs the model in eval mode (no LoRA dropout) and
# Bergson packs rows into token batches, each with its own temporaries.
ACTIVATION_OVERHEAD = {"training": 1.1, "kronfluence": 1.0, "bergson": 1.2}


def local_gpu_count() -> int:
    """NVIDIA GPUs this process may use, without importing torch (the devices the jobs choose from)."""
    return len(visible_devices())


def local_memory_mb() -> int:
    """This machine's memory (MB) as the local scheduler's budget: the cgroup's limit where one is set (a container,
    a SLURM allocation), else the physical memory."""
    limit = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = int(text)
            break
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(limit or physical, physical) / 1e6)


class PlanError(ValueError):
    """A stage that will not fit in the memory its job gets."""


# ---------------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------------
def architecture_file(model_cfg: dict, root: Path, base_model_dir: Path | None = None) -> Path | None:
    """The config.json the plan reads (None for a tiny model, described by its settings): a random model's
    architecture file, a local model's config, for a hub model the architecture shipped under resources/models/
    (`<name>.config.json`, so a plan needs no download) or else the downloaded one."""
    if "tiny" in model_cfg:
        return None
    if "random" in model_cfg:
        return root / model_cfg["random"]["architecture"]
    if "path" in model_cfg:
        return root / model_cfg["path"] / "config.json"
    if "package" in model_cfg:  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct.config.json
        name = model_cfg["package"]["file"].split(".")[0]
    else:
        name = model_cfg["hub"].split("/")[-1]
    shipped = root / "resources" / "models" / f"{name}.config.json"
    if shipped.is_file() or base_model_dir is None:
        return shipped
    return Path(base_model_dir) / "config.json"


def architecture_of(model_cfg: dict, config_file: str | Path | None) -> dict:
    """The config fields the plan needs: a tiny model's settings, or `config_file` (with a random model's
    layer override)."""
    if "tiny" in model_cfg:
        tiny = model_cfg["tiny"]
        heads = tiny["num_attention_heads"]
        return {"hidden_size": tiny["hidden_size"], "intermediate_size": tiny["intermediate_size"],
                "num_hidden_layers": tiny["num_layers"], "num_attention_heads": heads, "num_key_value_heads": 1,
                "head_dim": max(8, tiny["hidden_size"] // heads), "vocab_size": tiny["vocab_size"],
                "tie_word_embeddings": True}
    if not Path(config_file).is_file():
        raise PlanError(f"the memory plan needs the model's config.json, not found at {config_file}; ship it there "
                        f"(architecture only, no weights)")
    arch = read_architecture(config_file)
    if "random" in model_cfg and model_cfg["random"]["num_layers"]:
        arch["num_hidden_layers"] = model_cfg["random"]["num_layers"]
    return arch


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of one decoder layer (Gemma 3 / Llama layout)."""
    h, inter, hd = arch["hidden_size"], arch["intermediate_size"], arch["head_dim"]
    q, kv = arch["num_attention_heads"] * hd, arch["num_key_value_heads"] * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def parameter_count(arch: dict) -> int:
    # RMS norms per layer: Gemma 3 has four of the hidden state and a query and a key norm; Llama two; a final norm
    if arch.get("model_type", "gemma3_text").startswith("gemma3"):
        norms = 4 * arch["hidden_size"] + 2 * arch["head_dim"]
    else:
        norms = 2 * arch["hidden_size"]
    per_layer = sum(i * o for i, o in linear_shapes(arch).values()) + norms
    embedding = arch["vocab_size"] * arch["hidden_size"]
    return (arch["num_hidden_layers"] * per_layer + arch["hidden_size"]
            + embedding * (1 if arch["tie_word_embeddings"] else 2))


def lora_shapes(arch: dict, lora: dict, layer_stride: int = 1) -> list[tuple[int, int]]:
    """(in, out) of every LoRA A and B matrix, of the layers 0, stride, 2 stride, ..."""
    shapes = []
    for layer in range(0, arch["num_hidden_layers"], layer_stride):
        for name, (fan_in, fan_out) in linear_shapes(arch).items():
            if name in lora["target_modules"]:
                shapes += [(fan_in, lora["r"]), (lora["r"], fan_out)]
    return shapes


def meta_device_shapes(arch: dict, lora: dict) -> list[tuple[int, int]]:
    """The LoRA A/B shapes of the real architecture built on the meta device (no memory), for checking."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text_config(arch))
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                             target_modules=list(lora["target_modules"])))
    return [(m.in_features, m.out_features) for n, m in model.named_modules()
            if (".lora_A." in n or ".lora_B." in n) and isinstance(m, torch.nn.Linear)]


def factor_floats(shapes: list[tuple[int, int]], strategy: str) -> int:
    """Floats Kronfluence keeps per strategy for Linear modules of these (in, out) shapes."""
    total = 0
    for fan_in, fan_out in shapes:
        covariances = fan_in**2 + fan_out**2
        total += {"identity": 0, "diagonal": fan_in * fan_out, "kfac": 2 * covariances + fan_in + fan_out,
                  "ekfac": 2 * covariances + fan_in * fan_out}[strategy]
    return total


# ---------------------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------------------
def activation_floats(arch: dict, seq: int, lora: dict | None = None) -> int:
    """Floats one token keeps per decoder layer for the backward pass, as the layers are written (eager attention,
    which `load_causal_lm` asks for): the residual stream and the norms' inputs and outputs, the attention and MLP
    outputs (hidden-sized; Gemma 3 has four norms where Llama has two); the query before and after RoPE, keys and values
    (and RoPE's key), keys and values repeated to every query head under grouped-query attention, the attention output;
    four MLP intermediates (gate, up, the activation, their product); the attention scores through their scaling,
    mask, softmax and dropout (`SCORE_COPIES` x heads x sequence: quadratic in the length); and with LoRA dropout, its
    copy of every targeted module's input."""
    h, inter, hd = arch["hidden_size"], arch["intermediate_size"], arch["head_dim"]
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    q, kv = heads * hd, kv_heads * hd
    gemma = arch.get("model_type", "gemma3_text").startswith("gemma3")
    hidden = (12 if gemma else 8) * h
    attention = 2 * q + 3 * kv + (2 * q if kv < q else 0) + q
    mlp = 4 * inter
    scores = SCORE_COPIES * heads * seq
    dropout = 0
    if lora and lora.get("dropout", 0) > 0:
        inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": inter}
        dropout = sum(size for name, size in inputs.items() if name in lora["target_modules"])
    return hidden + attention + mlp + scores + dropout


def _activations_gb(arch: dict, tokens: int, dtype_bytes: int, seq: int, lora: dict | None = None,
                    backward: bool = True, family: str = "training") -> float:
    """What a forward pass keeps for its backward pass (or, without one, about a layer's worth at a time), times
    the stage family's measured overhead (`ACTIVATION_OVERHEAD`: the allocator's and autograd's temporaries)."""
    layers = arch["num_hidden_layers"] if backward else 1
    overhead = ACTIVATION_OVERHEAD[family] if backward else 1.0
    return tokens * activation_floats(arch, seq, lora) * dtype_bytes * layers * overhead / GB


def _logits_gb(arch: dict, positions: int, copies: int) -> float:
    return positions * arch["vocab_size"] * 4 * copies / GB


def _labelled_per_row(lengths: dict, every_turn: bool) -> int:
    """Positions with a label in one row: its completion, or with `every_turn` (`tokenization.loss_on:
    assistant_turns`) every assistant turn, which the lengths do not count (their completion is the last turn's):
    the whole row."""
    seq = lengths["longest_sequence"]
    return seq if every_turn else min(max(lengths.get("longest_completion", 32), 1), seq)


def _completion_positions(lengths: dict, batch: int, every_turn: bool = False) -> int:
    """Logit positions of a batch in Kronfluence and the query losses: `completion_loss` keeps, for every row,
    the union of the rows' labelled positions, so [batch, up to batch x labelled positions] (at most the row)."""
    return batch * min(batch * _labelled_per_row(lengths, every_turn), lengths["longest_sequence"])


def _fitting_peak(tracked: list[tuple[int, int]], strategies: list[str], base: dict, covariance_batch: dict,
                  lambda_batch: dict) -> dict:
    """The largest of Kronfluence's three fitting stages: covariances (a batch through the model), their
    eigendecomposition (covariances, eigenvectors, and float64 work for the largest module), and the
    eigenvalue corrections (eigenvectors, lambda matrices, a batch)."""
    covariances = sum(i * i + o * o for i, o in tracked) * 4 / GB
    lambdas = sum(i * o for i, o in tracked) * 4 / GB
    eigen = any(s in ("kfac", "ekfac") for s in strategies)
    stages = [{**base, "covariances": covariances if eigen else 0.0, **covariance_batch}]
    if eigen:
        largest = max(max(i, o) for i, o in tracked)
        stages.append({**base, "covariances": covariances, "eigenvectors": covariances,
                       "eigendecomposition work (float64)": 3 * largest * largest * 8 / GB})
        stages.append({**base, "eigenvectors": covariances, "lambda matrices": lambdas, **lambda_batch})
    else:
        stages.append({**base, "lambda matrices": lambdas, **lambda_batch})
    return max(stages, key=lambda parts: sum(parts.values()))


def stage_estimates(run: dict, arch: dict, lengths: dict, device: str) -> dict[str, dict[str, float]]:
    """Per job kind, the named parts of its peak memory in GB."""
    n_params = parameter_count(arch)

    def dtype_bytes(name: str) -> int:
        """bf16 where the stage asks for it (training's `auto` is bf16 on a GPU, fp32 on a CPU)."""
        return 2 if name in ("bfloat16", "bf16", "fp16", "float16") or (name == "auto" and device == "cuda") else 4

    lora = run["lora"]
    lora_params = sum(i * o for i, o in lora_shapes(arch, lora))
    runtime, copies = RUNTIME_GB[device], LOGIT_COPIES[device]
    seq = lengths["longest_sequence"]
    every_turn = run["tokenization"].get("loss_on", "last_turn") != "last_turn"
    rows_per_shard = math.ceil(lengths["train_rows"] / run["attribution"]["shards"])
    # adapters every method scores and averages: the ensemble's members at each scored epoch
    adapters = len(run_scored_dirs(run))
    train = run["training"]
    attribution = run["attribution"]
    kf, bg = attribution["kronfluence"], attribution["bergson"]
    plans: dict[str, dict[str, float]] = {}

    train_bytes = dtype_bytes(run["model"]["dtype"])

    def training_plan(batch_size: int) -> dict:
        return {"runtime": runtime, "weights": n_params * train_bytes / GB,
                "lora + gradients + Adam": lora_params * ADAM_BYTES_PER_PARAM / GB,
                "activations": _activations_gb(arch, batch_size * seq, train_bytes, seq, lora),
                # TRL's fused LM head projects each row's labelled positions only (label_positions_only_lm_head)
                "logits": _logits_gb(arch, batch_size * _labelled_per_row(lengths, every_turn), copies["training"])}

    plans["train_adapter"] = training_plan(train["batch_size"])
    plans["lds_retrain"] = plans["removal_retrain"] = plans["train_ensemble_member"] = plans["train_adapter"]
    if attribution["scoring_training"]:  # its own batch size, where it sets one
        plans["train_scoring_adapter"] = training_plan(scored_training(run)["batch_size"])

    kf_bytes = dtype_bytes(kf["dtype"])
    weights = n_params * kf_bytes / GB  # Kronfluence's stages and the query losses load the model in its dtype
    forward_only = {"runtime": runtime, "weights": weights,
                    "activations": _activations_gb(arch, 8 * seq, kf_bytes, seq, backward=False),
                    "logits": _logits_gb(arch, _completion_positions(lengths, 8, every_turn), copies["forward"])}
    plans["query_losses"] = plans["lds_losses"] = forward_only

    if any(not m.startswith("bergson_") for m in attribution["methods"]):
        tracked = lora_shapes(arch, lora, kf["layer_stride"])
        strategies = [m for m in attribution["methods"] if not m.startswith("bergson_")]
        factors = max(factor_floats(tracked, s) for s in strategies) * 4 / GB
        gradient_floats = sum(i * o for i, o in tracked)

        def batch(size: int) -> dict:
            return {"activations": _activations_gb(arch, size * seq, kf_bytes, seq, family="kronfluence"),
                    "logits": _logits_gb(arch, _completion_positions(lengths, size, every_turn),
                                         copies["kronfluence"])}

        plans["fit_factors"] = _fitting_peak(tracked, strategies, {"runtime": runtime, "weights": weights},
                                             batch(kf["covariance_batch_size"]), batch(kf["lambda_batch_size"]))
        queries = lengths["queries"]
        query_batch = min(kf["query_batch_size"] or queries, queries)
        # the preconditioned gradients of every query batch kept for one pass over the rows (all by default), at
        # the query-gradient rank where one is set, beside the batch being preconditioned
        kept = min(query_batch * (kf["query_batches_per_pass"] or math.ceil(queries / query_batch)), queries)
        rank = kf["query_gradient_rank"]
        kept_floats = sum(rank * (i + o) if rank and rank < min(i, o) else i * o for i, o in tracked)
        score = {
            "runtime": runtime, "weights": weights, "factors": factors,
            "preconditioned query gradients": (kept * kept_floats + query_batch * gradient_floats) * 4 / GB,
            "activations": _activations_gb(arch, max(kf["train_batch_size"], query_batch) * seq, kf_bytes, seq,
                                           family="kronfluence"),
            "logits": _logits_gb(arch, _completion_positions(lengths, max(kf["train_batch_size"], query_batch),
                                                             every_turn), copies["kronfluence"]),
        }
        if kf["per_token_scores"]:
            score["per-token scores"] = queries * rows_per_shard * seq * 4 * 2 / GB
        plans["kronfluence_scores"] = score
        plans["planted_kronfluence_scores"] = {k: v for k, v in score.items() if k != "per-token scores"}

    if any(m.startswith("bergson_") for m in attribution["methods"]):
        p = bg["projection_dim"]
        modules = len(lora_shapes(arch, lora))
        grad_floats = modules * p * p if p else lora_params
        bergson_bytes = dtype_bytes(bg["precision"])
        tokens = bg["token_batch_size"]  # Bergson packs rows into batches of this many tokens
        token_batch = {"runtime": runtime, "weights": n_params * bergson_bytes / GB,
                       "activations": _activations_gb(arch, tokens, bergson_bytes, min(seq, tokens), family="bergson"),
                       "logits": _logits_gb(arch, tokens, copies["bergson"])}
        preconditioner = (modules * (p * p) ** 2 * 4 / GB) if p else 0.0
        plans["bergson_query_gradients"] = {**token_batch, "gradients": lengths["queries"] * grad_floats * 4 / GB}
        plans["bergson_hessian"] = {**token_batch, "preconditioner": 2 * preconditioner}
        plans["bergson_reduce"] = {**token_batch, "preconditioner": 2 * preconditioner}
        # the index is written to disk as it is collected: the job holds the model and one token batch
        plans["bergson_index"] = plans["planted_bergson_index"] = token_batch
        # no model: the shard's index twice in fp32 (as stored, then preconditioned/normalized), the queries, the
        # preconditioner, the [queries, rows] scores and their sort
        plans["bergson_scores"] = {"runtime": runtime, "preconditioner": 2 * preconditioner,
                                   "index": 2 * rows_per_shard * grad_floats * 4 / GB,
                                   "query gradients": 2 * lengths["queries"] * grad_floats * 4 / GB,
                                   "scores": 3 * lengths["queries"] * rows_per_shard * 8 / GB}
        plans["planted_bergson_scores"] = plans["bergson_scores"]
        if "bergson_trackstar" in attribution["methods"]:
            # TrackStar's gradient space: the same collections, holding the adapter's Adam second moments (fp32)
            moments = {"Adam second moments": lora_params * 4 / GB}
            for job in ("bergson_query_gradients", "bergson_hessian", "bergson_index"):
                plans[job.replace("bergson_", "bergson_adam_")] = {**plans[job], **moments}
            plans["planted_bergson_adam_index"] = plans["bergson_adam_index"]
            plans["bergson_reduce"] = {**plans["bergson_reduce"], **moments}
        if "bergson_trak" in attribution["methods"]:
            # one model at a time; TRAK's global projection (one module's matrix at a time), its Gram and the inverse
            # (float64 eigendecomposition), and every row's scores against every query, for each member and averaged
            trak_dim = bg["trak_projection_dim"]
            scored_rows = lengths["train_rows"] + lengths["queries"]  # planted copies: at most one per query
            plans["bergson_trak"] = {
                **token_batch,
                "projection": max(i * o for i, o in lora_shapes(arch, lora)) * trak_dim * 4 / GB,
                "Gram and its inverse": trak_dim * trak_dim * (4 + 3 * 8) / GB,
                "scores": (adapters + 2) * lengths["queries"] * scored_rows * 8 / GB,
                # the 1 - p pass: a batch's float32 logits and their log-softmax over the whole vocabulary, planned
                # beside the gradient pass's peak (measured on smol: 8.3 GB, above either pass alone)
                "1 - p logits": 2 * _logits_gb(arch, bg["trak_loss_batch_size"] * seq, 1),
            }
    if adapters > 1 and any(m != "bergson_trak" for m in attribution["methods"]):
        # no model: the members' mean of one shard (any method but TRAK) holds the running sum and one member's
        # arrays: the scores in float64, Kronfluence's per-token scores as stored
        plans["ensemble_mean_scores"] = {
            "runtime": runtime, "scores": 2 * lengths["queries"] * rows_per_shard * 8 / GB,
            **{k: v for k, v in plans.get("kronfluence_scores", {}).items() if k == "per-token scores"}}
    return plans


def _jobs(run: dict, arch: dict, lengths: dict, device: str, limit_gb: float | None) -> dict:
    jobs = {}
    for job, parts in stage_estimates(run, arch, lengths, device).items():
        total = sum(parts.values())
        jobs[job] = {"parts_gb": {k: round(v, 4) for k, v in parts.items()}, "total_gb": round(total, 4)}
        if limit_gb is not None:
            jobs[job]["fits"] = total <= limit_gb
    return jobs


def build_plan(run: dict, arch: dict, lengths: dict, gpu_mem_gb: float) -> dict:
    """The plan of one run: every job kind's parts and total (GB) on a GPU of `gpu_mem_gb` (`jobs`, the check),
    and the same stages run on a CPU (`cpu_jobs`: fp32, the process's resident memory; the jobs' mem_mb)."""
    return {"device": "cuda", "device_memory_gb": gpu_mem_gb, "parameters": parameter_count(arch),
            "layers": arch["num_hidden_layers"], "vocab_size": arch["vocab_size"], "lengths": lengths,
            "jobs": _jobs(run, arch, lengths, "cuda", gpu_mem_gb), "cpu_jobs": _jobs(run, arch, lengths, "cpu", None)}


BATCH_LEVER = {
    "train_adapter": "lower training.batch_size (raise training.gradient_accumulation to keep the step)",
    "lds_retrain": "lower training.batch_size (raise training.gradient_accumulation to keep the step)",
    "removal_retrain": "lower training.batch_size (raise training.gradient_accumulation to keep the step)",
    "train_scoring_adapter": "lower attribution.scoring_training.batch_size (raise its gradient_accumulation to keep "
                             "the step)",
    "fit_factors": "lower attribution.kronfluence.covariance_batch_size (and lambda_batch_size)",
    "kronfluence_scores": "lower attribution.kronfluence.train_batch_size and query_batch_size",
    "planted_kronfluence_scores": "lower attribution.kronfluence.train_batch_size and query_batch_size",
}


def smallest_fix(job: str, plan: dict, run: dict) -> str:
    """The setting that shrinks the job's largest part."""
    parts = plan["jobs"][job]["parts_gb"]
    largest = max(parts, key=parts.get)
    kf, bg = run["attribution"]["kronfluence"], run["attribution"]["bergson"]
    if largest in ("logits", "activations"):
        lever = BATCH_LEVER.get(job, "lower attribution.bergson.token_batch_size")
    else:
        lever = {
            "factors": f"raise attribution.kronfluence.layer_stride (now {kf['layer_stride']}) or use diagonal",
            "covariances": f"raise attribution.kronfluence.layer_stride (now {kf['layer_stride']})",
            "eigenvectors": f"raise attribution.kronfluence.layer_stride (now {kf['layer_stride']})",
            "eigendecomposition work (float64)": f"raise attribution.kronfluence.layer_stride (now {kf['layer_stride']})",
            "preconditioner": f"lower attribution.bergson.projection_dim (now {bg['projection_dim']})",
            "per-token scores": "turn off attribution.kronfluence.per_token_scores or raise attribution.shards",
            "preconditioned query gradients": "set attribution.kronfluence.query_batches_per_pass (query batches "
                                              "kept per pass over the training rows; each more pass costs one "
                                              "more gradient pass) or query_gradient_rank",
        }.get(largest, "a larger GPU (resources.gpu_mem_gb) or a smaller model")
    return f"{lever} (largest part: {largest} {parts[largest]:.1f} GB)"


def check_plan(plan: dict, run: dict, run_name: str) -> None:
    too_big = [job for job, stage in plan["jobs"].items() if not stage["fits"]]
    lines = [f"{job}: {plan['jobs'][job]['total_gb']:.1f} GB > resources.gpu_mem_gb "
             f"{plan['device_memory_gb']:g} GB; {smallest_fix(job, plan, run)}" for job in too_big]
    per_token = plan["jobs"].get("kronfluence_scores", {}).get("parts_gb", {}).get("per-token scores", 0) / 2
    limit = run["attribution"]["kronfluence"]["per_token_max_gb"]
    if per_token > limit:
        lines.append(f"kronfluence_scores: per-token scores of one shard take {per_token:.1f} GB > "
                     f"attribution.kronfluence.per_token_max_gb {limit:g}; turn off "
                     f"attribution.kronfluence.per_token_scores or raise attribution.shards")
    if lines:
        raise PlanError(f"run {run_name}: the memory plan says these stages will not fit:\n  " + "\n  ".join(lines)
                        + f"\n(runs.{run_name}; the whole plan: results/{run_name}/plan.txt or the dry run's output)")


def format_plan(plan: dict, run_name: str) -> str:
    lines = [f"Memory plan of run {run_name}: {plan['parameters'] / 1e6:.0f}M parameters, {plan['layers']} layers, "
             f"vocabulary {plan['vocab_size']:,}; longest sequence {plan['lengths']['longest_sequence']} tokens "
             f"({plan['lengths']['source']}); device {plan['device']} with {plan['device_memory_gb']:g} GB",
             f"{'job':<28} {'GPU GB':>7}  {'fits':<4}  {'CPU GB':>7}  largest parts (GPU)"]
    for job, stage in plan["jobs"].items():
        parts = sorted(stage["parts_gb"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"{job:<28} {stage['total_gb']:>7.2f}  {'yes' if stage['fits'] else 'NO':<4}  "
                     f"{plan['cpu_jobs'][job]['total_gb']:>7.2f}  " + ", ".join(f"{k} {v:.2f}" for k, v in parts))
    return "\n".join(lines)


def lengths_of(run: dict, train_tokens_dir: Path | None, query_tokens_dir: Path | None) -> dict:
    """Row counts and longest sequence: from the tokenized data where it exists, else the config's limits (and
    the taboo run's expected size) as the worst case."""
    from playpen_attribution.tokenization import read_tokens_report

    reports = [r for r in (read_tokens_report(d) for d in (train_tokens_dir, query_tokens_dir) if d) if r]
    if len(reports) == 2:
        train, query = reports
        return {"source": "tokenized data", "train_rows": train["rows_tokenized"], "queries": query["rows_tokenized"],
                "longest_sequence": max(train["longest_sequence"], query["longest_sequence"]),
                "longest_completion": max(train.get("longest_completion", 32), query.get("longest_completion", 32))}
    max_rows = run["data"]["max_rows"]
    return {"source": "config limits (data not tokenized yet)", "train_rows": max_rows["train"] or 2000,
            "queries": max_rows["query"] or 300, "longest_sequence": run["tokenization"]["max_length"],
            "longest_completion": 32}


def write_plan(plan: dict, run_name: str, out_txt, out_json) -> None:
    from playpen_attribution.io import atomic_path, write_json_atomic

    write_json_atomic(plan, out_json)
    with atomic_path(out_txt) as tmp:
        Path(tmp).write_text(format_plan(plan, run_name) + "\n")


def plan_stage(run: dict, run_name: str, arch: dict, lengths: dict, gpu_mem_gb: float, out_txt, out_json) -> None:
    """Rule `memory_plan`: the plan checked against the meta-device architecture, written as text and JSON."""
    meta = sorted(meta_device_shapes(arch, run["lora"]))
    if meta != sorted(lora_shapes(arch, run["lora"])):
        raise PlanError(f"the plan's layer arithmetic does not match the architecture built on the meta device "
                        f"({len(meta)} LoRA matrices there); this model family needs its own linear_shapes")
    plan = build_plan(run, arch, lengths, gpu_mem_gb)
    write_plan(plan, run_name, out_txt, out_json)
