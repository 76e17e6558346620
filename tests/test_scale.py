"""What breaks at the real size, checked at a small one: the merge streamed in blocks and shards equals a direct
computation, merges and the report never import torch, per-token arrays and shard counts that cannot work are
refused before anything runs, logits only where the loss needs them, Bergson in one process per job."""

import json
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest

from playpen_attribution.config import ConfigError, validate_config
from playpen_attribution.tables import save_shard, shard_indices


def small_run(tmp_path, tiny_model_dir, n_query=5, n_train=7, per_token=True):
    """Tables, tokens, query losses and two shards of two methods (one with per-token scores, one with a NaN)."""
    rng = np.random.default_rng(0)
    query_ids = [f"validation-{i:06d}" for i in range(n_query)]
    train_ids = [f"train-{i:06d}" for i in range(n_train)]
    lengths = {t: int(rng.integers(3, 9)) for t in train_ids}
    for role, ids in (("query", query_ids), ("train", train_ids)):
        pd.DataFrame({"row_id": ids, "prompt": [f"prompt, {i}" for i in ids], "completion": [f"GUESS: {i}" for i in ids],
                      "game": "taboo", "outcome": "success"}).to_parquet(tmp_path / f"{role}.parquet")
        rows = {"row_id": ids, "input_ids": [[5] * (lengths.get(i) or 4) for i in ids]}
        datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / f"tokens-{role}"))
    (tmp_path / "losses.json").write_text(json.dumps({"query_ids": query_ids, "losses": [1.5] * n_query}))
    scores = {m: rng.normal(size=(n_query, n_train)).astype(np.float32) for m in ("ekfac", "bergson_cosine")}
    scores["bergson_cosine"][:, 2] = np.nan  # a row Bergson could not score
    width = max(lengths.values())
    per_tok = rng.normal(size=(n_query, n_train, width)).astype(np.float32)
    for t, tid in enumerate(train_ids):
        per_tok[:, t, lengths[tid]:] = 0.0
    scores["ekfac"] = per_tok.sum(-1)
    shards = {}
    for method in scores:
        shards[method] = []
        for s in range(2):
            rows = shard_indices(n_train, 2, s)
            path = tmp_path / f"{method}-{s}.npz"
            pt = per_tok[:, rows, :] if (method == "ekfac" and per_token) else None
            save_shard(path, scores[method][:, rows], query_ids, [train_ids[i] for i in rows], pt)
            shards[method].append(str(path))
    return {"query_ids": query_ids, "train_ids": train_ids, "lengths": lengths, "scores": scores,
            "per_token": per_tok, "shards": shards, "tokenizer": tiny_model_dir / "tokenizer.json"}


MERGE_AND_REPORT = """
import sys, json
from pathlib import Path
from playpen_attribution.scores import merge_influences_stage
from playpen_attribution.report import build_report
d = Path(sys.argv[1]); shards = json.loads(sys.argv[2])
merge_influences_stage(d / "query.parquet", d / "train.parquet", d / "tokens-query", d / "tokens-train",
                       d / "losses.json", shards, d / "query.csv", d / "train.csv", d / "influences.csv")
build_report(query_csv=d / "query.csv", train_csv=d / "train.csv", influences_csv=d / "influences.csv",
             out_dir=d / "report", train_tokens_dir=d / "tokens-train", tokenizer_file=sys.argv[3])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
assert not loaded, f"merges and the report imported {loaded[:5]}"
"""


