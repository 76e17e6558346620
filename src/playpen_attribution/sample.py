"""A small, deterministic sample in the playpen `interactions` format.

It is what the offline demo and the tests run on. The folder it writes loads with
`datasets.load_dataset(folder, "interactions")` exactly like `colab-potsdam/playpen-data`:
splits `train` and `validation`, columns `messages` and `meta`.

It holds taboo in both roles (successes, failures, aborted episodes, a few null outcomes) and
two other games. Validation guesser episodes ask for target words that training episodes also
ask for, with clues phrased differently, so attribution has a right answer to find: the
training episodes about the same word. The last training row is a verbatim copy of one validation
guesser episode (experiment `planted_copy`): every method should rank it first for that query, and the
report shows whether it does.

Regenerate with `python -m playpen_attribution.sample resources/playpen-sample`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PLANTED_EXPERIMENT = "planted_copy"

# Each target word with four short descriptions; clues combine two of them.
LEXICON: dict[str, list[str]] = {
    "apple": ["a crunchy fruit", "grows on trees in orchards", "red or green skin", "pressed into cider"],
    "river": ["flowing fresh water", "runs to the sea", "has banks on both sides", "boats travel along it"],
    "candle": ["wax with a wick", "gives light when lit", "melts slowly", "sits on birthday cakes"],
    "piano": ["an instrument with keys", "black and white keys", "played in concert halls", "has hammers and strings"],
    "winter": ["the coldest season", "comes after autumn", "snow falls then", "days are short"],
    "bridge": ["crosses over water", "connects two sides", "cars drive across it", "built from steel or stone"],
    "doctor": ["works in a hospital", "treats sick people", "writes prescriptions", "wears a white coat"],
    "ladder": ["has rungs to climb", "leans against a wall", "helps reach high places", "made of wood or metal"],
    "honey": ["made by bees", "sweet and sticky", "golden and thick", "kept in a jar"],
    "anchor": ["keeps a ship in place", "heavy iron hook", "dropped to the seabed", "tied to a chain"],
    "mirror": ["shows your reflection", "glass on a wall", "used to check your hair", "reverses left and right"],
    "pillow": ["soft thing for your head", "lies on a bed", "filled with feathers", "has a cotton case"],
    "rocket": ["flies into space", "launched with fire", "carries astronauts", "very fast engine"],
    "garden": ["grows flowers and vegetables", "outside the house", "needs watering", "has soil and plants"],
    "wallet": ["holds money and cards", "kept in a pocket", "made of leather", "you pay from it"],
    "tiger": ["a big striped cat", "orange with black stripes", "lives in the jungle", "hunts at night"],
}
GUESSER_INSTRUCTIONS = (
    "You are playing a collaborative word guessing game in which you have to guess a target word that "
    "another player describes to you. You can make one guess at each trial. You win when you guess the "
    "target word. You lose when you cannot guess it in 3 tries. After each trial you will get a new hint "
    "from the other player which starts with CLUE. Make your guesses by just saying the word using the "
    "following form: GUESS: <a word>\n\nLet us start."
)
DESCRIBER_INSTRUCTIONS = (
    "You are playing a collaborative word guessing game in which you have to describe a target word for "
    "another player to guess. Rules: (a) You have to reply in the form: CLUE: <some text>. Guesses from the "
    "other player will start with GUESS. (b) You cannot use the target word itself, parts or morphological "
    "variations of it in your description. (c) In addition, the same rules apply for related words which "
    "are provided below. End conditions: (i) If you use the target word or a related word in your "
    "description, then you lose. (ii) If the other player can guess the target word in 3 tries, you both "
    "win.\n\nLet us start.\n\nThis is the target word that you need to describe and that the other player "
    "needs to guess:\n\n{word}\n\nRelated words are:\n\n- {related}\n\nImportant: You are under time "
    "pressure, give short descriptions that are to the point!"
)
CLUE_TEMPLATES_TRAIN = ["{a}, and {b}.", "Think of {a}; it {b2}.", "Something that is {a}."]
CLUE_TEMPLATES_VALIDATION = ["It is {a} and also {b}.", "Picture {a}."]
MODELS = ["Llama-3.3-70B-Instruct", "Qwen2.5-72B-Instruct", "gpt-4o-2024-08-06"]
EXPERIMENTS = ["high_en", "medium_en", "low_en"]

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
META_TYPE = pa.struct(
    [
        ("experiment", pa.string()),
        ("game", pa.string()),
        ("game_role", pa.string()),
        ("model", pa.string()),
        ("outcome", pa.string()),
        ("player_name", pa.string()),
        ("task_id", pa.int64()),
    ]
)
DATASET_CARD = """---
configs:
- config_name: interactions
  data_files:
  - split: train
    path: interactions/train-*.parquet
  - split: validation
    path: interactions/validation-*.parquet
---
# playpen-sample

A small synthetic sample in the format of `colab-potsdam/playpen-data` (config `interactions`),
written by `python -m playpen_attribution.sample`. Do not edit by hand.
"""


def _clue(rng: random.Random, word: str, templates: list[str]) -> str:
    a, b = rng.sample(LEXICON[word], 2)
    template = rng.choice(templates)
    return template.format(a=a, b=b, b2=b.replace("a ", "is a ", 1) if b.startswith("a ") else b)


def _meta(rng: random.Random, game: str, role: str, outcome: str | None, task_id: int) -> dict:
    player = {"WordDescriber": "Player 1", "WordGuesser": "Player 2"}.get(role, "Player 1")
    return {
        "experiment": rng.choice(EXPERIMENTS),
        "game": game,
        "game_role": role,
        "model": rng.choice(MODELS),
        "outcome": outcome,
        "player_name": player,
        "task_id": task_id,
    }


def _guesser_episode(rng: random.Random, word: str, templates: list[str], task_id: int) -> dict:
    """A WordGuesser episode: the last assistant turn is the final guess."""
    kind = rng.choices(["success", "late_success", "failure", "aborted", "null"], [6, 2, 2, 1, 1])[0]
    wrong = [w for w in LEXICON if w != word]
    messages = [{"role": "user", "content": f"{GUESSER_INSTRUCTIONS}\n\n\nCLUE: {_clue(rng, word, templates)}"}]
    if kind in ("success", "null"):
        messages.append({"role": "assistant", "content": f"GUESS: {word}"})
        outcome = "success" if kind == "success" else None
    elif kind == "late_success":
        messages.append({"role": "assistant", "content": f"GUESS: {rng.choice(wrong)}"})
        messages.append({"role": "user", "content": f"CLUE: {_clue(rng, word, templates)}"})
        messages.append({"role": "assistant", "content": f"GUESS: {word}"})
        outcome = "success"
    elif kind == "failure":
        for turn, guess in enumerate(rng.sample(wrong, 3)):
            if turn:
                messages.append({"role": "user", "content": f"CLUE: {_clue(rng, word, templates)}"})
            messages.append({"role": "assistant", "content": f"GUESS: {guess}"})
        outcome = "failure"
    else:  # aborted: the guess breaks the answer format
        messages.append({"role": "assistant", "content": f"I think the word might be {rng.choice(wrong)}."})
        outcome = "aborted"
    return {"messages": messages, "meta": _meta(rng, "taboo", "WordGuesser", outcome, task_id)}


def _describer_episode(rng: random.Random, word: str, task_id: int) -> dict:
    """A WordDescriber episode: the describer gives clues until the guess is right or three tries pass."""
    related = "\n- ".join(rng.sample([w for w in LEXICON if w != word], 3))
    messages = [{"role": "user", "content": DESCRIBER_INSTRUCTIONS.format(word=word, related=related)}]
    turns = rng.choice([1, 2, 3])
    for turn in range(turns):
        if turn:
            messages.append({"role": "user", "content": f"GUESS: {rng.choice([w for w in LEXICON if w != word])}"})
        messages.append({"role": "assistant", "content": f"CLUE: {_clue(rng, word, CLUE_TEMPLATES_TRAIN)}"})
    outcome = rng.choice(["success", "success", "failure", "aborted"])
    return {"messages": messages, "meta": _meta(rng, "taboo", "WordDescriber", outcome, task_id)}


def _other_game_episode(rng: random.Random, task_id: int) -> dict:
    game, role = rng.choice([("wordle", "Player 1"), ("referencegame", "Player 1"), ("referencegame", "Player 2")])
    word = rng.choice(list(LEXICON))
    messages = [
        {"role": "user", "content": f"Let us play {game}. Describe or guess the hidden item. Hint: {word[:2]}"},
        {"role": "assistant", "content": f"ANSWER: {word}"},
    ]
    return {"messages": messages, "meta": _meta(rng, game, role, rng.choice(["success", "failure"]), task_id)}


def generate_split(split: str, seed: int = 0) -> list[dict]:
    """Episodes of one split, shuffled deterministically so taboo rows are not contiguous."""
    rng = random.Random(f"{split}-{seed}")
    words = list(LEXICON)
    rows = []
    if split == "train":
        templates, guesser_per_word, describer_per_word, others = CLUE_TEMPLATES_TRAIN, 8, 3, 16
    else:
        templates, guesser_per_word, describer_per_word, others = CLUE_TEMPLATES_VALIDATION, 2, 1, 4
    task_id = 0
    for word in words:
        for _ in range(guesser_per_word):
            rows.append(_guesser_episode(rng, word, templates, task_id))
            task_id += 1
        for _ in range(describer_per_word):
            rows.append(_describer_episode(rng, word, task_id))
            task_id += 1
    for _ in range(others):
        rows.append(_other_game_episode(rng, task_id))
        task_id += 1
    rng.shuffle(rows)
    if split == "train":
        # appended after the shuffle, so the ids of every other row stay what they were
        rows.append(planted_copy(seed, task_id))
    return rows


def planted_copy(seed: int, task_id: int) -> dict:
    """A verbatim copy of the first successful validation guesser episode, marked in its metadata."""
    original = next(r for r in generate_split("validation", seed)
                    if r["meta"]["game_role"] == "WordGuesser" and r["meta"]["outcome"] == "success")
    return {"messages": original["messages"],
            "meta": {**original["meta"], "experiment": PLANTED_EXPERIMENT, "task_id": task_id}}


def write_playpen_folder(folder: str | Path, splits: dict[str, list[dict]], schema: pa.Schema | None = None) -> Path:
    """Write rows as a local playpen-format dataset folder (`interactions/{split}-*.parquet` + card)."""
    folder = Path(folder)
    (folder / "interactions").mkdir(parents=True, exist_ok=True)
    if schema is None:
        schema = pa.schema([("messages", MESSAGES_TYPE), ("meta", META_TYPE)])
    for split, rows in splits.items():
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, folder / "interactions" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(DATASET_CARD)
    return folder


def write_sample(folder: str | Path, seed: int = 0) -> Path:
    """Write the demo sample (train and validation splits) to `folder`."""
    return write_playpen_folder(folder, {split: generate_split(split, seed) for split in ("train", "validation")})


if __name__ == "__main__":
    print(write_sample(sys.argv[1] if len(sys.argv) > 1 else "resources/playpen-sample"))
