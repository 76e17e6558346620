"""The memory plan: its layer arithmetic against the architecture built on the meta device, printed by a dry run,
the source of mem_mb, and a stage that will not fit refused before any job runs, with the change that would fit."""

import json
import math
import re

import pytest
import yaml

from playpen_attribution.config import load_config
from playpen_attribution.plan import (
    PlanError,
    architecture_file,
    architecture_of,
    build_plan,
    check_plan,
    lengths_of,
    lora_shapes,
    meta_device_shapes,
    parameter_count,
)

from conftest import REPO, snakemake

CONFIG = load_config(REPO / "config" / "config.yaml")


def arch_of(run: str) -> dict:
    model = CONFIG["runs"][run]["model"]
    return architecture_of(model, architecture_file(model, REPO))


@pytest.mark.parametrize("run", ["rehearsal", "taboo", "demo", "smol"])
def test_layer_arithmetic_equals_the_architecture_on_the_meta_device(run):
    import torch
    from transformers import AutoModelForCausalLM

    from playpen_attribution.model_sources import text_config

    cfg = CONFIG["runs"][run]
    arch = arch_of(run)
    assert sorted(meta_device_shapes(arch, cfg["lora"])) == sorted(lora_shapes(arch, cfg["lora"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text_config(arch))
    assert parameter_count(arch) == sum(p.numel() for p in model.parameters())


def test_the_plans_llama_arithmetic_is_smollm2s_real_config(smol_model_dir):
    """The smol run's plan reads the architecture shipped under resources/models; it must be the converted model's
    own config, and the plan's parameter count the real model's."""
    from playpen_attribution.model_sources import read_architecture

    arch, real = arch_of("smol"), read_architecture(smol_model_dir / "config.json")
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
    assert {k: arch[k] for k in keys} == {k: real[k] for k in keys}
    assert parameter_count(arch) == 134_515_008  # the converted model's (source.json, counted by torch)


def test_gemma3_1b_shapes_are_the_published_ones():
    arch = arch_of("taboo")
    assert (arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["num_attention_heads"],
            arch["num_key_value_heads"], arch["head_dim"], arch["vocab_size"]) == (1152, 6912, 26, 4, 1, 256, 262144)
    # 26 layers with 1.0B parameters (the embedding alone is 302M); the rehearsal keeps 2 of them
    assert round(parameter_count(arch) / 1e9, 1) == 1.0
    assert arch_of("rehearsal")["num_hidden_layers"] == 2


def test_a_stage_that_does_not_fit_is_refused_with_the_smallest_change():
    run = CONFIG["runs"]["taboo"]
    plan = build_plan(run, arch_of("taboo"), lengths_of(run, None, None), gpu_mem_gb=16)
    assert not plan["jobs"]["fit_factors"]["fits"] and plan["jobs"]["query_losses"]["fits"]
    with pytest.raises(PlanError, match=r"train_adapter: \d+\.\d GB > resources.gpu_mem_gb 16 GB; lower "
                                        r"training.batch_size .*\(largest part: activations 18.1 GB\)"):
        check_plan(plan, run, "taboo")
    # at 1,024 tokens the activations (26 layers, eager attention's scores quadratic in the length) are most of it;
    # TRL's fused LM head projects only the labelled positions: 4 copies of [batch 4 x 32 completion tokens, 262,144]
    # in fp32, not of [4, 1,024, 262,144] (17.2 GB)
    assert plan["jobs"]["train_adapter"]["parts_gb"]["logits"] == pytest.approx(4 * 4 * 32 * 262144 * 4 / 1e9,
                                                                               rel=1e-3)
    assert build_plan(run, arch_of("taboo"), lengths_of(run, None, None), gpu_mem_gb=24)["jobs"]["train_adapter"][
        "fits"]
    # every assistant turn labelled: the lengths count only the last turn's tokens, so every position is planned
    every_turn = {**run, "tokenization": {**run["tokenization"], "loss_on": "assistant_turns"}}
    every_turn_plan = build_plan(every_turn, arch_of("taboo"), lengths_of(run, None, None), gpu_mem_gb=80)["jobs"]
    assert every_turn_plan["train_adapter"]["parts_gb"]["logits"] == pytest.approx(4 * 4 * 1024 * 262144 * 4 / 1e9,
                                                                                 rel=1e-3)
    # and Kronfluence's completion_loss keeps every labelled position of the batch: all of them
    assert every_turn_plan["query_losses"]["parts_gb"]["logits"] == pytest.approx(2 * 8 * 1024 * 262144 * 4 / 1e9,
                                                                                rel=1e-3)


def test_dry_run_prints_the_plan_takes_mem_mb_from_it_and_refuses_what_will_not_fit(tmp_path):
    from playpen_attribution.plan import local_memory_mb

    # run here, no job may ask for more than this machine's memory (Snakemake's local mem_mb budget)
    local = snakemake(tmp_path, "results/taboo/influences.csv", "-n")
    job = local.stdout.split("rule train_adapter:")[1].split("rule ")[0]
    assert f"mem_mb={min(local_memory_mb(), 32000)}," in job
    proc = snakemake(tmp_path, "results/taboo/influences.csv", "-n", "--resources", "mem_mb=1000000")
    assert "Memory plan of run taboo: 1000M parameters, 26 layers, vocabulary 262,144" in proc.stderr
    run = CONFIG["runs"]["taboo"]
    plan = build_plan(run, arch_of("taboo"), lengths_of(run, None, None), 80)
    for rule, floor in (("train_adapter", run["resources"]["train_mem_mb"]),
                        ("fit_factors", run["attribution"]["score_mem_mb"])):
        job = proc.stdout.split(f"rule {rule}:")[1].split("rule ")[0]
        estimate = math.ceil(plan["cpu_jobs"][rule]["total_gb"] * 1.2 * 1000)
        assert f"mem_mb={max(estimate, floor)}," in job, rule
    # the fit is the job the plan raises above the configured floor
    assert math.ceil(plan["cpu_jobs"]["fit_factors"]["total_gb"] * 1.2 * 1000) > run["attribution"]["score_mem_mb"]
    small = tmp_path / "small-gpu.yaml"
    small.write_text(yaml.safe_dump({"runs": {"taboo": {"resources": {"gpu_mem_gb": 16}}}}))
    # a real run (not a dry run) is refused while the DAG is built: no job runs (the first would be the download)
    refused = snakemake(tmp_path, "results/taboo/influences.csv", "--configfile", str(small), check=False)
    assert refused.returncode != 0
    assert "the memory plan says these stages will not fit" in refused.stdout + refused.stderr
    assert re.search(r"fit_factors: [\d.]+ GB > resources.gpu_mem_gb 16 GB; lower "
                     r"attribution.kronfluence.covariance_batch_size", refused.stdout + refused.stderr)
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
    assert "Job stats" not in refused.stdout


def test_local_gpus_are_counted_from_the_environment_or_nvidia_smi(tmp_path, monkeypatch):
    from playpen_attribution.plan import local_gpu_count

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert local_gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # set and empty: CUDA sees no device
    assert local_gpu_count() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-2)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert local_gpu_count() == 2
    monkeypatch.setenv("PATH", "/nonexistent")
    assert local_gpu_count() == 0


def test_kept_query_gradients_are_planned_and_refused_naming_the_queries_kept_per_pass():
    """One pass over the training rows keeps every query's preconditioned gradient: with many queries that is the
    score job's largest part, and the plan names query_batches_per_pass (or the rank) as the fix."""
    import copy

    from playpen_attribution.plan import lora_shapes, smallest_fix

    run = copy.deepcopy(CONFIG["runs"]["taboo"])
    arch = arch_of("taboo")
    lengths = {"source": "test", "train_rows": 2000, "queries": 5000, "longest_sequence": 240, "longest_completion": 8}
    floats = sum(i * o for i, o in lora_shapes(arch, run["lora"], run["attribution"]["kronfluence"]["layer_stride"]))
    plan = build_plan(run, arch, lengths, gpu_mem_gb=40)
    batch = run["attribution"]["kronfluence"]["query_batch_size"]
    kept = plan["jobs"]["kronfluence_scores"]["parts_gb"]["preconditioned query gradients"]
    assert kept == pytest.approx((5000 + batch) * floats * 4 / 1e9, rel=1e-3)  # all queries, and the batch at work
    assert not plan["jobs"]["kronfluence_scores"]["fits"]
    assert smallest_fix("kronfluence_scores", plan, run).startswith("set attribution.kronfluence.query_batches_per_pass")
    run["attribution"]["kronfluence"]["query_batches_per_pass"] = 200 // batch  # 200 queries per pass: 25 passes
    plan = build_plan(run, arch, lengths, gpu_mem_gb=40)
    assert plan["jobs"]["kronfluence_scores"]["parts_gb"]["preconditioned query gradients"] == pytest.approx(
        (200 + batch) * floats * 4 / 1e9, rel=1e-3)
    assert plan["jobs"]["kronfluence_scores"]["fits"]


def test_an_ensembles_mean_is_planned_for_its_per_token_scores():
    """The members' mean of a shard holds the running sum and one member's arrays: with per-token scores that is the
    score job's own per-token part (two copies of a shard's array), which resources.table_mem_mb alone would miss."""
    import copy

    run = copy.deepcopy(CONFIG["runs"]["taboo"])
    arch = arch_of("taboo")
    # shards of 2,000 rows x 2,000 queries x 240 tokens: 3.84 GB of per-token scores, under per_token_max_gb (4)
    lengths = {"source": "test", "train_rows": 4000, "queries": 2000, "longest_sequence": 240, "longest_completion": 8}
    run["attribution"]["kronfluence"]["per_token_scores"] = True
    run["attribution"]["shards"] = 2
    run["attribution"]["ensemble"] = 1
    assert "ensemble_mean_scores" not in build_plan(run, arch, lengths, gpu_mem_gb=80)["cpu_jobs"]
    run["attribution"]["ensemble"] = 3
    plan = build_plan(run, arch, lengths, gpu_mem_gb=80)
    mean = plan["cpu_jobs"]["ensemble_mean_scores"]["parts_gb"]
    assert mean["per-token scores"] == pytest.approx(2 * 2000 * 2000 * 240 * 4 / 1e9, rel=1e-3)
    assert mean["per-token scores"] == plan["cpu_jobs"]["kronfluence_scores"]["parts_gb"]["per-token scores"]
    assert mean["scores"] == pytest.approx(2 * 2000 * 2000 * 8 / 1e9, rel=1e-3)
    check_plan(plan, run, "taboo")  # within the per-token limit: accepted
    assert plan["cpu_jobs"]["ensemble_mean_scores"]["total_gb"] * 1000 > run["resources"]["table_mem_mb"]
    # Bergson variants alone average their members' shards too (scores, no per-token part); TRAK alone, in its job
    run["attribution"]["methods"] = ["bergson_cosine_mixed"]
    mean = build_plan(run, arch, lengths, gpu_mem_gb=80)["cpu_jobs"]["ensemble_mean_scores"]["parts_gb"]
    assert set(mean) == {"runtime", "scores"} and mean["scores"] == pytest.approx(2 * 2000 * 2000 * 8 / 1e9, rel=1e-3)
    run["attribution"]["methods"] = ["bergson_trak"]
    assert "ensemble_mean_scores" not in build_plan(run, arch, lengths, gpu_mem_gb=80)["cpu_jobs"]


def test_trak_plans_its_1_minus_p_pass_over_the_whole_vocabulary():
    """TRAK's weights come from a forward pass over batches of attribution.bergson.trak_loss_batch_size rows whose
    float32 logits and log-softmax span the vocabulary: on Gemma 3's 262,144 tokens, Bergson's default of 32 rows of
    512 tokens would hold 34 GB; the plan says so and the smaller batch fits."""
    import copy

    run = copy.deepcopy(CONFIG["runs"]["taboo"])
    arch = arch_of("taboo")
    lengths = {"source": "test", "train_rows": 2000, "queries": 300, "longest_sequence": 512, "longest_completion": 8}
    for rows in (32, 8):
        run["attribution"]["bergson"]["trak_loss_batch_size"] = rows
        parts = build_plan(run, arch, lengths, gpu_mem_gb=80)["jobs"]["bergson_trak"]["parts_gb"]
        assert parts["1 - p logits"] == pytest.approx(2 * rows * 512 * 262144 * 4 / 1e9, rel=1e-3)
    assert build_plan(run, arch, lengths, gpu_mem_gb=80)["jobs"]["bergson_trak"]["fits"]


@pytest.mark.parametrize("run", ["smol", "rehearsal"])
def test_the_plan_is_within_30_percent_of_the_measured_peaks(run):
    """Every model-holding job of two measured CPU runs (bench/measured/peaks.json: a 30-layer pretrained Llama at
    274 tokens, where activations dominate; Gemma 3 1B's widths in 2 layers, where the logits do) against the plan's
    CPU column for the same settings and lengths."""
    measured = json.loads((REPO / "bench" / "measured" / "peaks.json").read_text())[run]
    cfg = CONFIG["runs"][run]
    plan = build_plan(cfg, arch_of(run), measured["lengths"], gpu_mem_gb=80)["cpu_jobs"]
    kinds = sorted(plan, key=len, reverse=True)
    ratios = {}
    for job, peak in measured["peak_mb"].items():
        kind = next((k for k in kinds if job == k or job.startswith(k + "_")), None)
        # the model-holding jobs; a Kronfluence kind is planned for the run's largest strategy (EK-FAC here), so its
        # identity jobs (no factors to fit or load) sit well below it
        if kind and not kind.endswith("bergson_scores") and "_identity" not in job:
            ratios[job] = plan[kind]["total_gb"] * 1000 / peak
    assert len(ratios) >= 12
    assert all(0.7 <= r <= 1.3 for r in ratios.values()), ratios


def test_the_plan_is_within_30_percent_at_full_depth_and_1024_tokens():
    """Gemma 3 1B's 26 layers at 240 and 1,024 tokens, batch 1 and 2 (bench/plan_at_length.py, measured on this
    machine's CPU into bench/measured/peaks.json) against the plan for the settings that script ran."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_at_length", REPO / "bench" / "plan_at_length.py")
    plan_at_length = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_at_length)
    cases = json.loads((REPO / "bench" / "measured" / "peaks.json").read_text())["gemma3_1b_26_layers"]["cases"]
    assert {(c["stage"], c["tokens"]) for c in cases} >= {(s, n) for s in plan_at_length.STAGES for n in (240, 1024)}
    ratios = {(c["stage"], c["tokens"], c["batch"]):
              plan_at_length.planned_mb(c["tokens"], c["batch"])[c["stage"]] / c["peak_mb"] for c in cases}
    assert all(0.7 <= r <= 1.3 for r in ratios.values()), ratios
