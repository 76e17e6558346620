"""The report's numbers on small tables with known answers (no model, no torch): ranks, agreement, target words,
the page."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from playpen_attribution.report import OVERALL, build_report
from playpen_attribution.scores import agreement, load_method_scores, plain_counterpart, spearman, topk_overlap
from playpen_attribution.taboo import target_word

DESCRIBER_PROMPT = ("Rules ...\n\nThis is the target word that you need to describe and that the other player needs "
                    "to guess:\n\nHoney\n\nRelated words are:\n\n- bee")


def test_target_word_where_the_episode_reveals_it():
    assert target_word(DESCRIBER_PROMPT, "CLUE: made by bees", "WordDescriber", "failure") == "honey"
    assert target_word("CLUE: pressed into cider", "GUESS: Apple", "WordGuesser", "success") == "apple"
    # a failed guesser's last guess is wrong: the target cannot be recovered
    assert target_word("CLUE: pressed into cider", "GUESS: pear", "WordGuesser", "failure") is None
    assert target_word("Let us play wordle", "ANSWER: x", "Player 1", "success") is None
    # the workflow's tables hold chat turns as JSON message lists
    turns = json.dumps([{"role": "user", "content": "CLUE: cider"}, {"role": "assistant", "content": "GUESS: pear"},
                        {"role": "user", "content": "CLUE: red"}])
    assert target_word(turns, json.dumps([{"role": "assistant", "content": "GUESS: Apple"}]), "WordGuesser",
                       "success") == "apple"
    describer = json.dumps([{"role": "user", "content": DESCRIBER_PROMPT}])
    assert target_word(describer, json.dumps([{"role": "assistant", "content": "CLUE: bees"}]), "WordDescriber",
                       "aborted") == "honey"


def test_spearman_and_overlap_equal_direct_computations():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    b[:25] += 2 * a[:25]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    a_nan = a.copy()
    a_nan[[3, 7]] = np.nan
    keep = ~np.isnan(a_nan)
    assert spearman(a_nan, b) == pytest.approx(spearmanr(a[keep], b[keep]).statistic)
    assert spearman(a, -a) == pytest.approx(-1.0)
    top_a = set(np.argsort(-a)[:5])
    top_b = set(np.argsort(-b)[:5])
    assert topk_overlap(a, b, 5) == len(top_a & top_b) / 5
    assert topk_overlap(a, a, 5) == 1.0


def tables(tmp_path, rng):
    """Three queries, eight training rows, two methods (one Kronfluence, one Bergson with a reduced score)."""
    queries = pd.DataFrame({"query_id": ["q0", "q1", "q2"], "prompt": ["CLUE: sweet"] * 3,
                            "completion": ["GUESS: honey", "GUESS: apple", "GUESS: river"], "loss": [1.0, 2.0, 3.0],
                            "game_role": "WordGuesser", "outcome": "success"})
    words = ["honey", "apple", "river", "honey", "apple", "river", "honey", "pear"]
    train = pd.DataFrame({"train_id": [f"t{i}" for i in range(8)], "prompt": ["CLUE: x"] * 8,
                          "completion": [f"GUESS: {w}" for w in words], "game": "taboo", "game_role": "WordGuesser",
                          "outcome": ["success"] * 7 + ["failure"], "experiment": "e", "task_id": range(8)})
    ekfac = rng.normal(size=(3, 8))
    ekfac[0, 3] = 10.0  # a planted favourite of q0
    cosine = 0.5 * ekfac + rng.normal(scale=0.1, size=(3, 8))
    rows = [{"query_id": q, "train_id": t, "method": m, "influence_score": s[i, j]}
            for m, s in (("ekfac", ekfac), ("bergson_cosine", cosine))
            for i, q in enumerate(queries.query_id) for j, t in enumerate(train.train_id)]
    influences = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # the report must not rely on row order
    reduced = pd.DataFrame({"train_id": train.train_id, "method": "bergson_cosine", "score": cosine.mean(0) + 1.0})
    paths = {name: tmp_path / f"{name}.csv" for name in ("query", "train", "influences", "train_scores")}
    for frame, name in ((queries, "query"), (train, "train"), (influences, "influences"), (reduced, "train_scores")):
        frame.to_csv(paths[name], index=False)
    return paths, ekfac, cosine


def test_scores_by_method_in_table_order(tmp_path):
    paths, ekfac, cosine = tables(tmp_path, np.random.default_rng(1))
    methods = load_method_scores(paths["influences"], ["q0", "q1", "q2"], [f"t{i}" for i in range(8)],
                                 paths["train_scores"])
    np.testing.assert_allclose(methods["ekfac"].per_query, ekfac)
    np.testing.assert_allclose(methods["ekfac"].overall, ekfac.mean(0))
    # a Bergson variant's overall score is its reduced-query score from train_scores.csv
    np.testing.assert_allclose(methods["bergson_cosine"].overall, cosine.mean(0) + 1.0)


def test_agreement_with_itself_is_one_and_matches_per_query_spearman(tmp_path):
    paths, ekfac, cosine = tables(tmp_path, np.random.default_rng(2))
    methods = load_method_scores(paths["influences"], ["q0", "q1", "q2"], [f"t{i}" for i in range(8)],
                                 paths["train_scores"])
    table = agreement(methods, k=3).set_index(["method_a", "method_b"])
    for m in methods:
        assert table.loc[(m, m), "mean_query_spearman"] == pytest.approx(1.0)
        assert table.loc[(m, m), "mean_query_top3_overlap"] == 1.0
    expected = np.mean([spearmanr(ekfac[q], cosine[q]).statistic for q in range(3)])
    assert table.loc[("ekfac", "bergson_cosine"), "mean_query_spearman"] == pytest.approx(expected)
    assert table.loc[("ekfac", "bergson_cosine"), "queries"] == 3


def test_plain_counterparts():
    methods = ["ekfac", "identity", "bergson_cosine", "bergson_cosine_train", "bergson_dot_mixed"]
    assert plain_counterpart("bergson_cosine_train", methods) == "bergson_cosine"
    assert plain_counterpart("ekfac", methods) == "identity"
    assert plain_counterpart("bergson_dot_mixed", methods) is None  # bergson_dot is not in the run
    assert plain_counterpart("bergson_cosine", methods) is None


def test_report_files_ranks_and_a_self_contained_page(tmp_path):
    paths, ekfac, _ = tables(tmp_path, np.random.default_rng(3))
    out = build_report(query_csv=paths["query"], train_csv=paths["train"], influences_csv=paths["influences"],
                       train_scores_csv=paths["train_scores"], out_dir=tmp_path / "report", top_k=3)
    episodes = pd.read_csv(out["top_episodes.csv"])
    top = episodes[(episodes.method == "ekfac") & (episodes.query_id == "q0") & (episodes.direction == "top")]
    assert top.train_id.tolist()[0] == "t3" and top["rank"].tolist() == [1, 2, 3]
    assert top.train_id.tolist() == [f"t{i}" for i in np.argsort(-ekfac[0])[:3]]
    bottom = episodes[(episodes.method == "ekfac") & (episodes.query_id == OVERALL) & (episodes.direction == "bottom")]
    assert bottom.train_id.tolist() == [f"t{i}" for i in np.argsort(ekfac.mean(0))[:3]]
    assert bottom["rank"].tolist() == [8, 7, 6] and (bottom["of"] == 8).all()
    assert top.target_word.tolist()[0] == "honey" and top.query_target_word.tolist()[0] == "honey"
    assert pd.isna(episodes.loc[episodes.train_id == "t7", "target_word"]).all()  # failed guess: unknown target
    page = out["index.html"].read_text()
    assert "t3" in page and "GUESS: honey" in page
    # self-contained: images inline, nothing fetched from anywhere
    assert page.count("data:image/png;base64,") == 3  # agreement, distributions, word heat map
    assert not re.search(r"""(src|href)=["'](https?:|//|/)""", page)
    stability = pd.read_csv(out["preconditioner_stability.csv"])
    assert stability.empty  # no preconditioned method has its plain counterpart here


