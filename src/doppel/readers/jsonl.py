"""Plain JSONL, for any other source: one message a line, written by a few lines of the user's own code.

    {"chat": "Max Orlov", "sender": "Max Orlov", "time": "2024-03-02T18:04:00", "text": "yo"}
    {"chat": "Max Orlov", "sender": "Lena Volkova", "time": 1709402700, "text": "го))"}

`chat` names the conversation, `sender` the person (their name is their id), `time` is ISO 8601 (a time without
a zone is read as UTC) or unix seconds, `text` the message. Optional: `chat_type` ("personal_chat" or
"private_group"; by default a chat of one or two people is personal), `me` (true on the owner's messages: one
sender's; a second sender that says it is refused).
Lines may come in any order: each chat's messages are sorted by time (the file is read into memory).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from doppel.errors import ExportError
from doppel.readers.files import name_id, regular_file, unix_time
from doppel.readers.records import Chat, Header, Message, OnRead, chat_type


def _time(value: Any) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return unix_time(value)
    if isinstance(value, str):
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return unix_time((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())
    raise ValueError(f"time must be ISO 8601 text or unix seconds, got {value!r}")


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The file's header (the owner, when lines say `"me": true`) and its chats with their messages."""
    regular_file(path)
    chats: dict[str, list[tuple[int, int, str, str]]] = {}
    types: dict[str, str] = {}
    owner: tuple[str, int] | None = None  # the sender that says "me": true, and the first line that says it
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                chat, sender, text = row["chat"], row["sender"], row["text"]
                if not all(isinstance(v, str) for v in (chat, sender, text)):
                    raise ValueError("chat, sender and text must be strings")
                ts = _time(row["time"])
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                what = f"no {exc}" if isinstance(exc, KeyError) else "nested too deeply to decode" \
                    if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:120]
                raise ExportError(f"{path}, line {number}: not a message ({what}); each line is "
                                  '{"chat": …, "sender": …, "time": …, "text": …}') from None
            chats.setdefault(chat, []).append((ts, number, sender, text))
            if isinstance(row.get("chat_type"), str):
                types[chat] = row["chat_type"]
            if row.get("me") is True:
                if owner is not None and owner[0] != sender:
                    raise ExportError(f'{path}, line {number}: "me": true on {sender!r}, and on {owner[0]!r} '
                                      f"(line {owner[1]}); only your own messages say it")
                owner = owner or (sender, number)
    if not chats:
        raise ExportError(f"{path} holds no messages")
    return Header(f"name:{owner[0]}" if owner else None), _items(chats, types, path.stat().st_size, on_read)


def _items(chats: dict[str, list[tuple[int, int, str, str]]], types: dict[str, str], size: int,
           on_read: OnRead) -> Iterator[Chat | Message]:
    for name, rows in chats.items():
        people = {sender for _, _, sender, _ in rows}
        kind = types.get(name) or chat_type(len(people))
        yield Chat(name_id(name), kind, name)
        for ts, number, sender, text in sorted(rows):
            yield Message(number, ts, f"name:{sender}", sender, text, "text" if text.strip() else "empty")
    if on_read is not None:
        on_read(size)
