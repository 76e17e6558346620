"""What a taboo transcript reveals about its game: the target word, read from the transcripts themselves (the
describer's prompt names it; a successful guesser's last guess is it), never from outside data."""

from __future__ import annotations

import re

import pandas as pd

from playpen_attribution.tables import messages_of, readable

_DESCRIBER_TARGET = re.compile(r"target word that you need to describe and that the other player needs to guess:"
                               r"\s*\n\s*(\S[^\n]*?)\s*\n")
_GUESS = re.compile(r"^\s*GUESS:\s*(.+?)\s*$")


def _last_content(value) -> str:
    messages = messages_of(value)
    if messages is None:
        return value if isinstance(value, str) else ""
    return messages[-1]["content"] if messages else ""


def target_word(prompt, completion, role: str | None, outcome: str | None) -> str | None:
    """The taboo target word where the episode reveals it: in the describer's prompt, or as the guesser's
    last guess in a successful episode. None where it cannot be recovered (a failed guesser episode)."""
    found = _DESCRIBER_TARGET.search(readable(prompt))
    if found:
        return found.group(1).strip().lower()
    if role == "WordGuesser" and outcome == "success":
        guess = _GUESS.match(_last_content(completion))
        if guess:
            return guess.group(1).strip().lower()
    return None


def with_target_words(rows: pd.DataFrame) -> pd.DataFrame:
    """A table with its `target_word` column: kept where the data stage found the word (it also reads the
    describer's prompt of the same episode), read from the row's own transcript where the column is missing or
    empty (tables from elsewhere)."""
    rows = rows.copy()
    own = [target_word(r["prompt"], r["completion"], r.get("game_role"), r.get("outcome"))
           for r in rows.to_dict("records")]
    if "target_word" in rows:
        rows["target_word"] = [w if isinstance(w, str) and w else o for w, o in zip(rows["target_word"], own)]
    else:
        rows["target_word"] = own
    return rows


# the fields that name one episode in playpen's meta: both players' rows of an episode share them
EPISODE_KEY = ("game", "experiment", "task_id", "model")


def _episode_key(meta: dict) -> tuple:
    return tuple(meta.get(field) for field in EPISODE_KEY)


def describer_words(raw_rows: list[dict]) -> dict[tuple, str]:
    """Each taboo episode's target word from its describer's prompt, for the episodes of a raw split with exactly one
    describer row (an ambiguous key names no word)."""
    found: dict[tuple, list[str]] = {}
    for row in raw_rows:
        meta = row.get("meta") or {}
        if meta.get("game") != "taboo" or meta.get("game_role") != "WordDescriber":
            continue
        messages = row.get("messages") or []
        prompt = "\n\n".join(m.get("content", "") for m in messages if m.get("role") == "user")
        match = _DESCRIBER_TARGET.search(prompt)
        if match:
            found.setdefault(_episode_key(meta), []).append(match.group(1).strip().lower())
    return {key: words[0] for key, words in found.items() if len(words) == 1}


def add_episode_target_words(frame: pd.DataFrame, raw_rows: list[dict]) -> pd.DataFrame:
    """`target_word` and where it was read (`target_word_source`): the row's own transcript, else the describer's
    prompt of the same episode in the same split (a failed guesser's episode names its word only there)."""
    episode_words = describer_words(raw_rows)
    words, sources = [], []
    for row in frame.to_dict("records"):
        own = target_word(row["prompt"], row["completion"], row.get("game_role"), row.get("outcome"))
        episode = episode_words.get(_episode_key(row))
        if own:
            word, source = own, "own transcript"
        elif episode:
            word, source = episode, "describer of the same episode"
        else:
            word, source = None, None
        words.append(word)
        sources.append(source)
    return frame.assign(target_word=words, target_word_source=sources)
