"""The bench scripts' own arithmetic and refusals (the scripts themselves run for hours; these parts do not)."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quality_table  # noqa: E402
import rehearsal  # noqa: E402
import replicate_agreement  # noqa: E402

from playpen_attribution.removal import removal_stage  # noqa: E402
from playpen_attribution.stage import PEAK_RSS_LINE  # noqa: E402
from playpen_attribution.validation import split_half_agreement  # noqa: E402

QUERIES = 6


def write_setting(folder: Path, repeat_losses: np.ndarray) -> tuple[Path, Path]:
    """A setting's query_losses.json ([repeats, subsets, queries] losses, subsets keyed "0".."n-1" as the workflow
    writes them) and its query table: queries of three target words, two each."""
    folder.mkdir(parents=True)
    query_ids = [f"q{i}" for i in range(QUERIES)]
    record = {"query_ids": query_ids, "subsets": {
        str(s): {"row_ids": [], "query_losses": repeat_losses[:, s].mean(0).tolist(),
                 "repeat_losses": repeat_losses[:, s].tolist(), "training_seeds": [42, 43]}
        for s in range(repeat_losses.shape[1])}}
    (folder / "query_losses.json").write_text(json.dumps(record))
    pd.DataFrame({"row_id": query_ids, "prompt": [f"prompt {i}" for i in range(QUERIES)],
                  "completion": [f"GUESS: w{i // 2}" for i in range(QUERIES)],
                  "target_word": [f"w{i // 2}" for i in range(QUERIES)]}).to_parquet(folder / "query.parquet")
    return folder / "query_losses.json", folder / "query.parquet"


def test_replicate_agreement_reads_the_first_subsets_in_number_order_and_refuses_too_few(tmp_path):
    losses = np.random.default_rng(0).normal(size=(2, 12, QUERIES))
    setting = write_setting(tmp_path / "s", losses)
    read = replicate_agreement.outcomes_of(*setting, subsets=10)
    # subsets 0-9, not the first ten keys in text order ("0", "1", "10", "11", "2", ...)
    np.testing.assert_array_equal(read["outcomes"], -losses[:, :10])
    assert read["clusters"] == ["word:w0", "word:w0", "word:w1", "word:w1", "word:w2", "word:w2"]
    with pytest.raises(SystemExit, match=r"query_losses.json holds 12 subsets, fewer than --subsets 13"):
        replicate_agreement.outcomes_of(*setting, subsets=13)


def test_replicate_agreement_is_the_noise_ceiling_and_its_difference_is_paired(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(1, 20, QUERIES))
    noisy = data + rng.normal(scale=1.0, size=(2, 20, QUERIES))  # repeats that disagree
    exact = np.repeat(data, 2, axis=0)  # repeats that agree: the ceiling is 1
    settings = {name: replicate_agreement.outcomes_of(*write_setting(tmp_path / name, losses))
                for name, losses in (("noisy", noisy), ("exact", exact), ("noisy_again", noisy))}
    table = replicate_agreement.agreement_table(settings)
    assert table["noisy"]["agreement"][0] == pytest.approx(split_half_agreement(-noisy).mean())
    assert table["exact"]["agreement"][0] == pytest.approx(1.0)
    assert table["exact"]["reference"] == "noisy"
    assert table["exact"]["minus_reference"][0] == pytest.approx(1.0 - table["noisy"]["agreement"][0])
    # the same retrains under another name: every resample draws the same subsets and queries for both
    assert table["noisy_again"]["minus_reference"] == (0.0, 0.0, 0.0)
    # a setting compared with a reference of its own (NAME@REFERENCE): the same resamples, the other difference
    against_exact = replicate_agreement.agreement_table(settings, references={"noisy_again": "exact"})
    assert against_exact["noisy_again"]["reference"] == "exact"
    point, low, high = table["exact"]["minus_reference"]
    assert against_exact["noisy_again"]["minus_reference"] == pytest.approx((-point, -high, -low))
    with pytest.raises(SystemExit, match=r"settings \{'exact': 'halves'\} name a reference that is not another setting"):
        replicate_agreement.agreement_table(settings, references={"exact": "halves"})
    assert table["exact"]["seed_spread"] == 0.0
    assert table["noisy"]["subsets"] == 20 and table["noisy"]["repeats"] == 2


def test_replicate_agreement_refuses_settings_measured_on_other_subsets(tmp_path):
    losses = np.random.default_rng(2).normal(size=(2, 8, QUERIES))
    settings = {"a": replicate_agreement.outcomes_of(*write_setting(tmp_path / "a", losses)),
                "b": replicate_agreement.outcomes_of(*write_setting(tmp_path / "b", losses[:, :6]))}
    with pytest.raises(SystemExit, match="setting b measured other queries or subsets than a"):
        replicate_agreement.agreement_table(settings)


def test_a_setting_parses_to_nested_overrides():
    assert replicate_agreement.parse_setting("lr=training.learning_rate=1e-3,lora.dropout=0") == (
        "lr", {"training": {"learning_rate": 1e-3}, "lora": {"dropout": 0}}, None)
    assert replicate_agreement.parse_setting("baseline") == ("baseline", {}, None)
    assert replicate_agreement.parse_setting("epochs2@halves=training.epochs=2") == (
        "epochs2", {"training": {"epochs": 2}}, "halves")


def test_quality_table_refuses_an_lds_csv_without_the_paired_columns(tmp_path):
    pd.DataFrame({"method": ["ekfac"], "kind": ["method"], "lds": [0.1]}).to_csv(tmp_path / "lds.csv", index=False)
    with pytest.raises(SystemExit, match=r"lds.csv predates the paired columns; rerun its lds job"):
        quality_table.paired_table(tmp_path, "smol")


def write_scored_run(run_dir: Path, effects: np.ndarray, membership: np.ndarray, actual: np.ndarray) -> None:
    """A finished run's merged tables (queries and rows of three target words), its one method "exact" scoring
    every pair with `effects`, and its own LDS retrains' losses (`actual` [subsets, queries], losses = -effects)."""
    words = ["apple", "river", "chair"]
    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(effects.shape[0])],
                            "prompt": [f"CLUE: about {words[i % 3]} {i}" for i in range(effects.shape[0])],
                            "completion": [f"GUESS: {words[i % 3]}" for i in range(effects.shape[0])],
                            "game_role": "WordGuesser", "outcome": "success"})
    train = pd.DataFrame({"train_id": [f"t{i}" for i in range(effects.shape[1])],
                          "prompt": [f"CLUE: something on {words[i % 3]} {i}" for i in range(effects.shape[1])],
                          "completion": [f"GUESS: {words[i % 3]}" for i in range(effects.shape[1])],
                          "game_role": "WordGuesser", "outcome": "success"})
    (run_dir / "validation" / "lds").mkdir(parents=True)
    queries.to_csv(run_dir / "query.csv", index=False)
    train.to_csv(run_dir / "train.csv", index=False)
    q, t = np.meshgrid(range(len(queries)), range(len(train)), indexing="ij")
    pd.DataFrame({"query_id": queries.query_id.to_numpy()[q.ravel()], "train_id": train.train_id.to_numpy()[t.ravel()],
                  "method": "exact", "influence_score": effects.ravel()}).to_csv(run_dir / "influences.csv", index=False)
    subsets = {str(s): {"row_ids": [f"t{i}" for i in np.flatnonzero(m)], "query_losses": list(-actual[s])}
               for s, m in enumerate(membership)}
    (run_dir / "validation" / "lds" / "query_losses.json").write_text(
        json.dumps({"query_ids": list(queries.query_id), "subsets": subsets}))


