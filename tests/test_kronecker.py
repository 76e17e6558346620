"""K-FAC and EK-FAC scores from `fit_factors`/`score_pairs` equal an explicit Kronecker-factored computation (per-token
hooks, float64) on a one-layer LoRA model at the heuristic damping, and the stored factors equal the explicit ones: an
independent check of the conventions Kronfluence applies (normalization, eigenbasis, EK-FAC eigenvalues, damping)."""

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from playpen_attribution.influence import fit_factors, make_task, score_pairs, select_modules
from playpen_attribution.modeling import collate, load_for_attribution, load_tokenizer, pad_token_id
from playpen_attribution.model_sources import build_tiny_model, corpus_from_source
from playpen_attribution.tokenization import tokenize_table

from conftest import train_demo_adapter

N_TRAIN, N_QUERY = 8, 3
DAMPING_SCALE = 0.1  # kronfluence.utils.constants.HEURISTIC_DAMPING_SCALE, used when damping_factor=None


@pytest.fixture(scope="module")
def setup(sample_source, demo_tables, tmp_path_factory):
    root = tmp_path_factory.mktemp("kronecker")
    model_dir = build_tiny_model(corpus_from_source(sample_source), root / "base_model", num_layers=1, seed=0)
    tables, _ = demo_tables
    rows = {}
    for role, n in (("train", N_TRAIN), ("query", N_QUERY)):
        tokenize_table(tables / f"{role}.parquet", model_dir, root / "all" / role, max_length=256, mode="chat")
        rows[role] = datasets.load_from_disk(str(root / "all" / role)).select(range(n))
        rows[role].save_to_disk(str(root / "tokens" / role))
    adapter = train_demo_adapter(model_dir, root / "tokens", root / "adapter", epochs=2)
    factors = {}
    for strategy in ("kfac", "ekfac"):
        fit_factors(str(adapter), root / "tokens" / "train", root / strategy, strategy=strategy, modules="lora")
        factors[strategy] = root / strategy
    return adapter, factors, rows["query"], rows["train"]


def per_token_pieces(adapter, rows):
    """Per row and tracked module: inputs a [T, d_in] and output gradients g [T, d_out] of the summed completion loss."""
    model = load_for_attribution(str(adapter))
    tracked = select_modules(model, "lora")
    task = make_task(tracked)
    pad = pad_token_id(load_tokenizer(str(adapter)))
    modules = dict(model.named_modules())
    assert all(modules[name].bias is None for name in tracked)  # LoRA Linears: no bias column in A
    for name in tracked:  # loaded frozen; Kronfluence adds a zero parameter to each output to the same effect
        modules[name].weight.requires_grad_(True)
    current = {}

    def forward_hook(name):
        def hook(module, inputs, output):
            current[name] = {"a": inputs[0].detach()[0].double().cpu()}
            output.register_hook(lambda grad: current[name].__setitem__("g", grad.detach()[0].double().cpu()))
        return hook

    handles = [modules[name].register_forward_hook(forward_hook(name)) for name in tracked]
    pieces = []
    for row in rows:  # one row a batch: no padding to mask
        current.clear()
        model.zero_grad(set_to_none=True)
        task.compute_train_loss(collate([row], pad), model).backward()
        pieces.append(dict(current))
    for handle in handles:
        handle.remove()
    return tracked, pieces


def explicit_scores(tracked, train, query, strategy):
    """sum over modules of <precondition(dW_q), dW_t>, preconditioned in the eigenbasis of G (x) A, float64."""
    total = np.zeros((len(query), len(train)))
    factors = {}
    for name in tracked:
        a_all = torch.cat([p[name]["a"] for p in train])
        g_all = torch.cat([p[name]["g"] for p in train])
        tokens = a_all.shape[0]
        cov_a, cov_g = a_all.T @ a_all / tokens, g_all.T @ g_all / tokens  # per attended token, over all rows
        eig_a, q_a = torch.linalg.eigh(cov_a)
        eig_g, q_g = torch.linalg.eigh(cov_g)
        grad_t = torch.stack([p[name]["g"].T @ p[name]["a"] for p in train])  # per-example dW [N, d_out, d_in]
        grad_q = torch.stack([p[name]["g"].T @ p[name]["a"] for p in query])
        if strategy == "kfac":
            lam = torch.outer(eig_g, eig_a)  # per-token scale: A and G are both averaged over tokens
        else:  # Kronfluence: mean over examples (not tokens) of the squared rotated per-example gradient
            lam = (q_g.T @ grad_t @ q_a).square().mean(dim=0)
        lam_damped = lam + DAMPING_SCALE * lam.mean()  # heuristic damping, per module
        pre_q = q_g @ ((q_g.T @ grad_q @ q_a) / lam_damped) @ q_a.T
        total += torch.einsum("qoi,toi->qt", pre_q, grad_t).numpy()
        factors[name] = {"A": cov_a, "G": cov_g, "tokens": tokens, "lambda": lam}
    return total, factors


def stored(factors_dir, name):
    return {path.stem: load_file(path) for path in (factors_dir / "influence").glob(f"factors_{name}/*.safetensors")}


@pytest.fixture(scope="module")
def explicit(setup):
    adapter, _, query, train = setup
    tracked, train_pieces = per_token_pieces(adapter, train)
    _, query_pieces = per_token_pieces(adapter, query)
    return {s: explicit_scores(tracked, train_pieces, query_pieces, s) for s in ("kfac", "ekfac")}


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_stored_factors_equal_the_explicit_ones(setup, explicit, strategy):
    _, factors, _, _ = setup
    files = stored(factors[strategy], f"{strategy}_{N_TRAIN}")
    ours = explicit[strategy][1]
    assert set(files["activation_covariance"]) == set(ours)
    for name, f in ours.items():
        # stored as sums over attended tokens; Kronfluence divides by the token count before eigh
        assert int(files["num_activation_covariance_processed"][name]) == f["tokens"]
        assert int(files["num_gradient_covariance_processed"][name]) == f["tokens"]
        for key, mine in (("activation_covariance", f["A"]), ("gradient_covariance", f["G"])):
            theirs = files[key][name].double() / f["tokens"]
            np.testing.assert_allclose(theirs, mine, rtol=1e-4, atol=2e-5 * mine.abs().max().item(),
                                       err_msg=f"{key} {name}")
        if strategy == "ekfac":
            # elementwise squares: independent of the eigenvectors' signs; eigh orders both ascending
            assert int(files["num_lambda_processed"][name]) == N_TRAIN  # normalized per example, not per token
            theirs = files["lambda_matrix"][name].double() / N_TRAIN
            np.testing.assert_allclose(theirs, f["lambda"], rtol=1e-3, atol=1e-4 * f["lambda"].max().item(),
                                       err_msg=f"lambda {name}")


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_scores_equal_the_explicit_kronecker_computation(setup, explicit, strategy):
    adapter, factors, query, train = setup
    scores = score_pairs(str(adapter), factors[strategy], query, train, damping_factor=None)["scores"]
    expected = explicit[strategy][0]
    assert scores.shape == (N_QUERY, N_TRAIN)
    # Kronfluence works in float32 (observed: < 1e-5 relative); wrong eigenvalues or damping are off by > 10%
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