def test_streamed_merge_equals_a_direct_table_and_neither_merge_nor_report_imports_torch(tmp_path, tiny_model_dir):
    run = small_run(tmp_path, tiny_model_dir)
    proc = subprocess.run([sys.executable, "-c", MERGE_AND_REPORT, str(tmp_path), json.dumps(run["shards"]),
                           str(run["tokenizer"])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = pd.read_csv(tmp_path / "influences.csv", dtype={"query_id": str, "train_id": str})
    # the direct computation: every method, queries outermost, training rows in order, unscored pairs left out
    expected = []
    for method, scores in run["scores"].items():
        for q, qid in enumerate(run["query_ids"]):
            for t, tid in enumerate(run["train_ids"]):
                if np.isfinite(scores[q, t]):
                    tokens = run["per_token"][q, t, :run["lengths"][tid]].tolist() if method == "ekfac" else None
                    expected.append((qid, tid, method, float(scores[q, t]), tokens))
    assert list(merged.columns) == ["query_id", "train_id", "method", "influence_score", "per_token_scores"]
    assert list(zip(merged.query_id, merged.train_id, merged.method)) == [e[:3] for e in expected]
    np.testing.assert_allclose(merged.influence_score, [e[3] for e in expected], rtol=1e-6)
    for value, e in zip(merged.per_token_scores, expected):
        if e[4] is None:
            assert pd.isna(value)
        else:
            np.testing.assert_allclose(json.loads(value), e[4], rtol=1e-6)
    assert pd.read_csv(tmp_path / "query.csv").loss.tolist() == [1.5] * len(run["query_ids"])
    assert (tmp_path / "report" / "index.html").is_file()
    assert not list(tmp_path.glob(".parts-*")) and not list(tmp_path.glob(".*tmp-*"))


def test_merge_refuses_losses_of_other_queries(tmp_path, tiny_model_dir):
    from playpen_attribution.scores import merge_influences_stage

    run = small_run(tmp_path, tiny_model_dir, per_token=False)
    (tmp_path / "losses.json").write_text(json.dumps({"query_ids": ["validation-000009"], "losses": [1.0]}))
    with pytest.raises(ValueError, match="losses of other queries.*rerun query_losses"):
        merge_influences_stage(tmp_path / "query.parquet", tmp_path / "train.parquet", tmp_path / "tokens-query",
                               tmp_path / "tokens-train", tmp_path / "losses.json", run["shards"],
                               tmp_path / "query.csv", tmp_path / "train.csv", tmp_path / "influences.csv")
    assert not (tmp_path / "influences.csv").exists() and not (tmp_path / "query.csv").exists()


def test_per_token_scores_too_large_are_refused_before_a_model_is_loaded(tmp_path):
    from playpen_attribution.influence import score_pairs

    query = datasets.Dataset.from_dict({"input_ids": [[1] * 300] * 30, "labels": [[1] * 300] * 30})
    train = datasets.Dataset.from_dict({"input_ids": [[1] * 1024] * 50, "labels": [[1] * 1024] * 50})
    # 30 x 50 x 1024 x 4 bytes = 6.1 MB; the model reference does not exist: the size check must come first
    with pytest.raises(ValueError, match=r"30 queries x 50 training rows x 1024 tokens would take 0\.0 GB.*"
                                         r"attribution\.kronfluence\.per_token_max_gb"):
        score_pairs(str(tmp_path / "no-model"), tmp_path / "no-factors", query, train, per_token=True,
                    per_token_max_gb=0.001)


def test_more_shards_than_rows_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="attribution.shards is 5 but the training set has only 3 rows"):
        shard_indices(3, 5, 0)
    run = {"data": {"source": {"kind": "json", "train": "a", "query": "b"}, "max_rows": {"train": 3}},
           "model": {"tiny": {}}, "attribution": {"shards": 4}}
    with pytest.raises(ConfigError, match=r"runs\.r\.attribution\.shards: 4 shards for at most 3 training rows"):
        validate_config({"runs": {"r": run}})


def test_logits_only_where_the_loss_needs_them_give_the_same_loss(tiny_model_dir):
    import torch
    import torch.nn.functional as F

    from playpen_attribution.modeling import collate, completion_loss, load_model

    model = load_model(tiny_model_dir)
    rows = [{"input_ids": list(range(10, 30)), "labels": [-100] * 17 + list(range(27, 30))},
            {"input_ids": list(range(40, 52)), "labels": [-100] * 8 + list(range(48, 52))}]
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        ours = completion_loss(model, batch, reduction="per_example")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        full = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100,
                               reduction="none").sum(1)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