def test_quality_table_measures_a_runs_scores_against_another_runs_retrains(tmp_path):
    rng = np.random.default_rng(0)
    effects = rng.normal(size=(6, 12))
    membership = (rng.random((16, 12)) < 0.5).astype(float)
    # "one": scores exact for the retrains of "two", whose own scores are noisy; its own retrains follow other effects
    write_scored_run(tmp_path / "one/results/smol", effects, membership, membership @ rng.normal(size=(6, 12)).T)
    write_scored_run(tmp_path / "two/results/smol", effects + rng.normal(size=effects.shape), membership,
                     membership @ effects.T)
    losses = tmp_path / "two/results/smol/validation/lds/query_losses.json"
    out = quality_table.lds_against_retrains(tmp_path / "one/results/smol", losses, tmp_path / "out")
    lds = pd.read_csv(out / "lds.csv").set_index("method")
    assert lds.loc["exact", "lds"] == pytest.approx(1.0)  # exact effects rank every subset as retraining does
    # paired against the same retrains, "one" beats "two" by what each LDS says; on their own retrains they differ
    [line] = quality_table.versus_table(tmp_path / "one/results/smol", tmp_path / "two/results/smol", "smol",
                                        losses_json=losses)
    own_two = quality_table.lds_against_retrains(tmp_path / "two/results/smol", losses, tmp_path / "out_two")
    two = pd.read_csv(own_two / "lds.csv").set_index("method").loc["exact", "lds"]
    assert line.startswith(f"| smol | exact | 1.000 | {two:.3f} | +{1 - two:.3f} [") and two < 0.9
    with pytest.raises(SystemExit, match="measure against different retrains"):
        quality_table.versus_table(tmp_path / "one/results/smol", tmp_path / "two/results/smol", "smol")
    with pytest.raises(SystemExit, match="--retrains names a workdir whose LDS retrains have run"):
        quality_table.lds_against_retrains(tmp_path / "one/results/smol", tmp_path / "none.json", tmp_path / "o")


