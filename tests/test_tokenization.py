import datasets
import pytest

from playpen_attribution.data import read_rows
from playpen_attribution.tokenization import IGNORE_INDEX, tokenize_example, tokenize_rows, tokenize_table

from conftest import REPO

TEMPLATE_DIR = REPO / "src" / "playpen_attribution" / "templates" / "chat"


# The two chat templates the project meets: Gemma 3's (the tiny model carries the stock template) and SmolLM2's
# ChatML (a real pretrained model, from its GGUF); what closes an assistant turn in each.
TEMPLATES = {"gemma3": "<end_of_turn>\n", "smollm2": "<|im_end|>\n"}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def chat_model(request):
    """(template name, tokenizer, model folder) of each chat template."""
    fixture = {"gemma3": "tiny_model_dir", "smollm2": "smol_model_dir"}[request.param]
    model_dir = request.getfixturevalue(fixture)
    from transformers import AutoTokenizer

    return request.param, AutoTokenizer.from_pretrained(str(model_dir)), model_dir


def test_equals_what_sft_trainer_trains_on(demo_tables, chat_model, tmp_path):
    """TRL tokenizes the conversational rows itself; our tokens must be identical, labels included."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    name, tokenizer, model_dir = chat_model
    out, _ = demo_tables
    rows = read_rows(out / "train.parquet")[:24]
    ours, report = tokenize_rows(rows, tokenizer, max_length=1024, mode="chat")
    assert report["rows_skipped"] == [] and len(ours) == 24
    raw = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, bf16=False, report_to=[],
                     max_length=1024, activation_checkpointing=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir)), args=args,
                         train_dataset=raw, processing_class=tokenizer)
    theirs = trainer.train_dataset
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
        assert theirs[i]["input_ids"] == ours[i]["input_ids"]
        assert theirs[i]["labels"] == ours[i]["labels"]
    # loss is on the completion and its end-of-turn marker only
    trained = [t for t in ours[0]["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == rows[0]["completion"][0]["content"] + TEMPLATES[name]


def test_long_prompt_is_cut_from_the_left_keeping_bos(tiny_tokenizer):
    prompt = [{"role": "user", "content": "word " * 300 + "CLUE: sweet"}]
    completion = [{"role": "assistant", "content": "GUESS: honey"}]
    full = tokenize_example(tiny_tokenizer, prompt, completion, 4096, "chat")
    cut = tokenize_example(tiny_tokenizer, prompt, completion, 64, "chat")
    assert len(cut["input_ids"]) == 64 and cut["n_prompt_tokens_truncated"] == len(full["input_ids"]) - 64
    assert cut["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert cut["input_ids"][1:] == full["input_ids"][-63:]
    assert [t for t in cut["labels"] if t != IGNORE_INDEX] == [t for t in full["labels"] if t != IGNORE_INDEX]


def test_completion_that_cannot_fit_is_reported_not_silently_dropped(tiny_tokenizer, tmp_path):
    rows = [{"row_id": "ok", "prompt": "short", "completion": "GUESS: honey"},
            {"row_id": "long", "prompt": "short", "completion": "GUESS: " + "honey " * 200}]
    dataset, report = tokenize_rows(rows, tiny_tokenizer, max_length=48, mode="chat")
    assert dataset["row_id"] == ["ok"]
    assert [s["row_id"] for s in report["rows_skipped"]] == ["long"]
    assert "does not fit in max_length 48" in report["rows_skipped"][0]["reason"]


def test_plain_rendering_is_the_first_seeds(tiny_tokenizer):
    out = tokenize_example(tiny_tokenizer, "The capital of France is", " Paris.", 512, "plain")
    prompt_ids = tiny_tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    completion_ids = tiny_tokenizer(" Paris.", add_special_tokens=False)["input_ids"]
    assert out["input_ids"] == prompt_ids + completion_ids + [tiny_tokenizer.eos_token_id]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tiny_tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="plain"):
        tokenize_example(tiny_tokenizer, [{"role": "user", "content": "x"}], " y", 512, "plain")


def test_no_row_fits_is_an_error_and_leaves_nothing(demo_tables, tiny_model_dir, tmp_path):
    from playpen_attribution.data import DataError

    out, _ = demo_tables
    with pytest.raises(DataError, match="no row fits in max_length=4"):
        tokenize_table(out / "query.parquet", tiny_model_dir, tmp_path / "tokens", max_length=4, mode="chat")
    assert list(tmp_path.iterdir()) == []


def test_duplicates_are_found_on_text_and_on_tokens_whatever_their_metadata(demo_tables, demo_tokens):
    """The demo's training rows repeat episodes under other metadata (the planted copy's text is a query's; the
    synthetic games repeat clue pairs): both stages report the same groups, counted independently here."""
    import json

    import datasets
    import pandas as pd

    from playpen_attribution.tokenization import read_tokens_report

    out, report = demo_tables
    frame = pd.read_parquet(out / "train.parquet")
    as_text = lambda value: json.dumps(value if isinstance(value, str) else list(map(dict, value)))  # noqa: E731
    text = frame.prompt.map(as_text) + "\x00" + frame.completion.map(as_text)
    expected = int(text.duplicated().sum())
    assert expected > 0  # the check can fail: the sample has rows whose text repeats
    assert report["train"]["duplicates"]["rows_repeating_an_earlier_row"] == expected
    groups = {tuple(g) for g in report["train"]["duplicates"]["groups"]}
    for group in groups:  # every group really is one text, under different row ids
        assert text[frame.row_id.isin(group)].nunique() == 1
    # the tokens: the same rows, found from input ids and labels alone
    tokens = datasets.load_from_disk(str(demo_tokens / "train"))
    pairs = pd.Series([json.dumps([i, l]) for i, l in zip(tokens["input_ids"], tokens["labels"])])
    tokenized = read_tokens_report(demo_tokens / "train")["duplicates"]
    assert tokenized["rows_repeating_an_earlier_row"] == int(pairs.duplicated().sum()) == expected
    assert {tuple(g) for g in tokenized["groups"]} == groups


@pytest.fixture(scope="module")
def conversations(demo_tables, tmp_path_factory):
    """Demo rows and real taboo rows (both roles, both splits): prompt/completion message lists."""
    from playpen_attribution.data import prepare_split, split_config

    from conftest import REPO, data_cfg

    out, _ = demo_tables
    rows = read_rows(out / "train.parquet")[:16]
    source = {"kind": "playpen", "path": str(REPO / "resources/real-taboo/playpen-real"), "name": "interactions"}
    folder = tmp_path_factory.mktemp("real-rows")
    for role in ("WordGuesser", "WordDescriber"):
        for split in ("train", "query"):
            path = folder / f"{role}-{split}.parquet"
            prepare_split(split_config(data_cfg(source, role=role), split), path, folder / f"{role}-{split}.json")
            rows += read_rows(path)
    return rows


def test_assistant_turn_labels_equal_sft_trainers_assistant_only_loss(conversations, chat_model, tmp_path):
    """SFTTrainer with assistant_only_loss=True tokenizes the whole conversations itself; our labels must be its.
    SmolLM2's template has no training variant in TRL: SFTTrainer gets the one the project ships
    (`chat_template_path`), as a user of TRL would have to give it."""
    import copy

    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from playpen_attribution.tokenization import SHIPPED_TRAINING_TEMPLATES

    name, tokenizer, model_dir = chat_model
    rows = [r for r in conversations if sum(m["role"] == "assistant" for m in r["prompt"]) >= 1][:40]
    ours, report = tokenize_rows(rows, tokenizer, max_length=4096, mode="chat", loss_on="assistant_turns")
    assert report["rows_skipped"] == [] and report["loss_on"] == "assistant_turns"
    raw = datasets.Dataset.from_list([{"messages": r["prompt"] + r["completion"]} for r in rows])
    shipped = {"smollm2": str(TEMPLATE_DIR / SHIPPED_TRAINING_TEMPLATES["smollm2.jinja"])}
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, bf16=False, report_to=[],
                     max_length=4096, activation_checkpointing=False, chat_template_path=shipped.get(name))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir)), args=args,
                         train_dataset=raw, processing_class=copy.deepcopy(tokenizer))
    theirs = trainer.train_dataset
    assert len(theirs) == len(ours) == len(rows) > 20
    for i in range(len(ours)):
        assert theirs[i]["input_ids"] == ours[i]["input_ids"]
        labels = [t if m else IGNORE_INDEX for t, m in zip(theirs[i]["input_ids"], theirs[i]["assistant_masks"])] \
            if "assistant_masks" in theirs.column_names else theirs[i]["labels"]
        assert labels == ours[i]["labels"]
    # every assistant turn is labelled: as many labelled spans as assistant turns, the last one the last turn's
    for row, tokens in zip(rows, ours):
        labels = tokens["labels"]
        spans = sum(1 for i, t in enumerate(labels) if t != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX))
        assert spans == sum(m["role"] == "assistant" for m in row["prompt"] + row["completion"])
        last = tokenize_example(tokenizer, row["prompt"], row["completion"], 4096, "chat")["labels"]
        # last_turn's labels are the last span exactly
        assert [b for b in last if b != IGNORE_INDEX] == [a for a, b in zip(labels, last) if b != IGNORE_INDEX]


def test_the_template_with_generation_tags_renders_every_conversation_as_the_original(conversations, chat_model):
    from playpen_attribution.model_sources import gemma3_chat_template
    from playpen_attribution.tokenization import training_chat_template

    name, tokenizer, _ = chat_model
    original_template = {"gemma3": gemma3_chat_template(), "smollm2": (TEMPLATE_DIR / "smollm2.jinja").read_text()}
    assert tokenizer.chat_template == original_template[name]  # the real template text (Gemma 3's; SmolLM2's own)
    training = training_chat_template(tokenizer)
    assert "generation" in training and training != tokenizer.chat_template
    assert len(conversations) > 250  # every real taboo episode but the aborted ones, both roles
    for row in conversations:
        messages = row["prompt"] + row["completion"]
        for extra in ({}, {"add_generation_prompt": True}):
            original = tokenizer.apply_chat_template(messages, tokenize=False, **extra)
            assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=training, **extra) == original
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True,
                                             chat_template=training) == prompt


def test_a_template_without_a_training_variant_is_refused_for_assistant_turns_naming_last_turn(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="use tokenization.loss_on: last_turn"):
        tokenize_example(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"}], "d", 64, "chat", loss_on="assistant_turns")
    # last_turn needs no generation tags
    assert "error" not in tokenize_example(tokenizer, "a", "b", 64, "chat")


def test_assistant_turns_need_chat_turns(tiny_tokenizer):
    with pytest.raises(ValueError, match="loss_on: assistant_turns needs tokenization.render: chat"):
        tokenize_example(tiny_tokenizer, "a prompt", "a completion", 64, "plain", loss_on="assistant_turns")
