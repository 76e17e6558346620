"""The command-line tools fit-hessians and run-query, with their README's flags, end to end on a tiny local model
and a queries/ folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from playpen_attribution.cli import fit_hessians, run_query

from conftest import REPO

TEST_QUERY = REPO / "queries" / "test_query"


@pytest.fixture(scope="module")
def cli_model(seed_model):
    """A tiny base model with a tokenizer trained on the query folder, and its plain-tokenized train set."""
    return seed_model


@pytest.fixture(scope="module")
def factors_dir(cli_model):
    out = cli_model / "factors"
    fit_hessians(["--model", str(cli_model / "model"), "--hessian-dataset", str(cli_model / "hessian"),
                  "--output-dir", str(out), "--strategy", "ekfac", "--dtype", "float32"])
    return out


def query_args(cli_model, factors_dir, out, train=TEST_QUERY / "train.json", query=TEST_QUERY / "query.json"):
    return ["--model", str(cli_model / "model"), "--factors-dir", str(factors_dir), "--train-json", str(train),
            "--query-json", str(query), "--output-dir", str(out), "--dtype", "float32"]


def test_fit_hessians_writes_the_seed_layout(factors_dir):
    meta = json.loads((factors_dir / "metadata.json").read_text())
    assert meta["strategy"] == "ekfac" and meta["num_examples"] == 12 and meta["layer_stride"] == 1
    assert all(".mlp." in m for m in meta["tracked_modules"]) and len(meta["tracked_modules"]) == 6
    assert (factors_dir / "influence" / "factors_ekfac_12" / "factor_arguments.json").is_file()


def test_run_query_writes_the_seed_csvs_with_per_token_scores(cli_model, factors_dir, tmp_path):
    run_query(query_args(cli_model, factors_dir, tmp_path / "results") + ["--per-token-scores"])
    query = pd.read_csv(tmp_path / "results" / "query.csv")
    train = pd.read_csv(tmp_path / "results" / "train.csv")
    influences = pd.read_csv(tmp_path / "results" / "influences.csv")
    assert list(query.columns) == ["query_id", "prompt", "completion", "loss", "topic"]
    assert list(train.columns) == ["train_id", "prompt", "completion", "topic"]
    assert list(influences.columns) == ["query_id", "train_id", "influence_score", "per_token_scores"]
    assert len(influences) == len(query) * len(train) == 2 * 12
    assert (query["loss"] > 0).all()
    for _, row in influences.iterrows():
        assert sum(json.loads(row["per_token_scores"])) == pytest.approx(row["influence_score"], rel=1e-3, abs=1e-3)
    assert set(os.listdir(factors_dir)) == {"metadata.json", "influence"}, "scores are not written into the factors"


# Loaded by the console scripts of the concurrency test (PYTHONPATH): a barrier at the entry of the scoring, so both
# processes are inside it at once, each recording when it entered and left.
BARRIER = """
import json, os, sys, time
from pathlib import Path

import playpen_attribution.influence as influence

_score_pairs = influence.score_pairs
folder = Path(os.environ["RUN_QUERY_BARRIER"])