def test_the_per_job_table_reads_an_ensemble_members_jobs_and_plans_them_as_the_runs(tmp_path):
    """An ensemble member's attribution jobs and the members' means keep their benchmarks in folders: the per-job table
    reads them with their own logged peaks, and compares each with the plan of its job kind."""
    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    jobs = {"bergson_index_0": (85.0, 5000, 6000), "ensemble/member-1/bergson_index_0": (86.0, 5100, 6100),
            "ensemble_mean_scores/bergson/scores/cosine/shard-0.npz": (1.0, 300, 320)}
    for job, (seconds, rss, peak) in jobs.items():
        bench, log = tmp_path / "benchmarks" / "smol" / f"{job}.tsv", tmp_path / "logs" / "smol" / f"{job}.log"
        for path in (bench, log):
            path.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(header + f"{seconds}\t0:01:25\t{rss}\t0\t0\t0\t0\t0\t0\t0\n")
        log.write_text(PEAK_RSS_LINE.format(peak) + "\n")  # as every job logs it
    rows = {row["job"]: row for row in rehearsal.read_benchmarks(tmp_path, "smol")}
    assert {job: (row["seconds"], row["sampled_rss_mb"], row["peak_mb"]) for job, row in rows.items()} == \
        {job: (float(s), float(r), float(p)) for job, (s, r, p) in jobs.items()}
    kinds = {"bergson_index": 1, "planted_bergson_index": 1, "ensemble_mean_scores": 1}
    assert [rehearsal.plan_kind(job, kinds) for job in jobs] == ["bergson_index", "bergson_index",
                                                                "ensemble_mean_scores"]


