"""Discord, as DiscordChatExporter writes it (JSON): one channel or DM per file, streamed.

    {"guild": {"id", "name"}, "channel": {"id", "type", "name", …},
     "messages": [{"id", "type", "timestamp", "content", "author": {"id", "name", "nickname", "isBot"},
                   "attachments": [...], "embeds": [...], "stickers": [...], "reference": {...}}, ...]}

`type` "Default" and "Reply" are what people wrote; the others (joins, pins, calls, renames) are service
messages. A message with no text but attachments, embeds or stickers is media without a caption. Bots are never
speakers: their messages are dropped as "bot". A person is their Discord id ("discord123"), shown by their
nickname in the server, or their name. A direct message's channel is named after the other person, which tells
who you are; in a group DM or a server channel (used with `--include-groups`) give `--me NAME`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import ijson

from doppel.errors import ExportError
from doppel.readers.files import name_id, regular_file
from doppel.readers.telegram import Chat, Header, Message

PEOPLE = frozenset({"Default", "Reply"})


def first_key(path: Path) -> str | None:
    """The first key of a JSON file's object (None when it has none): tells Discord's JSON from Telegram's."""
    with path.open("rb") as handle:
        try:
            for prefix, event, value in ijson.parse(handle):
                if prefix == "" and event == "map_key":
                    return str(value)
        except ijson.JSONError:
            return None
    return None


def _channel(path: Path) -> dict[str, Any]:
    """The `channel` object, read before the messages."""
    with path.open("rb") as handle:
        try:
            for key, value in ijson.kvitems(handle, ""):
                if key == "channel":
                    return dict(value)
                if key == "messages":
                    break
        except ijson.JSONError as exc:
            raise ExportError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    raise ExportError(f"{path} has no channel before its messages; is it a DiscordChatExporter JSON export?")


def read(path: Path, on_read: Callable[[int], None] | None = None) -> tuple[Header, Iterator[Chat | Message]]:
    regular_file(path)
    channel = _channel(path)
    kind = {"DirectTextChat": "personal_chat"}.get(str(channel.get("type")), "private_group")
    name = str(channel.get("name") or channel.get("id") or path.stem)
    chat = Chat(_id(channel.get("id"), name), kind, name)
    return Header("single", None), _messages(path, chat, on_read)


def _id(raw: Any, name: str) -> int:
    text = str(raw or "")
    return int(text) if text.isdigit() else name_id(name)


def _messages(path: Path, chat: Chat, on_read: Callable[[int], None] | None) -> Iterator[Chat | Message]:
    yield chat
    with path.open("rb") as handle:
        try:
            for number, item in enumerate(ijson.items(handle, "messages.item", use_float=True), 1):
                yield _message(item, number)
                if on_read is not None and number % 5000 == 0:
                    on_read(handle.tell())
        except ijson.IncompleteJSONError:
            raise ExportError(f"{path} ends early; the export looks truncated") from None
        except ijson.JSONError as exc:
            raise ExportError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise ExportError(f"{path} has a malformed message ({type(exc).__name__}: {exc})") from None
    if on_read is not None:
        on_read(path.stat().st_size)


def _message(item: dict[str, Any], number: int) -> Message:
    author = item.get("author") or {}
    sender = f"discord{author.get('id', 'unknown')}"
    name = author.get("nickname") or author.get("name")
    ts = int(datetime.fromisoformat(str(item["timestamp"]).replace("Z", "+00:00")).timestamp())
    if item.get("type") not in PEOPLE:
        return Message(number, ts, sender, name, "", "service", str(item.get("type")))
    if author.get("isBot"):
        return Message(number, ts, sender, name, "", "bot")
    text = str(item.get("content") or "")
    if text.strip():
        return Message(number, ts, sender, name, text, "text")
    media = "sticker" if item.get("stickers") else "attachment" if item.get("attachments") else \
        "embed" if item.get("embeds") else None
    return Message(number, ts, sender, name, "", "media" if media else "empty", media)
