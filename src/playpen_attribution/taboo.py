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
    rows = rows.copy()
    rows["target_word"] = [target_word(r["prompt"], r["completion"], r.get("game_role"), r.get("outcome"))
                           for r in rows.to_dict("records")]
    return rows
