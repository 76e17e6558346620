"""The one tokenization that SFT, Bergson and Kronfluence all consume.

Each row becomes `input_ids`, `attention_mask` and `labels`. Which tokens carry a label (`loss_on`):
- `last_turn`: the completion (the episode's last assistant turn) and its end-of-turn marker, -100 elsewhere.
- `assistant_turns`: every assistant turn of the conversation, as TRL's `assistant_only_loss=True` masks it:
  the assistant mask of TRL's training variant of the chat template (the same text, with `{% generation %}`
  tags around each assistant turn). Tests show these labels equal SFTTrainer's own and that the variant renders
  every conversation exactly as the original template does.
Two renderings behind one function:
- `chat`: the model's chat template, exactly as TRL's SFTTrainer renders a conversational
  prompt/completion pair (prompt with the generation prompt, then prompt + completion; the completion
  starts where the two diverge). A string prompt/completion is wrapped as one user and one assistant turn.
- `plain`: the if-query tools' form: prompt tokens + completion tokens + EOS, no special tokens.

Over-long rows lose tokens from the left of the prompt (a leading BOS is kept). A row whose completion
alone cannot fit is not tokenized; it is listed in the report with its lengths.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOSS_ON = ("last_turn", "assistant_turns")


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render(tokenizer, prompt, completion, mode: str) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and how many leading ids belong to the prompt."""
    if mode == "chat":
        prompt_messages = _as_messages(prompt, "user")
        completion_messages = _as_messages(completion, "assistant")
        prompt_ids = tokenizer.apply_chat_template(
            prompt_messages, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        full_ids = tokenizer.apply_chat_template(
            prompt_messages + completion_messages, tokenize=True, return_dict=True
        )["input_ids"]
        return list(full_ids), common_prefix_length(prompt_ids, full_ids)
    if mode == "plain":
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("render mode 'plain' needs string prompts and completions; "
                             "use tokenization.render: chat for playpen message lists")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return prompt_ids + completion_ids, len(prompt_ids)
    raise ValueError(f"unknown render mode {mode!r}; expected 'chat' or 'plain'")


# Training variants (with `{% generation %}` tags) the project ships for chat templates TRL has none for: the
# original template's text (its file) -> the variant's file, under templates/chat/. The same text for every
# message; TRL's convention for ChatML (its Qwen 2.5 variant) puts the loss on the turn's text, `<|im_end|>` and
# the newline after it, as the last_turn labels do.
SHIPPED_TRAINING_TEMPLATES = {"smollm2.jinja": "smollm2_training.jinja"}


def _shipped_template(name: str) -> str:
    import importlib.resources

    return importlib.resources.files("playpen_attribution").joinpath("templates", "chat", name).read_text()


def training_chat_template(tokenizer) -> str:
    """The tokenizer's chat template with `{% generation %}` tags: itself if it has them, else TRL's training
    variant of it (TRL ships one for Gemma 3, among others; the template SFTTrainer uses for
    `assistant_only_loss=True`), else one this project ships (SmolLM2's ChatML)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return tokenizer.chat_template
    for original, training in SHIPPED_TRAINING_TEMPLATES.items():
        if tokenizer.chat_template == _shipped_template(original):
            return _shipped_template(training)
    try:
        template = get_training_chat_template(tokenizer)
    except ValueError:  # TRL 1.16 raises for a template it cannot patch
        template = None
    if template is None:
        raise ValueError("the tokenizer's chat template has no {% generation %} tags and neither TRL nor this project "
                         "has a training variant of it, so the assistant turns cannot be told apart; use "
                         "tokenization.loss_on: last_turn")
    return template


def assistant_labels(tokenizer, prompt, completion, ids: list[int], chat_template: str) -> list[int]:
    """Labels of every assistant turn: the ids where TRL's assistant mask is 1, -100 elsewhere; `ids` must be the
    conversation as the original template renders it (checked: the masks may differ, the tokens may not).
    `chat_template`: `training_chat_template(tokenizer)`, found once per table."""
    messages = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
    out = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    if list(out["input_ids"]) != list(ids):
        raise ValueError("the chat template with generation tags renders this conversation differently from the "
                         "model's own template; use tokenization.loss_on: last_turn")
    return [i if m else IGNORE_INDEX for i, m in zip(ids, out["assistant_masks"])]


def tokenize_example(tokenizer, prompt, completion, max_length: int, mode: str, loss_on: str = "last_turn",
                     chat_template: str | None = None) -> dict:
    """One row's ids and labels, left-truncating the prompt; `{"error": ...}` if the completion cannot fit.

    `loss_on`: `last_turn` labels the completion only, `assistant_turns` every assistant turn (chat only), from
    `chat_template` (the template with generation tags; found here when not given)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"unknown loss_on {loss_on!r}; expected one of {LOSS_ON}")
    if loss_on == "assistant_turns" and mode != "chat":
        raise ValueError("tokenization.loss_on: assistant_turns needs tokenization.render: chat (plain text has no "
                         "turns)")
    ids, n_prompt = render(tokenizer, prompt, completion, mode)
    n_completion = len(ids) - n_prompt
    if n_completion <= 0:
        return {"error": "empty completion", "n_prompt_tokens": n_prompt, "n_completion_tokens": 0}
    if loss_on == "assistant_turns":
        labels = assistant_labels(tokenizer, prompt, completion, ids, chat_template or training_chat_template(tokenizer))
    else:
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    keep_bos = 1 if (ids and ids[0] == tokenizer.bos_token_id and n_prompt > 0) else 0
    overflow = len(ids) - max_length
    dropped = 0
    if overflow > 0:
        if overflow > n_prompt - keep_bos:
            return {"error": f"completion of {n_completion} tokens does not fit in max_length {max_length}",
                    "n_prompt_tokens": n_prompt, "n_completion_tokens": n_completion}
        ids = ids[:keep_bos] + ids[keep_bos + overflow:]
        labels = labels[:keep_bos] + labels[keep_bos + overflow:]
        n_prompt -= overflow
        dropped = overflow
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "n_prompt_tokens": n_prompt,
        "n_completion_tokens": n_completion,
        "n_prompt_tokens_truncated": dropped,
    }