def test_per_token_scores_are_drawn_on_the_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    import datasets

    paths, _, _ = tables(tmp_path, np.random.default_rng(4))
    vocab = {"[UNK]": 0, "GUESS": 1, ":": 2, "honey": 3, "apple": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    datasets.Dataset.from_dict({"row_id": [f"t{i}" for i in range(8)],
                                "input_ids": [[1, 2, 3]] * 8}).save_to_disk(str(tmp_path / "tokens"))
    influences = pd.read_csv(paths["influences"])
    # positions 0, 1, 2: position t's loss predicts token t+1, and nothing follows the last token
    influences["per_token_scores"] = [json.dumps([2 * s, -s, 0.0]) if m == "ekfac" else None
                                      for m, s in zip(influences.method, influences.influence_score)]
    influences.to_csv(paths["influences"], index=False)
    out = build_report(query_csv=paths["query"], train_csv=paths["train"], influences_csv=paths["influences"],
                       train_scores_csv=paths["train_scores"], out_dir=tmp_path / "report", top_k=3,
                       train_tokens_dir=tmp_path / "tokens", tokenizer_file=tmp_path / "tokenizer.json")
    page = out["index.html"].read_text()
    # three top rows for each of three queries, each drawn as its three tokens
    assert page.count("Per-token scores of") == 9
    # each score drawn on the token its position predicts: ":" (position 0's), "honey" (position 1's)
    assert re.search(r'<span class="tok" title="first token: no prediction">GUESS</span>'
                     r'<span class="tok" style="background:rgba\(\d+,\d+,\d+,1.00\)" title="[^"]+">:</span>'
                     r'<span class="tok" style="background:rgba\(\d+,\d+,\d+,0.50\)" title="[^"]+">honey</span>', page)
    assert "per-token scores</td><td>ekfac" in page


def test_the_summary_says_which_adapters_the_scores_averaged(tmp_path):
    """With attribution.ensemble 2, every method's scores are the mean over two adapters (the damping sweep's the run's
    own): the page says so, with the members' seeds."""
    paths, _, _ = tables(tmp_path, np.random.default_rng(6))
    common = dict(query_csv=paths["query"], train_csv=paths["train"], influences_csv=paths["influences"],
                  train_scores_csv=paths["train_scores"], top_k=3)
    page = build_report(**common, out_dir=tmp_path / "two", ensemble=2, training_seed=42)["index.html"].read_text()
    assert ("adapters</td><td>every method and the damping sweep: the mean over 2 adapters (training seeds 42, "
            "1042)") in page
    page = build_report(**common, out_dir=tmp_path / "one", ensemble=1, training_seed=7)["index.html"].read_text()
    assert "adapters</td><td>the run&#39;s adapter (training seed 7)" in page
    # a scoring schedule of its own (attribution.scoring_training): the page says the scored adapter is not the run's
    page = build_report(**common, out_dir=tmp_path / "scoring", ensemble=1, training_seed=7, epochs=1,
                        scoring_training={"epochs": 1})["index.html"].read_text()
    assert "adapters</td><td>an adapter of the run&#39;s data (training seed 7, trained for scoring with epochs 1)" \
        in page
    page = build_report(**common, out_dir=tmp_path / "scoring-two", ensemble=2, training_seed=42, epochs=2,
                        checkpoints=[1, 2], scoring_training={"epochs": 2, "learning_rate": 0.001})["index.html"]
    assert ("the mean over 4 adapters (training seeds 42, 1042 after epochs 1, 2, trained for scoring with epochs 2, "
            "learning_rate 0.001)") in page.read_text()


def test_tables_that_do_not_belong_together_are_refused_by_name(tmp_path):
    paths, _, _ = tables(tmp_path, np.random.default_rng(5))
    train = pd.read_csv(paths["train"])
    pd.concat([train, train.iloc[[2]]]).to_csv(paths["train"], index=False)
    with pytest.raises(ValueError, match=r"train\.csv: train_id t2 appears twice"):
        build_report(query_csv=paths["query"], train_csv=paths["train"], influences_csv=paths["influences"],
                     out_dir=tmp_path / "report")
    train.iloc[:-1].to_csv(paths["train"], index=False)  # scores of t7 but no such row
    with pytest.raises(ValueError, match=r"scores train ids missing from train\.csv, e\.g\. \['t7'\]"):
        build_report(query_csv=paths["query"], train_csv=paths["train"], influences_csv=paths["influences"],
                     out_dir=tmp_path / "report")
    assert not (tmp_path / "report" / "index.html").exists()


def test_an_empty_influences_table_is_refused_naming_it_and_writes_no_report(tmp_path):
    paths, _, _ = tables(tmp_path, np.random.default_rng(3))
    pd.read_csv(paths["influences"]).iloc[:0].to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ValueError, match=r"empty.csv holds no scores; rerun the merge"):
        build_report(query_csv=paths["query"], train_csv=paths["train"], influences_csv=tmp_path / "empty.csv",
                     out_dir=tmp_path / "report", top_k=3)
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())


