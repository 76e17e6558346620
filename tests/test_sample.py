import collections
import filecmp

import datasets

from playpen_attribution.sample import write_sample

from conftest import SAMPLE


def test_committed_sample_is_what_the_generator_writes(tmp_path):
    """The same card and the same rows (the parquet bytes also hold the writing pyarrow's version: compared as
    tables, schema included)."""
    import pyarrow.parquet as pq

    write_sample(tmp_path)
    assert filecmp.cmp(tmp_path / "README.md", SAMPLE / "README.md", shallow=False)
    for rel in ["interactions/train-00000-of-00001.parquet", "interactions/validation-00000-of-00001.parquet"]:
        written, committed = pq.read_table(tmp_path / rel), pq.read_table(SAMPLE / rel)
        assert written.schema.equals(committed.schema) and written.equals(committed), rel


def test_sample_loads_like_the_hub_dataset():
    ds = datasets.load_dataset(str(SAMPLE), "interactions")
    assert set(ds) == {"train", "validation"}
    assert ds["train"].column_names == ["messages", "meta"]
    assert set(ds["train"][0]["meta"]) == {"experiment", "game", "game_role", "model", "outcome", "player_name", "task_id"}
    metas = ds["train"]["meta"]
    kinds = collections.Counter((m["game"], m["game_role"], m["outcome"]) for m in metas)
    for role in ("WordGuesser", "WordDescriber"):
        for outcome in ("success", "failure", "aborted"):
            assert kinds[("taboo", role, outcome)] > 0, (role, outcome)
    assert kinds[("taboo", "WordGuesser", None)] > 0
    assert {m["game"] for m in metas} - {"taboo"}, "other games present"


def test_validation_target_words_occur_in_training():
    def targets(split):
        ds = datasets.load_dataset(str(SAMPLE), "interactions", split=split)
        return {r["messages"][-1]["content"].removeprefix("GUESS: ") for r in ds
                if r["meta"]["game_role"] == "WordGuesser" and r["meta"]["outcome"] == "success"}

    val = targets("validation")
    assert val and val <= targets("train")
