import json

import pyarrow as pa
import pytest

from playpen_attribution.data import DataError, load_pair_json, prepare_split, read_rows, split_config
from playpen_attribution.data import prepare_playpen as _prepare_playpen
from playpen_attribution.sample import write_playpen_folder

from conftest import data_cfg

GUESS = [{"role": "user", "content": "CLUE: sweet"}, {"role": "assistant", "content": "GUESS: honey"}]


def prepare_playpen(data, role):
    return _prepare_playpen(split_config(data, role))


def meta(game="taboo", role="WordGuesser", outcome="success", task_id=0):
    return {"experiment": "e", "game": game, "game_role": role, "model": "m", "outcome": outcome,
            "player_name": "Player 2", "task_id": task_id}


def folder_source(tmp_path, train, validation=None):
    write_playpen_folder(tmp_path / "ds", {"train": train, "validation": validation or train})
    return {"kind": "playpen", "path": str(tmp_path / "ds"), "name": "interactions"}


def test_filter_ids_and_conversion_on_the_sample(demo_tables, sample_source):
    out, report = demo_tables
    train = read_rows(out / "train.parquet")
    counts = report["train"]["counts"]
    assert counts["raw"] > counts["game"] > counts["role"] > counts["outcome"] == len(train)
    from playpen_attribution.data import load_playpen_split

    raw = load_playpen_split(sample_source, "train")
    for row in train:
        index = int(row["row_id"].removeprefix("train-"))
        episode = raw[index]  # the id is the row's position in the raw split
        assert episode["meta"]["game"] == "taboo" and episode["meta"]["game_role"] == "WordGuesser"
        assert row["outcome"] == episode["meta"]["outcome"] != "aborted"
        last = max(i for i, m in enumerate(episode["messages"]) if m["role"] == "assistant")
        assert row["completion"] == [{"role": "assistant", "content": episode["messages"][last]["content"]}]
        assert row["prompt"] == episode["messages"][:last] and row["prompt"][-1]["role"] == "user"
    assert any(r["outcome"] is None for r in train), "null outcomes are kept by default"
    assert all(r["row_id"].startswith("validation-") for r in read_rows(out / "query.parquet"))


def test_ids_are_stable_when_the_filter_changes(demo_tables, sample_source, tmp_path):
    out, _ = demo_tables
    base = {r["row_id"]: r["content_hash"] for r in read_rows(out / "train.parquet")}
    stricter = data_cfg(sample_source, null_outcome="drop", drop_outcomes=["aborted", "failure"])
    frame, report = prepare_playpen(stricter, "train")
    assert 0 < len(frame) < len(base)
    for row_id, digest in zip(frame["row_id"], frame["content_hash"]):
        assert base[row_id] == digest
    assert set(frame["outcome"]) == {"success"}


def test_unknown_game_lists_the_games(sample_source):
    with pytest.raises(DataError, match=r"no episode of game 'tabu'; games present: .*'referencegame'.*'taboo'.*data\.game"):
        prepare_playpen(data_cfg(sample_source, game="tabu"), "train")


def test_unknown_role_lists_the_roles(sample_source):
    with pytest.raises(DataError, match=r"no role 'Guesser'; roles present: \{'WordDescriber': \d+, 'WordGuesser': \d+\}"):
        prepare_playpen(data_cfg(sample_source, role="Guesser"), "train")


def test_empty_filter_result_is_an_error(sample_source):
    cfg = data_cfg(sample_source, drop_outcomes=["aborted", "success", "failure"], null_outcome="drop")
    with pytest.raises(DataError, match=r"no rows left after filtering .*'outcome': 0"):
        prepare_playpen(cfg, "train")


def test_missing_column_is_named(tmp_path):
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    write_playpen_folder(tmp_path / "ds", {"train": [{"messages": GUESS}], "validation": [{"messages": GUESS}]}, schema)
    source = {"kind": "playpen", "path": str(tmp_path / "ds"), "name": "interactions"}
    with pytest.raises(DataError, match=r"lacks column\(s\) \['meta'\]"):
        prepare_playpen(data_cfg(source), "train")


def test_episode_without_assistant_turn_is_counted_and_reported(tmp_path):
    rows = [{"messages": GUESS, "meta": meta()},
            {"messages": [{"role": "user", "content": "CLUE: only a clue"}], "meta": meta(task_id=1)},
            {"messages": GUESS, "meta": meta(task_id=2)}]
    frame, report = prepare_playpen(data_cfg(folder_source(tmp_path, rows)), "train")
    assert list(frame["row_id"]) == ["train-000000", "train-000002"]
    assert report["skipped"] == [{"row_id": "train-000001", "reason": "no assistant turn after a prompt"}]
    assert report["counts"]["outcome"] == 3 and report["counts"]["converted"] == 2


def test_message_without_content_names_the_row(tmp_path):
    bad = [{"role": "user", "content": None}, {"role": "assistant", "content": "GUESS: x"}]
    rows = [{"messages": GUESS, "meta": meta()}, {"messages": bad, "meta": meta(task_id=1)}]
    with pytest.raises(DataError, match=r"row train-000001: message 0 needs string `role` and `content`"):
        prepare_playpen(data_cfg(folder_source(tmp_path, rows)), "train")


def write_json(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_seed_json_keeps_extra_fields(tmp_path):
    path = write_json(tmp_path / "train.json", [{"pair_id": 7, "prompt": "p", "completion": " c", "topic": "t"}])
    frame = load_pair_json(path)
    assert frame.to_dict("records")[0]["row_id"] == "7" and frame.iloc[0]["topic"] == "t"


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"pair_id": "a", "prompt": "p",\n  "completion": }]', r"train\.json: malformed JSON at line 2 column 17"),
        ("[]", r"train\.json: the list is empty"),
        ('{"pair_id": "a"}', r"expected a JSON list"),
        ([{"pair_id": "a", "prompt": "p"}], r"train\.json, item 0 \(pair_id 'a'\): missing field\(s\) \['completion'\]"),
        ([{"pair_id": "a", "prompt": "p", "completion": "c"}, {"pair_id": "a", "prompt": "q", "completion": "d"}],
         r"duplicate pair_id\(s\) \['a'\]"),
        ([{"pair_id": "a", "prompt": ["p"], "completion": "c"}], r"item 0 \(pair_id 'a'\): `prompt` must be a string"),
    ],
)
def test_seed_json_bad_input(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_pair_json(write_json(tmp_path / "train.json", content))


def test_failed_stage_leaves_no_output(tmp_path, sample_source):
    outs = [tmp_path / "train.parquet", tmp_path / "train.report.json"]
    with pytest.raises(DataError):
        prepare_split(split_config(data_cfg(sample_source, role="Nobody"), "train"), *outs)
    assert list(tmp_path.iterdir()) == []


def test_json_source_end_to_end(tmp_path):
    from playpen_attribution.config import validate_config

    train = write_json(tmp_path / "train.json", [{"pair_id": "t1", "prompt": "p", "completion": " c"}])
    query = write_json(tmp_path / "query.json", [{"pair_id": "q1", "prompt": "p", "completion": " c", "x": 1}])
    cfg = validate_config({"runs": {"j": {"data": {"source": {"kind": "json", "train": str(train), "query": str(query)}},
                                          "model": {"tiny": {}}}}})["runs"]["j"]["data"]
    report = prepare_split(split_config(cfg, "query"), tmp_path / "b.parquet", tmp_path / "r.json")
    assert report["counts"] == {"raw": 1, "kept": 1}
    rows = read_rows(tmp_path / "b.parquet")
    assert rows == [{"row_id": "q1", "content_hash": rows[0]["content_hash"], "prompt": "p", "completion": " c", "x": 1}]


def test_a_failed_guessers_target_word_comes_from_the_describer_of_the_same_episode():
    from playpen_attribution.data import prepare_playpen, split_config
    from playpen_attribution.taboo import describer_words

    from conftest import REPO, data_cfg

    source = {"kind": "playpen", "path": str(REPO / "resources/real-taboo/playpen-real"), "name": "interactions"}
    frame, report = prepare_playpen(split_config(data_cfg(source), "train"))
    assert report["counts"]["target_word_known"] == len(frame) == 112
    failed = frame[frame.outcome == "failure"]
    assert len(failed) == 12 and (failed.target_word_source == "describer of the same episode").all()
    won = frame[frame.outcome == "success"]
    assert (won.target_word_source == "own transcript").all()
    assert (won.target_word == won.completion.map(lambda c: c[-1]["content"].removeprefix("GUESS:").strip().lower())).all()
    # every row's word is the one its clembench record names (provenance.jsonl, by split and raw row = the row id)
    provenance = [json.loads(line) for line in (REPO / "resources/real-taboo/provenance.jsonl").read_text().splitlines()]
    recorded = {f"{p['split']}-{p['row']:06d}": p["target_word"].lower() for p in provenance}
    assert frame.target_word.tolist() == [recorded[r] for r in frame.row_id]
    # two describer rows under one episode key name no word rather than a guess
    prompt = "This is the target word that you need to describe and that the other player needs to guess:\n\napple\n\n"
    describer = {"messages": [{"role": "user", "content": prompt}],
                 "meta": {"game": "taboo", "game_role": "WordDescriber", "experiment": "e", "task_id": 1, "model": "m"}}
    assert describer_words([describer]) == {("taboo", "e", 1, "m"): "apple"}
    assert describer_words([describer, describer]) == {}


def test_a_hub_dataset_branch_is_resolved_to_its_commit_loaded_and_recorded(sample_source, tmp_path, monkeypatch):
    """`revision: main` moves: the data stage asks the hub which commit it is now, loads that commit (so every split
    of the run reads the same data) and writes it into the split's report."""
    from types import SimpleNamespace

    import datasets
    import huggingface_hub

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    asked, loaded = [], []
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo_id, revision=None, **kw: asked.append((repo_id, revision))
                        or SimpleNamespace(sha=sha))
    real_load = datasets.load_dataset

    def hub(path, name=None, revision=None, split=None, **kwargs):  # the hub, served from the local sample
        loaded.append((path, revision))
        return real_load(sample_source["path"], name, split=split, cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    source = {"kind": "playpen", "hub": "colab-potsdam/playpen-data", "revision": "main", "name": "interactions"}
    report = prepare_split(split_config(data_cfg(source), "train"), tmp_path / "train.parquet",
                           tmp_path / "train.report.json")
    assert asked == [("colab-potsdam/playpen-data", "main")] and loaded == [("colab-potsdam/playpen-data", sha)]
    assert report["revision"] == "main" and report["commit"] == sha and sha in report["source"]
    assert json.loads((tmp_path / "train.report.json").read_text())["commit"] == sha