def test_the_lds_section_reads_a_method_against_the_noise_ceiling(tmp_path):
    import matplotlib.axes

    paths, _, _ = tables(tmp_path, np.random.default_rng(3))
    lds = pd.DataFrame({"method": ["ekfac", "tfidf"], "kind": ["method", "baseline"], "lds": [0.3, 0.1],
                        "ci95_low": [0.2, 0.0], "ci95_high": [0.4, 0.2], "subsets": 20, "repeats": 4,
                        "noise_ceiling": 0.62, "noise_ceiling_ci95_low": 0.55, "noise_ceiling_ci95_high": 0.7})
    lds.to_csv(tmp_path / "lds.csv", index=False)
    drawn = []
    original = matplotlib.axes.Axes.axhline

    def record(ax, y=0, *args, **kwargs):
        drawn.append((y, kwargs.get("label")))
        return original(ax, y, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "axhline", record)
        out = build_report(query_csv=paths["query"], train_csv=paths["train"], influences_csv=paths["influences"],
                           train_scores_csv=paths["train_scores"], out_dir=tmp_path / "report", top_k=3,
                           lds_csv=tmp_path / "lds.csv")
    assert (0.62, "noise ceiling 0.62 (4 repeats)") in drawn
    page = out["index.html"].read_text()
    assert "retrained 4 times with different training seeds" in page and "noise ceiling" in page
    assert page.count("data:image/png;base64,") == 4  # the LDS chart beside the three others
