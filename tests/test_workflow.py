"""The Snakemake DAG itself: end to end on the demo, caching, dry-runs of the real runs, bad input."""

import json
import re

import pytest
import yaml

from conftest import snakemake

pytestmark = pytest.mark.slow


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from a dry-run's "Job stats" table (empty when nothing is to be done)."""
    if "Nothing to be done" in proc.stdout:
        return {}
    table = proc.stdout.split("Job stats:")[1]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    jobs.pop("total", None)
    return {rule: int(n) for rule, n in jobs.items()}


def overlay(workdir, name, runs):
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"runs": runs}))
    return str(path)


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo-run")
    snakemake(workdir, "results/demo/influences.csv")
    return workdir


def test_demo_builds_an_adapter(demo_workdir):
    adapter = demo_workdir / "results" / "demo" / "adapter"
    manifest = json.loads((adapter / "manifest.json").read_text())
    report = {"train": json.loads((demo_workdir / "results/demo/data/train.report.json").read_text())}
    assert manifest["n_trained_rows"] == report["train"]["counts"]["kept"] > 50
    losses = [entry["loss"] for entry in manifest["log_history"] if "loss" in entry]
    assert manifest["metrics"]["train_loss"] > 0 and len(losses) >= 3 and losses[-1] < 0.7 * losses[0]
    for rule in ("prepare_data_train", "prepare_data_query", "build_tiny_model", "tokenize_train", "tokenize_query", "train_adapter"):
        assert (demo_workdir / "benchmarks" / "demo" / f"{rule}.tsv").is_file(), rule
        assert (demo_workdir / "logs" / "demo" / f"{rule}.log").is_file(), rule
    assert "adapter written" in (demo_workdir / "logs/demo/train_adapter.log").read_text()


def test_demo_influences_in_the_seed_format_with_methods(demo_workdir):
    import pandas as pd

    results = demo_workdir / "results" / "demo"
    query, train = pd.read_csv(results / "query.csv"), pd.read_csv(results / "train.csv")
    influences = pd.read_csv(results / "influences.csv")
    assert list(query.columns[:4]) == ["query_id", "prompt", "completion", "loss"]
    assert {"game", "game_role", "outcome", "task_id"} <= set(query.columns) & set(train.columns)
    assert list(influences.columns) == ["query_id", "train_id", "method", "influence_score"]
    assert set(influences["method"]) == {"ekfac", "identity"}
    assert len(influences) == 2 * len(query) * len(train)
    # the demo's right answer: the most influential rows of a query guess the same word
    same = []
    for (method, query_id), group in influences.groupby(["method", "query_id"]):
        top = group.nlargest(5, "influence_score")["train_id"]
        wanted = query.set_index("query_id").loc[query_id, "completion"]
        same.append((train.set_index("train_id").loc[top, "completion"] == wanted).mean())
    assert sum(same) / len(same) > 0.8


def test_second_run_builds_nothing(demo_workdir):
    assert planned_jobs(snakemake(demo_workdir, "-n", "results/demo/influences.csv")) == {}


def test_new_query_set_rescores_without_refitting_or_retraining(demo_workdir):
    path = overlay(demo_workdir, "queries", {"demo": {"data": {"max_rows": {"query": 10}}}})
    jobs = planned_jobs(snakemake(demo_workdir, "results/demo/influences.csv", "-n", "--configfile", path))
    assert jobs == {"prepare_data": 1, "tokenize": 1, "kronfluence_scores": 4, "merge_influences": 1}


def test_lora_rank_change_retrains_without_refiltering(demo_workdir):
    path = overlay(demo_workdir, "rank", {"demo": {"lora": {"r": 4}}})
    jobs = planned_jobs(snakemake(demo_workdir, "results/demo/influences.csv", "-n", "--configfile", path))
    assert jobs == {"train_adapter": 1, "fit_factors": 2, "kronfluence_scores": 4, "merge_influences": 1}


def test_filter_change_redoes_data_but_not_the_base_model(demo_workdir):
    path = overlay(demo_workdir, "filter", {"demo": {"data": {"null_outcome": "drop"}}})
    jobs = planned_jobs(snakemake(demo_workdir, "results/demo/influences.csv", "-n", "--configfile", path))
    assert jobs == {"prepare_data": 2, "tokenize": 2, "train_adapter": 1, "fit_factors": 2,
                    "kronfluence_scores": 4, "merge_influences": 1}


def test_real_runs_dry_run_builds_the_dag(tmp_path):
    proc = snakemake(tmp_path, "-n", "results/taboo/influences.csv", "results/taboo_describer/influences.csv")
    assert planned_jobs(proc) == {"fetch_base_model": 2, "prepare_data": 4, "tokenize": 4, "train_adapter": 2,
                                  "fit_factors": 2, "kronfluence_scores": 8, "merge_influences": 2}
    assert "gpu=1" in proc.stdout


def test_unknown_config_key_is_refused_by_name(tmp_path):
    path = overlay(tmp_path, "typo", {"demo": {"lora": {"rank": 4}}})
    proc = snakemake(tmp_path, "results/demo/adapter", "-n", "--configfile", path, check=False)
    assert proc.returncode != 0
    assert "runs.demo.lora: unknown key(s) ['rank']" in proc.stdout + proc.stderr


def test_bad_filter_fails_clearly_and_leaves_no_output(tmp_path):
    path = overlay(tmp_path, "role", {"demo": {"data": {"role": "Nobody"}}})
    proc = snakemake(tmp_path, "results/demo/data/train.parquet", "--configfile", path, check=False)
    assert proc.returncode != 0
    assert "game 'taboo' has no role 'Nobody'; roles present" in proc.stderr
    assert not (tmp_path / "results/demo/data").exists() or not any((tmp_path / "results/demo/data").iterdir())


def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr
