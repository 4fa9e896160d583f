"""What every reader gives: the export's `Header`, then each `Chat` followed by its `Message` records, through one
entry point of one shape (`Reader`): `read(path, on_read) -> (header, items)`.

The records are the same for every format, so that everything after a reader (preparing/) is one path. A reader
fills what its format knows: who the owner is (by id, by name), whether the file is one chat's export, the ids of
its people (a name where the format has no ids: `name:Max Orlov`), and how it read what is ambiguous (`notes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

OnRead = Callable[[int], None] | None  # told the number of bytes read so far
PERSONAL, GROUP = "personal_chat", "private_group"  # the chat types of a format that has no types of its own


@dataclass(frozen=True, slots=True)
class Chat:
    id: int
    type: str | None  # Telegram's types: personal_chat, private_group, saved_messages, public_channel, …
    name: str | None
    left: bool = False  # from the `left_chats` section of a full Telegram export


class Message(msgspec.Struct, frozen=True):
    id: int  # 0: the export gives none (preparing/sessions.py `content_id`)
    ts: int  # unix seconds, UTC
    sender_id: str  # the person: "user123" (Telegram: telegram_ids.speaker), "discord123", "name:Max Orlov", "system"
    sender_name: str | None  # display name at export time; None for deleted accounts
    text: str  # plain text: caption for media, the emoji for a sticker
    kind: Literal["text", "sticker", "media", "service", "empty", "unsupported", "bot"]
    media: str | None = None  # service action, or media type of a message without text
    forwarded: bool = False
    sensitive: tuple[tuple[str, str], ...] = ()  # (type, text) of phone/e-mail/bank-card entities


@dataclass(frozen=True, slots=True)
class Header:
    """What an export says before its chats."""

    owner_id: str | None = None  # the owner's sender id, where the export says who the owner is
    owner_name: str | None = None  # their name, where the export says it (Telegram's personal_information)
    one_chat: bool = False  # the file is one chat's export: the chat's people tell who the owner is
    shifted: bool = False  # Telegram v1.4.8-v2.7.1: ids written shifted by 2^32 (readers/telegram_ids.py)
    notes: tuple[tuple[str, str], ...] = ()  # (what, how it was read): WhatsApp's order of dates, for stats.json


Reader = Callable[[Path, OnRead], tuple[Header, Iterator[Chat | Message]]]


def chat_type(people: int) -> str:
    """The type of a chat of `people` people, for a format that does not say: two or fewer is personal."""
    return PERSONAL if people <= 2 else GROUP


def joined(headers: Sequence[Header]) -> Header:
    """The header of several exports read as one: the first owner any of them names, and shifted ids if any has."""
    owner = next((h for h in headers if h.owner_id), None)
    return Header(owner.owner_id if owner else None, owner.owner_name if owner else None,
                  shifted=any(h.shifted for h in headers))