def test_quality_table_measures_the_lds_on_the_subsets_it_is_given_and_refuses_others(tmp_path, monkeypatch, capsys):
    """--subsets 0-7: the LDS from those retrains alone (a setting chosen on some subsets is reported on the others):
    retrains 0-7 follow the scored effects exactly, 8-15 other effects, so the LDS is 1 on the first half only."""
    rng = np.random.default_rng(1)
    effects = rng.normal(size=(6, 12))
    membership = (rng.random((16, 12)) < 0.5).astype(float)
    actual = np.vstack([membership[:8] @ effects.T, membership[8:] @ rng.normal(size=(6, 12)).T])
    write_scored_run(tmp_path / "w/results/smol", effects, membership, actual)
    assert quality_table.parse_subsets("0-2,5, 4") == ["0", "1", "2", "4", "5"]
    with pytest.raises(SystemExit, match=r"--subsets 3-1: '3-1' is not a subset number or a range like 0-9"):
        quality_table.parse_subsets("3-1")

    def lds_of(spec):
        monkeypatch.setattr(sys, "argv", ["quality_table.py", "--workdir", str(tmp_path / "w"), "--run", "smol",
                                          "--subsets", spec, "--out", str(tmp_path / f"out-{spec}"), "--seed", "0"])
        quality_table.main()
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| smol | exact | "))
        kept = json.loads((tmp_path / f"out-{spec}/smol/query_losses.json").read_text())["subsets"]
        return float(line.split(" | ")[2].split()[0]), sorted(kept, key=int)

    first, kept = lds_of("0-7")
    assert first == pytest.approx(1.0) and kept == [str(s) for s in range(8)]
    second, kept = lds_of("8-15")
    assert second < 0.9 and kept == [str(s) for s in range(8, 16)]
    with pytest.raises(SystemExit, match=r"has no retrains of subset\(s\) \['16'\]"):
        lds_of("15-16")
    with pytest.raises(SystemExit, match="query_losses.json is missing: --subsets needs a workdir whose LDS retrains"):
        quality_table.subset_losses(tmp_path / "w/results/real/validation/lds/query_losses.json", ["0"], tmp_path / "o")


def write_removal_check(results: Path, losses: dict, kinds: dict) -> None:
    """A run's query.csv/train.csv and its removal check's files as the workflow writes them: `losses` maps
    (selection, fraction) to [repeats, queries] losses; the reference is ("none", "0")."""
    folder = results / "validation" / "removal"
    query_ids = [f"q{i}" for i in range(QUERIES)]
    (folder / "rows").mkdir(parents=True)
    pd.DataFrame({"query_id": query_ids, "prompt": [f"prompt {i}" for i in range(QUERIES)],
                  "completion": [f"GUESS: w{i // 2}" for i in range(QUERIES)],
                  "target_word": [f"w{i // 2}" for i in range(QUERIES)]}).to_csv(results / "query.csv", index=False)
    pd.DataFrame({"train_id": [f"t{i}" for i in range(20)], "prompt": [f"prompt {i}" for i in range(20)],
                  "completion": [f"GUESS: w{i % 3}" for i in range(20)]}).to_csv(results / "train.csv", index=False)
    every_fraction = sorted({f for (s, f) in losses if s != "none"})
    for selection, kind in kinds.items():
        fractions = {f: values for (s, f), values in losses.items() if s == selection}
        removed = {} if selection == "none" else {f: [f"t{i}" for i in range(round(20 * float(f)))] for f in fractions}
        (folder / "rows" / f"{selection}.json").write_text(json.dumps(
            {"selection": selection, "kind": kind, "fractions": every_fraction, "removed": removed, "train_rows": 20}))
        for repeat in range(2):
            record = {"selection": selection, "repeat": repeat, "query_ids": query_ids,
                      "fractions": {f: {"query_losses": values[repeat].tolist()} for f, values in fractions.items()}}
            (folder / "losses" / selection).mkdir(parents=True, exist_ok=True)
            (folder / "losses" / selection / f"repeat-{repeat}.json").write_text(json.dumps(record))


