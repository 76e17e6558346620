"""Bergson attribution: cosines equal independent gradients, index-based scores equal Bergson's own `score`
command, reduced = mean of per-query, shards, planted copies, preconditioners that change the scores, and a
crashed score job that leaves nothing behind."""

import json

import datasets
import numpy as np
import pytest

from playpen_attribution import bergson_attribution as ba
from playpen_attribution.settings import BergsonGradients, BergsonHessian, BergsonMix, BergsonReduce, BergsonScoring
from playpen_attribution.tables import load_shards

from conftest import independent_gradients

SETTINGS = {"aggregation": "mean", "projection_dim": 0, "precision": "fp32", "token_batch_size": 512,
            "fisher": "empirical", "damping_factor": 0.1, "mix_downweight_components": 1000, "seed": 0}
RUN = {"attribution": {"bergson": SETTINGS}}  # the run config section the stages' settings are built from
PLANTED = [0, 3]  # queries whose copies are among the scored training rows


@pytest.fixture(scope="module", autouse=True)
def eigendecompose_each_matrix_once():
    """These tests build many Attributors from the same few preconditioners, each inverting every module's Gram from
    its eigendecomposition (float64, up to 1024 x 1024 here, projection off): about half the module's time. The
    sweep's own cache (same bytes -> the stored `eigh`, deterministic) keeps one per matrix; every score still goes
    through Bergson's inversion."""
    with ba._eigendecompose_once():
        yield


@pytest.fixture(scope="module")
def small(demo_tokens, tmp_path_factory):
    """6 queries; 30 training rows plus copies (new ids) of two queries, as save_to_disk folders."""
    root = tmp_path_factory.mktemp("bergson-tokens")
    query = datasets.load_from_disk(str(demo_tokens / "query")).select(range(6))
    train = datasets.load_from_disk(str(demo_tokens / "train")).select(range(30))
    copies = query.select(PLANTED).map(lambda row: {"row_id": "copy-of-" + row["row_id"]})
    query.save_to_disk(str(root / "query"))
    datasets.concatenate_datasets([train, copies]).save_to_disk(str(root / "train"))
    return root


@pytest.fixture(scope="module")
def prepared(demo_adapter, small, tmp_path_factory):
    """Per-query gradients and the three preconditioners, built once."""
    root = tmp_path_factory.mktemp("bergson")
    ba.query_gradients_stage(demo_adapter, small / "query", root / "per_query", BergsonGradients.from_run(RUN))
    for side in ("train", "query"):
        ba.hessian_stage(demo_adapter, small / side, root / "hessian" / side, BergsonHessian.from_run(RUN))
    ba.mix_stage(root / "hessian/query", root / "hessian/train", root / "hessian/mixed", BergsonMix.from_run(RUN))
    return root


def reduced_query(demo_adapter, small, prepared, variant):
    """The variant's reduced query, built once."""
    _, side = ba.parse_variant(variant)
    reduced = prepared / "reduced" / variant
    if not reduced.exists():
        ba.reduce_stage(demo_adapter, small / "query", reduced, variant, prepared / "hessian" / side if side else None,
                        BergsonReduce.for_variant(RUN, variant))
    return reduced


def score(demo_adapter, small, prepared, variant, out, shard=0, shards=1):
    """Reduce and index (each once), then score one shard from its index; returns the shard file's path."""
    _, side = ba.parse_variant(variant)
    hessian = prepared / "hessian" / side if side else None
    reduced = reduced_query(demo_adapter, small, prepared, variant)
    index = prepared / "index" / f"{shard}-of-{shards}"
    if not index.exists():
        ba.index_stage(demo_adapter, small / "train", index, shard=shard, shards=shards, settings=BergsonGradients.from_run(RUN))
    ba.score_shard_stage(index, small / "query", reduced, prepared / "per_query", hessian, out, variant=variant,
                         settings=BergsonScoring.for_variant(RUN, variant))
    return out


def split_preconditioner(hessians, modules, device, dtype):
    """Bergson 2.5.1's `score` stacks the per-module H^-1/2 of a dense preconditioner into one tensor for cosine
    scoring, which fails when modules differ in size (LoRA A/B of q vs k/v under grouped-query attention): the
    same product one module at a time. (The workflow's index path never calls it.)"""
    matrices = {m: hessians[m].to(device, dtype) for m in modules}
    return lambda grads: {m: grads[m].to(device, dtype) @ matrices[m] for m in modules}