def score_pairs(*args, **kwargs):
    (folder / f"in-{os.getpid()}").write_text(str(time.time()))
    deadline = time.time() + 240
    while len(list(folder.glob("in-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    try:
        return _score_pairs(*args, **kwargs)
    finally:
        (folder / f"out-{os.getpid()}").write_text(str(time.time()))


influence.score_pairs = score_pairs
"""


def test_console_scripts_run_concurrently_on_one_factors_folder(cli_model, factors_dir, tmp_path):
    """Two run-query processes scoring on one factors folder at the same time (a barrier holds each at the scoring's
    entry until both are there); each result equals its own run alone."""
    other_query = tmp_path / "query2.json"
    other_query.write_text(json.dumps([{"pair_id": "q-peru", "prompt": "The capital of Peru is", "completion": " Lima."}]))
    hooks, barrier = tmp_path / "hooks", tmp_path / "barrier"
    hooks.mkdir(), barrier.mkdir()
    (hooks / "sitecustomize.py").write_text(BARRIER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUN_QUERY_BARRIER": str(barrier),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    exe = Path(sys.executable).parent / "run-query"
    procs = [subprocess.Popen([str(exe), *query_args(cli_model, factors_dir, tmp_path / name, query=q)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, q in (("a", TEST_QUERY / "query.json"), ("b", other_query))]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    entered = [float((barrier / f"in-{p.pid}").read_text()) for p in procs]
    left = [float((barrier / f"out-{p.pid}").read_text()) for p in procs]
    assert max(entered) < min(left)  # both were scoring at the same time
    run_query(query_args(cli_model, factors_dir, tmp_path / "alone", query=other_query))
    together = pd.read_csv(tmp_path / "b" / "influences.csv")
    alone = pd.read_csv(tmp_path / "alone" / "influences.csv")
    assert set(together["query_id"]) == {"q-peru"}
    pd.testing.assert_frame_equal(together, alone)
    assert set(pd.read_csv(tmp_path / "a" / "influences.csv")["query_id"]) == {"q-france", "q-cat"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{", "malformed JSON at line 1 column 3"),
        ("[]", "the list is empty"),
        ('[{"pair_id": "x", "prompt": "p"}]', "missing field(s) ['completion']"),
        ('[{"pair_id": "x", "prompt": "p", "completion": "c"}, {"pair_id": "x", "prompt": "q", "completion": "d"}]',
         "duplicate pair_id(s) ['x']"),
    ],
)
def test_bad_query_json_fails_clearly_without_partial_csv(cli_model, factors_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "query.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        run_query(query_args(cli_model, factors_dir, tmp_path / "out", query=bad))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}" in err and message in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def fails_with(capsys, message, call, *args):
    """`call(*args)` exits with status 2 (the tools' bad-input status) and says `message` on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_factors_fail_clearly(cli_model, factors_dir, tmp_path, capsys):
    fails_with(capsys, "does not exist; run fit-hessians first", run_query,
               query_args(cli_model, tmp_path / "missing", tmp_path / "out"))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(factors_dir, incomplete)
    (incomplete / "metadata.json").unlink()
    fails_with(capsys, "not a complete factors folder", run_query, query_args(cli_model, incomplete, tmp_path / "out"))
    foreign = tmp_path / "foreign"
    shutil.copytree(factors_dir, foreign)
    meta = json.loads((foreign / "metadata.json").read_text())
    meta["weights_hash"] = "0123456789abcdef"
    (foreign / "metadata.json").write_text(json.dumps(meta))
    fails_with(capsys, "fitted on a different model", run_query, query_args(cli_model, foreign, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_strategy_and_too_short_max_length(cli_model, factors_dir, tmp_path, capsys):
    fails_with(capsys, "invalid choice: 'exact'", fit_hessians,
               ["--model", str(cli_model / "model"), "--hessian-dataset", str(cli_model / "hessian"),
                "--output-dir", str(tmp_path / "f"), "--strategy", "exact"])
    fails_with(capsys, "do not fit in --max-length 2", run_query,
               query_args(cli_model, factors_dir, tmp_path / "out") + ["--max-length", "2"])
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_dir_is_refused_and_kept(cli_model, tmp_path, capsys):
    out = tmp_path / "f"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails_with(capsys, "holds other files; give an empty or new folder", fit_hessians,
               ["--model", str(cli_model / "model"), "--hessian-dataset", str(cli_model / "hessian"),
                "--output-dir", str(out)])
    assert (out / "notes.txt").read_text() == "mine"


def test_bfloat16_default_runs_on_cpu_and_ranks_as_float32_does(cli_model, tmp_path):
    """The tools' default dtype (bf16) on a CPU: the scores of the fp32 run, to bf16's precision; --max-examples
    reaches the factors' metadata."""
    import numpy as np
    from scipy.stats import spearmanr

    scores = {}
    for dtype in ("bfloat16", "float32"):
        fit_hessians(["--model", str(cli_model / "model"), "--hessian-dataset", str(cli_model / "hessian"),
                      "--output-dir", str(tmp_path / dtype), "--strategy", "diagonal", "--max-examples", "6",
                      "--dtype", dtype])
        meta = json.loads((tmp_path / dtype / "metadata.json").read_text())
        assert meta["num_examples"] == 6 and meta["dtype"] == dtype
        args = query_args(cli_model, tmp_path / dtype, tmp_path / f"out-{dtype}")
        run_query(args[:-2] if dtype == "bfloat16" else args)  # bf16: the default --dtype
        frame = pd.read_csv(tmp_path / f"out-{dtype}" / "influences.csv")
        scores[dtype] = frame.pivot(index="query_id", columns="train_id", values="influence_score")
    bf16, fp32 = scores["bfloat16"].to_numpy(), scores["float32"].to_numpy()
    assert bf16.shape == (2, 12) and not np.array_equal(bf16, fp32)
    # measured here: Spearman 0.993 and 1.0 per query
    assert min(spearmanr(a, b).statistic for a, b in zip(bf16, fp32)) >= 0.9


def test_the_tools_on_a_real_pretrained_model_converted_from_its_package(smol_model_dir, tmp_path):
    """fit-hessians and run-query with the README's flags on SmolLM2-135M-Instruct (Llama layout, tied embeddings),
    the converted folder as --model: the seed's MLP modules of every 10th layer, the examples cap recorded, and
    query.csv's loss equal to the summed completion cross-entropy computed here by hand."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from playpen_attribution.data import load_pair_json
    from playpen_attribution.tokenization import tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(str(smol_model_dir))
    rows = load_pair_json(TEST_QUERY / "train.json").to_dict("records")
    hessian, _ = tokenize_rows(rows, tokenizer, 128, "plain")
    hessian.select_columns(["input_ids", "attention_mask", "labels"]).save_to_disk(str(tmp_path / "hessian"))
    factors = tmp_path / "factors"
    fit_hessians(["--model", str(smol_model_dir), "--hessian-dataset", str(tmp_path / "hessian"), "--output-dir",
                  str(factors), "--layer-stride", "10", "--max-examples", "6", "--dtype", "float32"])
    meta = json.loads((factors / "metadata.json").read_text())
    assert meta["num_examples"] == 6 and meta["layer_stride"] == 10
    assert meta["tracked_modules"] == [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 10, 20)
                                       for p in ("gate", "up", "down")]
    run_query(["--model", str(smol_model_dir), "--factors-dir", str(factors), "--train-json",
               str(TEST_QUERY / "train.json"), "--query-json", str(TEST_QUERY / "query.json"), "--output-dir",
               str(tmp_path / "out"), "--dtype", "float32"])
    query = pd.read_csv(tmp_path / "out" / "query.csv")
    influences = pd.read_csv(tmp_path / "out" / "influences.csv")
    assert len(influences) == 2 * 12 and np.isfinite(influences["influence_score"]).all()
    model = AutoModelForCausalLM.from_pretrained(str(smol_model_dir), dtype=torch.float32)
    queries = load_pair_json(TEST_QUERY / "query.json").to_dict("records")
    for row, loss in zip(queries, query["loss"]):
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1]
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(completion), reduction="sum").item()
        assert loss == pytest.approx(expected, rel=1e-4)


def test_run_query_flags_reach_the_scoring(cli_model, factors_dir, tmp_path):
    """--score-batch-size changes only how rows are batched (same scores, at a damping a user would run);
    --damping-factor reaches the scoring; --query-gradient-rank stores query
    gradients at that rank (other scores, of the same sign where they are large); --render chat tokenizes with the
    chat template (other query losses than plain)."""
    import numpy as np

    def scores(name, *flags):
        run_query(query_args(cli_model, factors_dir, tmp_path / name) + list(flags))
        frame = pd.read_csv(tmp_path / name / "influences.csv")
        return frame.pivot(index="query_id", columns="train_id", values="influence_score").to_numpy(), \
            pd.read_csv(tmp_path / name / "query.csv")["loss"].to_numpy()

    default, plain_loss = scores("default")
    damped = ["--damping-factor", "heuristic"]
    unbatched, _ = scores("damped", *damped)
    batched, _ = scores("batched", "--score-batch-size", "5", *damped)
    # float32 sums of ~1e4 products per score round at ~sqrt(n) x 6e-8 ~ 1e-5 of the largest score; at damping
    # 1e-8 (the seed's default, `default` above) the nearly singular inverse amplifies the same rounding to a few
    # percent on other BLAS paths (MKL_CBWR=COMPATIBLE: 5%; at heuristic damping 8e-7 there)
    np.testing.assert_allclose(batched, unbatched, rtol=1e-4, atol=1e-5 * np.abs(unbatched).max())
    assert not np.allclose(unbatched, default, rtol=1e-2)  # damped scores are other scores
    low_rank, _ = scores("rank", "--query-gradient-rank", "1")
    assert np.isfinite(low_rank).all() and not np.allclose(low_rank, default, rtol=1e-3)
    _, chat_loss = scores("chat", "--render", "chat")
    assert not np.allclose(chat_loss, plain_loss)


def test_fit_hessians_flags_reach_the_fit(cli_model, tmp_path, monkeypatch):
    """The seed's batch-size, stride, revision and split flags arrive at the fit as given."""
    import playpen_attribution.influence as influence

    seen = {}

    def fake_fit(model, dataset, out, **kwargs):
        seen.update(model=model, dataset=dataset, **kwargs)
        return {"strategy": kwargs["strategy"], "num_examples": 1, "tracked_modules": ["m"]}

    monkeypatch.setattr(influence, "fit_factors", fake_fit)
    fit_hessians(["--model", str(cli_model / "model"), "--hessian-dataset", str(cli_model / "hessian"),
                  "--output-dir", str(tmp_path / "f"), "--factor-batch-size", "3", "--lambda-batch-size", "5",
                  "--layer-stride", "2", "--revision", "abc123", "--split", "validation", "--strategy", "kfac"])
    assert {k: seen[k] for k in ("covariance_batch_size", "lambda_batch_size", "layer_stride", "revision", "split",
                                 "strategy", "modules")} == {
        "covariance_batch_size": 3, "lambda_batch_size": 5, "layer_stride": 2, "revision": "abc123",
        "split": "validation", "strategy": "kfac", "modules": "mlp"}


def test_fit_hessians_on_an_adapter_tracks_its_lora_layers_from_a_datasetdict_split(demo_adapter, demo_tokens,
                                                                                     tmp_path):
    import datasets

    rows = datasets.load_from_disk(str(demo_tokens / "train")).select(range(6))
    datasets.DatasetDict({"train": rows.select(range(2)), "validation": rows}).save_to_disk(str(tmp_path / "dd"))
    fit_hessians(["--model", str(demo_adapter), "--hessian-dataset", str(tmp_path / "dd"), "--split", "validation",
                  "--output-dir", str(tmp_path / "f"), "--strategy", "diagonal", "--dtype", "float32"])
    meta = json.loads((tmp_path / "f" / "metadata.json").read_text())
    assert meta["num_examples"] == 6  # the validation split's rows, not train's 2
    assert meta["tracked_modules"] and all(".lora_A." in m or ".lora_B." in m for m in meta["tracked_modules"])
