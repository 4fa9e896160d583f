"""Messenger-style measures of a speaker's turns, and one distance between two sets of them.

A turn is the tuple of messages one person sent in a row. Every measure is a plain number that a
person can check by hand: averages per turn or per message, and shares of messages.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

MEASURES = ("messages_per_turn", "chars_per_message", "question_rate", "emoji_rate", "bracket_smiley_rate",
            "lowercase_start_rate", "final_punctuation_rate", "cyrillic_share", "latin_share")
# relative measures are compared as |a - b| / max(a, b); the others are shares in [0, 1]
RELATIVE = {"messages_per_turn", "chars_per_message", "emoji_rate"}

_SMILEY = re.compile(r"(?<![(:;=8])\)+\s*$")  # "го))", "ok)" — not ":)" and not closing a "(" …
_WORD = re.compile(r"\w+", re.UNICODE)


def is_emoji(char: str) -> bool:
    return unicodedata.category(char) == "So" or 0x1F000 <= ord(char) <= 0x1FAFF


def _bracket_smiley(message: str) -> bool:
    return bool(_SMILEY.search(message)) and message.count("(") < message.count(")")


def measure(turns: Sequence[Sequence[str]]) -> dict[str, float]:
    """The style measures of `turns` (all zero when there are none)."""
    messages = [m for turn in turns for m in turn if m.strip()]
    if not messages:
        return dict.fromkeys(MEASURES, 0.0)
    n = len(messages)
    letters = [c for m in messages for c in m if c.isalpha()]
    cyrillic = sum(1 for c in letters if "CYRILLIC" in unicodedata.name(c, ""))
    latin = sum(1 for c in letters if "LATIN" in unicodedata.name(c, ""))
    first_letters = [next((c for c in m if c.isalpha()), "") for m in messages]
    cased = [c for c in first_letters if c and c.lower() != c.upper()]
    stripped = [m.rstrip() for m in messages]
    return {
        "messages_per_turn": round(n / len(turns), 4),
        "chars_per_message": round(sum(len(m) for m in messages) / n, 4),
        "question_rate": round(sum(m.endswith("?") for m in stripped) / n, 4),
        "emoji_rate": round(sum(is_emoji(c) for m in messages for c in m) / n, 4),
        "bracket_smiley_rate": round(sum(_bracket_smiley(m) for m in stripped) / n, 4),
        "lowercase_start_rate": round(sum(c.islower() for c in cased) / len(cased), 4) if cased else 0.0,
        "final_punctuation_rate": round(sum(m[-1:] in ".!?…" for m in stripped) / n, 4),
        "cyrillic_share": round(cyrillic / len(letters), 4) if letters else 0.0,
        "latin_share": round(latin / len(letters), 4) if letters else 0.0,
    }


def vocabulary_overlap(real: Sequence[Sequence[str]], generated: Sequence[Sequence[str]]) -> float:
    """Jaccard overlap of the lower-cased word sets."""
    a = {w.lower() for turn in real for m in turn for w in _WORD.findall(m)}
    b = {w.lower() for turn in generated for m in turn for w in _WORD.findall(m)}
    return round(len(a & b) / len(a | b), 4) if a | b else 1.0


def distance(real: dict[str, float], other: dict[str, float], overlap: float) -> float:
    """Mean difference over the measures (each in [0, 1]) and 1 - vocabulary overlap; 0 = same style."""
    parts = []
    for name in MEASURES:
        a, b = real[name], other[name]
        parts.append(abs(a - b) / max(a, b) if name in RELATIVE and max(a, b) > 0 else abs(a - b))
    parts.append(1 - overlap)
    return round(sum(parts) / len(parts), 4)