def bergson_score_command(demo_adapter, small, query_dir, variant, hessian, run_path, monkeypatch):
    """Bergson's own `score` command on the model (gradients collected again, preprocessed its way): [rows, q]."""
    import bergson.score.score as bergson_score
    from bergson.cli.commands import Score
    from bergson.config.config import ScoreConfig
    from bergson.data import load_scores

    unit_normalize, _ = ba.parse_variant(variant)
    monkeypatch.setattr(bergson_score, "_make_split_hessian", split_preconditioner)
    Score(score_cfg=ScoreConfig(query_path=str(query_dir), precision="fp32"),
          index_cfg=ba._index_config(run_path, demo_adapter.resolve(), small / "train", BergsonGradients.from_run(RUN)),
          preprocess_cfg=ba._preprocess(SETTINGS["damping_factor"], unit_normalize, hessian)).execute()
    stored = load_scores(run_path)
    return np.asarray(stored[:], dtype=np.float64)


@pytest.mark.parametrize("variant", ["dot", "cosine_train"])
def test_index_scores_equal_bergsons_own_score_command(demo_adapter, small, prepared, tmp_path, variant, monkeypatch):
    """The index path (gradients once, every variant from them, no model) gives the numbers Bergson's one-shot
    `score` gives, per query and (for the preconditioned cosine, the path with every step) against the reduced
    query. Each `score` command collects the gradients again: two variants, three commands, cover plain and
    preconditioned, dot and cosine; the other variants are checked against exact gradients below."""
    _, side = ba.parse_variant(variant)
    hessian = prepared / "hessian" / side if side else None
    result = load_shards([score(demo_adapter, small, prepared, variant, tmp_path / "s.npz")])
    per_query = bergson_score_command(demo_adapter, small, prepared / "per_query", variant, hessian,
                                      tmp_path / "per_query", monkeypatch)
    scale = np.abs(per_query).max()
    np.testing.assert_allclose(result["scores"], per_query.T, rtol=1e-4, atol=1e-5 * scale)
    if variant == "cosine_train":
        reduced = bergson_score_command(demo_adapter, small, prepared / "reduced" / variant, variant, hessian,
                                        tmp_path / "reduced", monkeypatch)
        np.testing.assert_allclose(result["reduced"], reduced[:, 0], rtol=1e-4, atol=1e-5 * scale)


def test_cosine_scores_equal_independent_gradient_cosines(demo_adapter, small, prepared, tmp_path):
    result = load_shards([score(demo_adapter, small, prepared, "cosine", tmp_path / "cosine.npz")])
    query, train = datasets.load_from_disk(str(small / "query")), datasets.load_from_disk(str(small / "train"))
    g_query, _, _ = independent_gradients(demo_adapter, query)
    g_train, _, _ = independent_gradients(demo_adapter, train)
    unit = lambda g: (g / g.norm(dim=1, keepdim=True)).double()  # noqa: E731
    expected = (unit(g_query) @ unit(g_train).T).numpy()
    assert result["query_ids"] == list(query["row_id"]) and result["train_ids"] == list(train["row_id"])
    np.testing.assert_allclose(result["scores"], expected, atol=2e-4)
    # the reduced query (mean of unit query gradients) scores each row by the mean of its cosines
    np.testing.assert_allclose(result["reduced"], expected.mean(axis=0), atol=2e-4)


@pytest.mark.parametrize("variant", ["dot_train", "cosine_mixed"])
def test_reduced_scores_are_the_mean_of_per_query_scores(demo_adapter, small, prepared, tmp_path, variant):
    result = load_shards([score(demo_adapter, small, prepared, variant, tmp_path / "s.npz")])
    scale = np.abs(result["scores"]).max()
    np.testing.assert_allclose(result["reduced"], result["scores"].mean(axis=0), rtol=1e-4, atol=1e-5 * scale)


def test_sum_aggregation_reduces_to_the_sum_of_per_query_scores(demo_adapter, small, prepared, tmp_path):
    """`aggregation: sum` (the queries' preprocessed gradients added, not averaged): the reduced query scores each row
    by the sum of its per-query scores, so with 6 queries 6 times the mean's."""
    variant = "cosine_train"
    mean = load_shards([score(demo_adapter, small, prepared, variant, tmp_path / "mean.npz")])
    run = {"attribution": {"bergson": {**SETTINGS, "aggregation": "sum"}}}
    ba.reduce_stage(demo_adapter, small / "query", tmp_path / "reduced-sum", variant, prepared / "hessian/train",
                    BergsonReduce.for_variant(run, variant))
    ba.score_shard_stage(prepared / "index/0-of-1", small / "query", tmp_path / "reduced-sum", prepared / "per_query",
                         prepared / "hessian/train", tmp_path / "sum.npz", variant=variant,
                         settings=BergsonScoring.for_variant(run, variant))
    summed = load_shards([tmp_path / "sum.npz"])
    scale = np.abs(summed["scores"]).max()
    np.testing.assert_allclose(summed["reduced"], summed["scores"].sum(axis=0), rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(summed["reduced"], 6 * mean["reduced"], rtol=1e-4, atol=1e-5 * scale)


def test_shards_merged_equal_one_unsharded_run(demo_adapter, small, prepared, tmp_path):
    whole = load_shards([score(demo_adapter, small, prepared, "cosine_train", tmp_path / "all.npz")])
    # two shards of 32 rows (16 each: the copies in the second): each shard's index is a gradient pass of its own
    merged = load_shards([score(demo_adapter, small, prepared, "cosine_train", tmp_path / f"shard-{i}.npz", i, 2)
                          for i in range(2)])
    assert merged["train_ids"] == whole["train_ids"] and merged["query_ids"] == whole["query_ids"]
    np.testing.assert_allclose(merged["scores"], whole["scores"], atol=1e-6)
    np.testing.assert_allclose(merged["reduced"], whole["reduced"], atol=1e-6)


def test_planted_copy_ranks_first_and_preconditioners_change_the_scores(demo_adapter, small, prepared, tmp_path):
    results = {v: load_shards([score(demo_adapter, small, prepared, v, tmp_path / f"{v}.npz")])
               for v in ("cosine", "cosine_train", "cosine_query", "cosine_mixed")}
    for variant, result in results.items():
        for q in PLANTED:
            top = result["train_ids"][int(np.argmax(result["scores"][q]))]
            assert top == "copy-of-" + result["query_ids"][q], (variant, q, top)
    plain = results["cosine"]["scores"]
    for variant in ("cosine_train", "cosine_query", "cosine_mixed"):
        assert np.abs(results[variant]["scores"] - plain).max() > 0.05, variant
    assert np.abs(results["cosine_mixed"]["scores"] - results["cosine_train"]["scores"]).max() > 0.01


def test_a_crashed_score_job_leaves_nothing_and_the_rerun_succeeds(demo_adapter, small, prepared, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "scores" / "shard-0.npz"
    real_savez = np.savez

    def crash_midway(handle, **arrays):
        handle.write(b"PK\x03\x04 half an archive")
        raise OSError("simulated crash while writing the scores")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(OSError, match="simulated crash"):
        score(demo_adapter, small, prepared, "cosine", out)
    assert list(out.parent.iterdir()) == []  # no partial file, no temporary left behind
    monkeypatch.setattr(np, "savez", real_savez)
    result = load_shards([score(demo_adapter, small, prepared, "cosine", out)])
    assert result["scores"].shape == (6, 32) and np.isfinite(result["scores"]).all()


def test_unknown_variant_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="expected dot or cosine, optionally followed by _train, _query or _mixed"):
        ba.parse_variant("cosine_both")


def explicit_preconditioned_scores(g_query, g_train, sizes, power_side: str, damping: float, power: float = -0.5):
    """Every (query, row) score from exact per-row gradients: per module H = (1/N) sum g g^T over the training
    rows, its eigenvalues damped as 1/(lambda + c * mean lambda); `dot`: g_q^T H^-1 g_t; `cosine`: cosine of
    H^power g_q and H^power g_t over all modules (-1/2 is right)."""
    import torch

    queries, rows = [], []
    for gq, gt in zip(torch.split(g_query.double(), sizes, dim=1), torch.split(g_train.double(), sizes, dim=1)):
        eigvals, eigvecs = torch.linalg.eigh(gt.T @ gt / len(gt))
        eigvals = eigvals.clamp_min(0)
        damped = eigvals + damping * eigvals.mean()
        if power_side == "dot":
            queries.append(gq @ (eigvecs * damped.reciprocal()) @ eigvecs.T)
            rows.append(gt)
        else:
            root = (eigvecs * damped.pow(power)) @ eigvecs.T
            queries.append(gq @ root)
            rows.append(gt @ root)
    q, t = torch.cat(queries, dim=1), torch.cat(rows, dim=1)
    if power_side == "cosine":
        q, t = q / q.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    return (q @ t.T).numpy()


@pytest.mark.parametrize("variant", ["dot_train", "cosine_train"])
def test_preconditioned_variants_equal_an_explicit_computation_from_exact_gradients(demo_adapter, small, prepared,
                                                                                   tmp_path, variant):
    """Projection 0: Bergson's training-side preconditioner and its use (H^-1 on the query for dot, H^-1/2 on
    both sides for cosine) equal the same algebra on autograd gradients; H^-1 where H^-1/2 belongs fails it."""
    result = load_shards([score(demo_adapter, small, prepared, variant, tmp_path / "s.npz")])
    query, train = datasets.load_from_disk(str(small / "query")), datasets.load_from_disk(str(small / "train"))
    g_query, _, params = independent_gradients(demo_adapter, query)
    g_train, _, _ = independent_gradients(demo_adapter, train)
    sizes = [p.numel() for p in params]  # one Bergson module per LoRA weight (each A and each B)
    kind = variant.split("_")[0]
    expected = explicit_preconditioned_scores(g_query, g_train, sizes, kind, SETTINGS["damping_factor"])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(result["scores"], expected, rtol=2e-3, atol=2e-4 * scale)
    if kind == "cosine":  # H^-1 on both sides where H^-1/2 belongs is told apart
        wrong = explicit_preconditioned_scores(g_query, g_train, sizes, "cosine", SETTINGS["damping_factor"], -1.0)
        assert np.abs(result["scores"] - wrong).max() > 50 * 2e-4 * scale


def test_a_row_bergson_gives_no_gradient_is_reported_unscored_not_zero(demo_adapter, small, prepared, tmp_path):
    """A one-token row has no next-token loss: its index row stays zero, and the scores say NaN for it."""
    rows = datasets.load_from_disk(str(small / "train")).select(range(3))
    short = rows.select([0]).map(lambda r: {"row_id": "one-token", "input_ids": r["input_ids"][:1],
                                            "attention_mask": r["attention_mask"][:1],
                                            "labels": r["input_ids"][:1]})
    tokens = tmp_path / "tokens"
    datasets.concatenate_datasets([rows, short]).save_to_disk(str(tokens))
    ba.index_stage(demo_adapter, tokens, tmp_path / "index", shard=0, shards=1, settings=BergsonGradients.from_run(RUN))
    ba.score_shard_stage(tmp_path / "index", small / "query", reduced_query(demo_adapter, small, prepared, "cosine"),
                         prepared / "per_query", None, tmp_path / "s.npz", variant="cosine",
                         settings=BergsonScoring.for_variant(RUN, "cosine"))
    result = load_shards([tmp_path / "s.npz"])
    assert result["train_ids"][-1] == "one-token"
    assert np.isnan(result["scores"][:, -1]).all() and np.isnan(result["reduced"][-1])
    assert np.isfinite(result["scores"][:, :-1]).all() and np.isfinite(result["reduced"][:-1]).all()


SCORE_IN_A_PROCESS = r"""
import json, sys
from pathlib import Path
import numpy as np
from playpen_attribution import bergson_attribution as ba
from playpen_attribution.settings import BergsonScoring
index, query, reduced, per_query, out = sys.argv[1:]
ba.score_shard_stage(index, query, reduced, per_query, None, out, variant="cosine",
                     settings=BergsonScoring(damping_factor=None))
modules = json.loads((Path(index) / "info.json").read_text()).get("grad_sizes") or {}
print(json.dumps(list(set(modules))))
"""


def test_scores_are_the_same_bytes_whatever_the_processs_hash_seed(demo_adapter, small, prepared, tmp_path):
    """Same inputs, same scores: Bergson sums the modules' scores in set order, which follows the string-hash seed
    (a wrapped fix keeps the index's module order). The two processes below iterate the modules differently.
    Every variant's module sum goes through that search: the plain cosine (no preconditioner to invert in each
    process) fails without the fix as the preconditioned ones do."""
    import os
    import subprocess
    import sys

    score(demo_adapter, small, prepared, "cosine", tmp_path / "first.npz")  # builds the index and the query
    index, reduced = prepared / "index" / "0-of-1", prepared / "reduced" / "cosine"
    orders, results = [], []
    for seed in ("1", "2"):
        out = tmp_path / f"seed-{seed}.npz"
        proc = subprocess.run([sys.executable, "-c", SCORE_IN_A_PROCESS, str(index), str(small / "query"), str(reduced),
                               str(prepared / "per_query"), str(out)],
                              env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True)
        orders.append(proc.stdout.strip().splitlines()[-1])
        results.append(np.load(out))
    assert orders[0] != orders[1], "the two hash seeds happen to give one set order: pick other seeds"
    for key in ("scores", "reduced"):
        assert results[0][key].tobytes() == results[1][key].tobytes(), key


def test_bergson_runs_in_the_job_process_whatever_gpus_are_visible(demo_adapter, small, tmp_path, monkeypatch):
    """Bergson's launcher starts one worker per visible GPU unless told otherwise; a job's index is built in the
    job's own process (one device, the split-preconditioner fix applied), even where four GPUs show."""
    import bergson.distributed
    import torch

    def no_spawn(*args, **kwargs):
        raise AssertionError("Bergson spawned worker processes")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(bergson.distributed.mp, "get_context", no_spawn)
    ba.index_stage(demo_adapter, small / "train", tmp_path / "index", shard=0, shards=1,
                   settings=BergsonGradients.from_run(RUN))
    rows = json.loads((tmp_path / "index" / ba.INDEX_ROWS).read_text())["row_ids"]
    assert rows == list(datasets.load_from_disk(str(small / "train"))["row_id"])


# ---------------------------------------------------------------------------------------------------------------
# TrackStar: gradients normalised by the adapter's Adam second moments
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adam_adapter(tiny_model_dir, demo_tokens, tmp_path_factory):
    """The demo adapter trained again with its optimizer's second moments saved (as rule train_adapter does)."""
    from playpen_attribution.config import validate_config
    from playpen_attribution.settings import Lora, Training
    from playpen_attribution.training import train_adapter

    run = validate_config({"runs": {"r": {"data": {"source": {"kind": "json", "train": "a", "query": "b"}},
                                          "model": {"tiny": {}}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                                          "training": {"epochs": 2, "batch_size": 8, "gradient_accumulation": 1,
                                                       "learning_rate": 0.003, "warmup_ratio": 0.0, "seed": 0}}}})
    run = run["runs"]["r"]
    out = tmp_path_factory.mktemp("adam") / "adapter"
    train_adapter(tiny_model_dir, demo_tokens / "train", out, lora=Lora.from_run(run), training=Training.from_run(run),
                  max_length=256, save_optimizer_state=True)
    return out


def test_trackstar_gradients_are_the_raw_ones_divided_by_the_saved_second_moments(adam_adapter, small, tmp_path):
    """Bergson's optimizer normalisation, checked against an explicit computation from the saved optimizer.pt:
    each LoRA weight's per-query gradient divided elementwise by sqrt(exp_avg_sq) + 1e-8."""
    import torch

    from playpen_attribution.modeling import load_model
    from playpen_attribution.training import OPTIMIZER_FILE

    settings = BergsonGradients.from_run(RUN)
    ba.query_gradients_stage(adam_adapter, small / "query", tmp_path / "raw", settings)
    ba.query_gradients_stage(adam_adapter, small / "query", tmp_path / "adam", settings, normalize="adam")
    raw, adam = ba._stored_gradients(tmp_path / "raw", torch.float64), ba._stored_gradients(tmp_path / "adam", torch.float64)
    state = torch.load(adam_adapter / OPTIMIZER_FILE)
    assert set(state) == {"state", "param_groups"} and len(state["param_groups"]) == 1
    assert all(set(e) == {"exp_avg_sq", "step", "param_name"} for e in state["state"].values())
    # every LoRA weight of the adapter has its second moments, under the name PEFT saves it with
    model = load_model(str(adam_adapter))
    lora = [name.replace(".default.", ".") for name, _ in model.named_parameters() if "lora_" in name]
    moments = {e["param_name"]: e["exp_avg_sq"].double() for e in state["state"].values()}
    assert sorted(moments) == sorted(lora) and len(moments) == len(raw) == len(adam) > 0
    for module in raw:
        name = next(n for n in moments if n.endswith(module.removesuffix(".default") + ".weight"))
        denominator = (moments[name].sqrt() + 1e-8).flatten()
        np.testing.assert_allclose(adam[module].numpy(), (raw[module] / denominator).numpy(), rtol=1e-4,
                                   atol=1e-6 * float(adam[module].abs().max()))
    assert not all(torch.allclose(raw[m], adam[m]) for m in raw)


def test_trackstar_scores_a_planted_copy_first_and_differs_from_the_raw_mixed_cosine(adam_adapter, small, tmp_path):
    """The whole TrackStar variant through the stages the rules run (Adam-space per-query gradients, preconditioners
    and index; the mixed preconditioner; the reduced query): unit-normalised, so each planted copy ranks first for
    its own query; and the optimizer normalisation changes the ranking of the raw mixed cosine."""
    from playpen_attribution.methods import parse_method

    method = parse_method("bergson_trackstar")
    assert (method.kind, method.unit_normalize, method.preconditioner, method.gradient_space, method.plain) == (
        "trackstar", True, "mixed", "adam", "bergson_cosine")
    # projected as the real runs are (16 x 16 per module): the dense preconditioners of unprojected gradients took
    # most of this test's time in their eigendecompositions, and a copy's projected gradient is still its query's
    run = {"attribution": {"bergson": {**SETTINGS, "projection_dim": 16}}}
    scores = {}
    for space, variant in (("adam", "trackstar"), ("raw", "cosine_mixed")):
        root = tmp_path / space
        gradients = BergsonGradients.from_run(run)
        ba.query_gradients_stage(adam_adapter, small / "query", root / "per_query", gradients, normalize=space)
        for side in ("train", "query"):
            ba.hessian_stage(adam_adapter, small / side, root / "hessian" / side, BergsonHessian.from_run(run),
                             normalize=space)
        ba.mix_stage(root / "hessian/query", root / "hessian/train", root / "hessian/mixed", BergsonMix.from_run(run))
        ba.reduce_stage(adam_adapter, small / "query", root / "reduced", variant, root / "hessian/mixed",
                        BergsonReduce.for_variant(run, variant))
        ba.index_stage(adam_adapter, small / "train", root / "index", shard=0, shards=1, settings=gradients,
                       normalize=space)
        ba.score_shard_stage(root / "index", small / "query", root / "reduced", root / "per_query",
                             root / "hessian/mixed", root / "shard.npz", variant=variant,
                             settings=BergsonScoring.for_variant(run, variant))
        scores[space] = load_shards([root / "shard.npz"])
    trackstar = scores["adam"]
    for q in PLANTED:
        copy = trackstar["train_ids"].index("copy-of-" + trackstar["query_ids"][q])
        assert int(np.nanargmax(trackstar["scores"][q])) == copy
    assert not np.allclose(trackstar["scores"], scores["raw"]["scores"], rtol=1e-2)


def test_trackstar_refuses_an_adapter_without_its_optimizer_state(demo_adapter, small, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"optimizer\.pt is missing: TrackStar normalises gradients by the "
                                                r"optimizer state that training saves"):
        ba.query_gradients_stage(demo_adapter, small / "query", tmp_path / "adam", BergsonGradients.from_run(RUN),
                                 normalize="adam")
    assert not (tmp_path / "adam").exists()
