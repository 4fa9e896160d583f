"""Redaction of contact details and pseudonyms for people's names. Everything runs locally."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

PLACEHOLDERS = {"phone": "[phone]", "email": "[email]", "bank_card": "[card]"}

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by spaces or dashes; confirmed with the Luhn checksum.
_CARD = re.compile(r"(?<![\d+])\d(?:[ -]?\d){12,18}(?!\d)")
# An international number (+ and 8-15 digits) or a long local one (10+ digits) with the usual
# separators; times, dates and short numbers do not reach that many digits.
_PHONE = re.compile(r"(?<!\d[ -])(?:\+\d[\d ().-]{6,18}\d|(?<![\d+])\(?\d[\d ().-]{8,16}\d)"
                    r"(?![ -]?\d)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return PLACEHOLDERS["bank_card"] if _luhn(digits) else match.group(0)


def _phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    plus = match.group(0).startswith("+")
    return PLACEHOLDERS["phone"] if digits >= (8 if plus else 10) else match.group(0)


def redact(text: str, entities: Iterable[tuple[str, str]] = ()) -> str:
    """Replace typed entities (exact) and then e-mails, card and phone numbers found by pattern."""
    for kind, value in entities:
        text = text.replace(value, PLACEHOLDERS.get(kind, "[redacted]"))
    if not any(ch.isdigit() for ch in text) and "@" not in text:
        return text
    text = _EMAIL.sub(PLACEHOLDERS["email"], text)
    text = _CARD.sub(_card, text)
    return _PHONE.sub(_phone, text)


def aliases(ranked_ids: Iterable[str]) -> dict[str, str]:
    """Consistent aliases, "Person 1" for the most active speaker and so on."""
    return {sid: f"Person {i}" for i, sid in enumerate(ranked_ids, 1)}


def name_replacer(names: Mapping[str, str]) -> Callable[[str], str]:
    """A function replacing each real name (or a word of it, as a whole word) by its alias."""
    lookup = {w: alias for name, alias in names.items() for w in [*name.split(), name] if len(w) >= 3}
    if not lookup:
        return lambda text: text
    alternation = "|".join(re.escape(w) for w in sorted(lookup, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)")
    return lambda text: pattern.sub(lambda m: lookup[m.group(0)], text)