def tokenize_rows(rows: list[dict], tokenizer, max_length: int, mode: str, loss_on: str = "last_turn"):
    """Tokenize rows ({row_id, prompt, completion}) into a `datasets.Dataset`, plus a report of skips."""
    import datasets

    from playpen_attribution.data import content_hash, duplicate_groups

    columns: dict[str, list] = {k: [] for k in ("row_id", "input_ids", "attention_mask", "labels",
                                                "n_prompt_tokens", "n_completion_tokens",
                                                "n_prompt_tokens_truncated")}
    skipped, truncated = [], 0
    # TRL's check and choice of the template with generation tags renders test conversations: once per table
    template = training_chat_template(tokenizer) if loss_on == "assistant_turns" and mode == "chat" else None
    for row in rows:
        out = tokenize_example(tokenizer, row["prompt"], row["completion"], max_length, mode, loss_on, template)
        if "error" in out:
            skipped.append({"row_id": row["row_id"], "reason": out["error"],
                            "n_prompt_tokens": out["n_prompt_tokens"],
                            "n_completion_tokens": out["n_completion_tokens"]})
            continue
        truncated += out["n_prompt_tokens_truncated"] > 0
        columns["row_id"].append(row["row_id"])
        for key in columns:
            if key != "row_id":
                columns[key].append(out[key])
    features = datasets.Features(
        {
            "row_id": datasets.Value("string"),
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "attention_mask": datasets.Sequence(datasets.Value("int8")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "n_prompt_tokens": datasets.Value("int32"),
            "n_completion_tokens": datasets.Value("int32"),
            "n_prompt_tokens_truncated": datasets.Value("int32"),
        }
    )
    dataset = datasets.Dataset.from_dict(columns, features=features)
    lengths = [len(x) for x in columns["input_ids"]]
    report = {
        "rows_in": len(rows),
        "rows_tokenized": len(dataset),
        "rows_skipped": skipped,
        "rows_prompt_truncated": int(truncated),
        "max_length": max_length,
        "render": mode,
        "loss_on": loss_on,
        "label_tokens": int(sum(sum(1 for x in labels if x != IGNORE_INDEX) for labels in columns["labels"])),
        "longest_sequence": max(lengths, default=0),
        "longest_completion": max(columns["n_completion_tokens"], default=0),
        # token-identical rows (input ids and labels): what every method sees as the same example
        "duplicates": duplicate_groups(columns["row_id"], [content_hash([i, l]) for i, l in
                                                           zip(columns["input_ids"], columns["labels"])]),
    }
    if report["duplicates"]["groups"]:
        log.warning("%d row(s) are token-identical to an earlier row, e.g. %s",
                    report["duplicates"]["rows_repeating_an_earlier_row"], report["duplicates"]["groups"][:3])
    if skipped:
        log.warning("%d row(s) skipped because their completion does not fit in max_length=%d: %s",
                    len(skipped), max_length, [s["row_id"] for s in skipped[:10]])
    return dataset, report


TOKENS_REPORT = "report.json"


def read_tokens_report(tokens_dir: str | Path) -> dict:
    """The report `tokenize_table` writes beside the tokens (row counts, lengths, rendering); {} if there is none."""
    import json

    path = Path(tokens_dir) / TOKENS_REPORT
    return json.loads(path.read_text()) if path.is_file() else {}


def tokenize_table(rows_path: str | Path, model_dir: str | Path, output_dir: str | Path,
                   max_length: int, mode: str, loss_on: str = "last_turn") -> dict:
    """Stage entry point (rule `tokenize`): parquet rows -> a `save_to_disk` dataset + `report.json`."""
    from transformers import AutoTokenizer

    from playpen_attribution.data import DataError, read_rows
    from playpen_attribution.io import atomic_path, write_json_atomic

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = read_rows(rows_path)
    dataset, report = tokenize_rows(rows, tokenizer, max_length, mode, loss_on)
    if len(dataset) == 0:
        raise DataError(f"{rows_path}: no row fits in max_length={max_length} "
                        f"({len(report['rows_skipped'])} skipped); raise tokenization.max_length")
    with atomic_path(output_dir, directory=True) as tmp:
        dataset.save_to_disk(str(tmp))
        write_json_atomic(report, Path(tmp) / TOKENS_REPORT)
    return report