def test_quality_table_compares_two_configurations_removal_checks_paired_over_the_same_reference(tmp_path):
    """--versus on two removal checks of one run (e.g. scoring another adapter): each method's rise here minus the
    other's, per fraction, is the mean over queries of the two sides' losses after removal (averaged over repeats);
    a method both sides chose the same rows for differs by exactly 0; other references are refused."""
    rng = np.random.default_rng(3)
    reference = rng.normal(3.0, 0.1, size=(2, QUERIES))
    same = rng.normal(3.5, 0.1, size=(2, QUERIES))
    kinds = {"none": "reference", "random-0": "control", "ekfac": "method", "bergson_cosine": "method"}
    mine = {("none", "0"): reference, ("random-0", "0.1"): same, ("ekfac", "0.1"): same + 0.4,
            ("bergson_cosine", "0.1"): rng.normal(3.6, 0.2, size=(2, QUERIES))}
    theirs = {**mine, ("ekfac", "0.1"): same + rng.normal(0.1, 0.2, size=(2, QUERIES))}
    write_removal_check(tmp_path / "a/results/real", mine, kinds)
    write_removal_check(tmp_path / "b/results/real", theirs, {**kinds, "identity": "method"})
    lines = quality_table.removal_versus_table(tmp_path / "a/results/real", tmp_path / "b/results/real", "real")
    expected = (mine[("ekfac", "0.1")].mean(0) - theirs[("ekfac", "0.1")].mean(0)).mean()
    assert lines[0] == "| real | 0.1 | bergson_cosine | +0.000 [+0.000, +0.000] |"
    assert lines[1].startswith(f"| real | 0.1 | ekfac | {expected:+.3f} [") and len(lines) == 2 and expected > 0.1
    # another training of the reference: the rises are not over the same losses
    write_removal_check(tmp_path / "c/results/real", {**theirs, ("none", "0"): reference + 0.01}, kinds)
    with pytest.raises(SystemExit, match="retrained different references"):
        quality_table.removal_versus_table(tmp_path / "a/results/real", tmp_path / "c/results/real", "real")
    with pytest.raises(SystemExit, match="holds no removal check"):
        quality_table.removal_versus_table(tmp_path / "a/results/real", tmp_path / "none/results/real", "real")


def test_quality_table_of_a_run_built_to_its_removal_check_only_prints_the_removal_rows(tmp_path, monkeypatch, capsys):
    """A run built only to removal.csv (no LDS retrains, no lds.csv): the removal check's rows, each rise as the
    workflow's removal stage computed it, and a line saying the LDS has not run, rather than a missing-file error."""
    rng = np.random.default_rng(4)
    reference = rng.normal(3.0, 0.1, size=(2, QUERIES))
    losses = {("none", "0"): reference, ("random-0", "0.1"): reference + 0.01, ("tfidf", "0.1"): reference + 0.2,
              ("ekfac", "0.1"): reference + 0.5}
    results = tmp_path / "w/results/real"
    write_removal_check(results, losses, {"none": "reference", "random-0": "control", "tfidf": "baseline",
                                          "ekfac": "method"})
    folder = results / "validation" / "removal"
    removal_stage(results / "query.csv", results / "train.csv", sorted((folder / "rows").glob("*.json")),
                  sorted((folder / "losses").glob("*/repeat-*.json")), results / "validation" / "removal.csv",
                  tmp_path / "removal.png", seed=0)
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "--workdir", str(tmp_path / "w"), "--run", "real"])
    quality_table.main()
    out = capsys.readouterr().out
    assert f"real: no lds.csv in {results / 'validation'} (its LDS has not run): the removal check only" in out
    # 10% of 20 rows; every query's loss 0.5 above the reference, 0.49 above random's, 0.3 above TF-IDF's
    assert "| real | 0.1 | ekfac | 2 | +0.500 [+0.500, +0.500] | +0.490 [+0.490, +0.490] | +0.300 [+0.300, +0.300] |" in out
    # no LDS row: every row of the run is a removal row (TF-IDF, EK-FAC and the random draws' mean, at 10%)
    assert sorted(line.split(" | ")[2] for line in out.splitlines() if line.startswith("| real | ")) == \
        ["ekfac", "random", "tfidf"] and all(line.startswith("| real | 0.1 | ")
                                             for line in out.splitlines() if line.startswith("| real | "))
