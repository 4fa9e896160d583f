"""Telegram's ids: a user is a number, named `user<number>` in the records and in a prepared dataset (stats.json,
the sessions' `speaker_id`), and exports of v1.4.8-v2.7.1 wrote ids shifted by 2^32 (users) and 2^33 (chats and
channels), which a user may type as the file shows them (`--chat`, `--me`, `--train-on`).

The one place that writes a user id as a sender id (`speaker`) and reads it back (`user_id`: the bot knows a
Telegram user by their number); the reader, preparing and the bot all go through it.
"""

from __future__ import annotations

import re
from typing import Any

_USER_SHIFT = 1 << 32  # v1.4.8-v2.7.1 exports wrote peer ids shifted by 2^32 (users) / 2^33 (chats)
_SPEAKER = re.compile(r"user(\d+)")


def speaker(user: int) -> str:
    """The sender id of Telegram user `user`."""
    return f"user{user}"


def user_id(sender: str) -> int | None:
    """The Telegram user a sender id is (None: not a Telegram user's, e.g. `name:Max`, `channel123`)."""
    found = _SPEAKER.fullmatch(sender)
    return int(found.group(1)) if found else None


def peer_id(raw: int | str | None) -> str:
    """Normalise a `from_id` of any format version to the "user123" form."""
    if isinstance(raw, str):
        return raw
    if raw is None:
        return "unknown"
    if raw >= 2 * _USER_SHIFT:
        return f"chat{raw - 2 * _USER_SHIFT}"
    return speaker(raw - _USER_SHIFT if raw >= _USER_SHIFT else raw)


def chat_id(raw: Any) -> int:
    """Bare chat id; undoes the shift of v1.4.8-v2.7.1 exports."""
    value = int(raw)
    if value >= 2 * _USER_SHIFT:
        return value - 2 * _USER_SHIFT
    return value - _USER_SHIFT if value >= _USER_SHIFT else value


def chat_ids(value: str, shifted: bool) -> tuple[int, ...]:
    """The chat ids a typed value may name (none: it is a name): the number, and unshifted in an old export."""
    if not value.lstrip("-").isdigit():
        return ()
    return (int(value), chat_id(int(value))) if shifted else (int(value),)


def sender_ids(value: str, shifted: bool) -> list[str]:
    """The sender ids a typed value may name, in the order they are tried: the value itself, then a bare number as
    a Telegram user's (`201` is `user201`) and, in an old export, as the file shows it (shifted)."""
    if not value.isdigit():
        return [value]
    # the digits as typed: "0201" is not user 201
    return [value, f"user{value}", *([peer_id(int(value))] if shifted else [])]