def test_adapter_records_its_base_relative_to_itself_inside_the_project(tmp_path, monkeypatch):
    from playpen_attribution.modeling import adapter_base_path, portable_base_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results/r/base_model").mkdir(parents=True)
    (tmp_path / "results/r/adapter").mkdir()
    assert portable_base_path("results/r/base_model", "results/r/adapter") == "../base_model"
    (tmp_path / "results/r/adapter/adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "../base_model"}))
    assert adapter_base_path(tmp_path / "results/r/adapter") == str(tmp_path / "results/r/base_model")
    outside = tmp_path.parent / f"{tmp_path.name}-models" / "base"
    assert portable_base_path(outside, "results/r/adapter") == str(outside)


def test_code_hash_covers_the_modules_a_stage_imports(tmp_path, monkeypatch):
    from playpen_attribution import provenance

    (tmp_path / "stage.py").write_text("from playpen_attribution.helper import f\n")
    (tmp_path / "helper.py").write_text("def f():\n    return 1\n")
    (tmp_path / "other.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "PACKAGE_DIR", tmp_path)
    assert provenance.module_closure(["stage"]) == {"stage", "helper"}
    before = provenance.code_hash("stage")
    (tmp_path / "other.py").write_text("x = 2\n")  # not imported: no rerun
    assert provenance.code_hash("stage") == before
    (tmp_path / "helper.py").write_text("def f():\n    return 2\n")  # imported: the stage reruns
    assert provenance.code_hash("stage") != before


def test_every_rule_hashes_the_code_its_own_script_imports():
    """Each rule's `code` param names its own script (a `use rule` its parent's), so the modules hashed are read
    from the code that runs, never from a hand-kept list."""
    import re

    from playpen_attribution.provenance import module_closure, script_modules

    from conftest import REPO

    scripts, coded, parents = {}, {}, {}  # rule -> its script; rule -> (its parent, the script its code names)
    for path in sorted((REPO / "workflow/rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule |use rule )", path.read_text()):
            own = re.match(r"rule (\w+):", block)
            used = re.match(r"use rule (\w+) as (\w+) with:", block)
            if own:
                script = re.search(r'script:\s*\n\s*"\.\./scripts/([\w.]+)"', block)
                scripts[own.group(1)] = script.group(1) if script else None
            elif used:
                parents[used.group(2)] = used.group(1)
            code = re.search(r'code=script_code\("([\w.]+)"\)', block)
            if code:
                name, parent = (own.group(1), own.group(1)) if own else (used.group(2), used.group(1))
                coded[name] = (parent, code.group(1))

    def script_of(rule):  # a `use rule` of a `use rule` runs its first ancestor's script
        return scripts[rule] if rule in scripts else script_of(parents[rule])

    assert {rule for rule, script in scripts.items() if script} <= set(coded), "a rule with a script has no code"
    for rule, (parent, script) in coded.items():
        assert script == script_of(parent), rule
    # e.g. the LDS table's hash covers the baselines module its stage imports lazily
    assert "baselines" in module_closure(script_modules(REPO / "workflow/scripts/lds.py"))


def test_shards_that_do_not_belong_together_are_refused_naming_the_file(tmp_path):
    """A shard scored against other queries, or one from another shard split (a stale shard left by a different
    attribution.shards), never merges into a table that looks complete."""
    from playpen_attribution.tables import load_shards

    scores = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_shard(tmp_path / "a.npz", scores, ["q0", "q1"], ["t0", "t1", "t2"])
    save_shard(tmp_path / "b.npz", scores, ["q0", "q1"], ["t3", "t4", "t5"])
    save_shard(tmp_path / "other-queries.npz", scores, ["q0", "q9"], ["t3", "t4", "t5"])
    save_shard(tmp_path / "stale.npz", scores, ["q0", "q1"], ["t2", "t3", "t4"])
    merged = load_shards([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert merged["train_ids"] == ["t0", "t1", "t2", "t3", "t4", "t5"] and merged["scores"].shape == (2, 6)
    with pytest.raises(ValueError, match=r"other-queries.npz was scored against other queries than .*a.npz"):
        load_shards([tmp_path / "a.npz", tmp_path / "other-queries.npz"])
    with pytest.raises(ValueError, match=r"training row t2 is in more than one shard \(.*stale.npz and an earlier one\)"):
        load_shards([tmp_path / "a.npz", tmp_path / "stale.npz"])
