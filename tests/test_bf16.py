"""bf16 end to end on the tiny model (CPUs compute bf16 through reference kernels): training, EK-FAC fitting and
scoring, and every Bergson stage (query gradients, both preconditioners, mixing, reduction, index, scores), against
the same pipeline in fp32. And float16, which Gemma 3 overflows, refused by name."""

import datasets
import numpy as np
import pytest
from scipy.stats import spearmanr

from playpen_attribution import bergson_attribution as ba
from playpen_attribution.influence import fit_factors, score_pairs
from playpen_attribution.settings import BergsonGradients, BergsonHessian, BergsonMix, BergsonReduce, BergsonScoring

from conftest import train_demo_adapter

# Measured on this fixture (2 cores, x86_64): bf16 against fp32, per query, min 0.94 for EK-FAC (training included),
# 0.99 for Bergson; 0.9 leaves room for other CPUs' bf16 kernels without passing a broken stage (a shuffled or
# zero score gives about 0).
MIN_SPEARMAN = 0.9
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}


def bergson_run(precision):
    return {"attribution": {"bergson": {"aggregation": "mean", "projection_dim": 16, "precision": precision,
                                        "token_batch_size": 512, "fisher": "empirical", "damping_factor": 0.1,
                                        "mix_downweight_components": 1000, "seed": 0}}}


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir, demo_tokens, tmp_path_factory):
    """The same 40 training rows and 8 queries through training, Kronfluence and Bergson, once per dtype."""
    root = tmp_path_factory.mktemp("bf16")
    datasets.load_from_disk(str(demo_tokens / "train")).select(range(40)).save_to_disk(str(root / "tokens" / "train"))
    datasets.load_from_disk(str(demo_tokens / "query")).select(range(8)).save_to_disk(str(root / "tokens" / "query"))
    query = datasets.load_from_disk(str(root / "tokens" / "query"))
    train = datasets.load_from_disk(str(root / "tokens" / "train"))
    out = {}
    for dtype, precision in PRECISION.items():
        work = root / dtype
        adapter = train_demo_adapter(tiny_model_dir, root / "tokens", work / "adapter", dtype=dtype)
        fit_factors(str(adapter), root / "tokens" / "train", work / "factors", strategy="ekfac", modules="lora",
                    dtype=dtype)
        scores = {"ekfac": score_pairs(str(adapter), work / "factors", query, train, dtype=dtype)["scores"]}
        run = bergson_run(precision)
        ba.query_gradients_stage(adapter, root / "tokens/query", work / "per_query", BergsonGradients.from_run(run))
        for side in ("train", "query"):
            ba.hessian_stage(adapter, root / "tokens" / side, work / "hessian" / side, BergsonHessian.from_run(run))
        ba.mix_stage(work / "hessian/query", work / "hessian/train", work / "hessian/mixed", BergsonMix.from_run(run))
        ba.index_stage(adapter, root / "tokens/train", work / "index", shard=0, shards=1,
                       settings=BergsonGradients.from_run(run))
        for variant, side in (("cosine", None), ("cosine_mixed", "mixed")):
            hessian = work / "hessian" / side if side else None
            ba.reduce_stage(adapter, root / "tokens/query", work / "reduced" / variant, variant, hessian,
                            BergsonReduce.for_variant(run, variant))
            ba.score_shard_stage(work / "index", root / "tokens/query", work / "reduced" / variant, work / "per_query",
                                 hessian, work / f"{variant}.npz", variant=variant,
                                 settings=BergsonScoring.for_variant(run, variant))
            with np.load(work / f"{variant}.npz") as shard:
                scores[f"bergson_{variant}"] = shard["scores"]
                scores[f"bergson_{variant}_reduced"] = shard["reduced"][None, :]
        out[dtype] = {"adapter": adapter, "scores": scores}
    return out


def test_every_stage_runs_in_bf16_and_ranks_rows_as_fp32_does(pipelines):
    import json

    manifest = json.loads((pipelines["bfloat16"]["adapter"] / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    for method, fp32 in pipelines["float32"]["scores"].items():
        bf16 = pipelines["bfloat16"]["scores"][method]
        assert bf16.shape == fp32.shape and np.isfinite(bf16).all(), method
        assert not np.array_equal(bf16, fp32), method  # computed in bf16, not copied
        per_query = [spearmanr(a, b).statistic for a, b in zip(fp32, bf16)]
        assert min(per_query) >= MIN_SPEARMAN, (method, per_query)


def test_float16_is_refused_for_gemma3_naming_bf16(tiny_model_dir, pipelines, tmp_path):
    from playpen_attribution.modeling import load_causal_lm

    with pytest.raises(ValueError, match=r"Gemma 3 overflows in float16 .* use bfloat16 \(bf16\) or float32"):
        load_causal_lm(tiny_model_dir, dtype="float16")
    adapter = pipelines["float32"]["adapter"]
    with pytest.raises(ValueError, match=r"attribution.bergson.precision: Gemma 3 overflows in float16"):
        ba.query_gradients_stage(adapter, tmp_path, tmp_path / "out", BergsonGradients.from_run(bergson_run("fp16")))
    assert not (tmp_path / "out").exists()
