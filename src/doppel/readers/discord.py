"""Discord, as DiscordChatExporter writes it (JSON): one channel or DM per file, streamed.

    {"guild": {"id", "name"}, "channel": {"id", "type", "name", …},
     "messages": [{"id", "type", "timestamp", "content", "author": {"id", "name", "nickname", "isBot"},
                   "attachments": [...], "embeds": [...], "stickers": [...], "reference": {...}}, ...]}

`type` "Default" and "Reply" are what people wrote; the others (joins, pins, calls, renames) are service
messages. A message with no text but attachments, embeds or stickers is media without a caption, and so is a
shared location: a maps link and nothing else (readers/notices.py), as Telegram's locations are media. Bots are never
speakers: their messages are dropped as "bot". A person is their Discord id ("discord123"), shown by their
nickname in the server, or their name. A direct message's channel is named after the other person, which tells
who you are; in a group DM or a server channel (used with `--include-groups`) give `--me NAME`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import ijson
import msgspec

from doppel.errors import ExportError
from doppel.readers import jsonevents
from doppel.readers.files import name_id, regular_file, shown, unix_time
from doppel.readers.jsonarray import JSON_STRING, ArrayItems, Skeleton, Unusual
from doppel.readers.notices import is_location
from doppel.readers.records import GROUP, PERSONAL, Chat, Header, Message, OnRead

PEOPLE = frozenset({"Default", "Reply"})


_FIRST_KEY = re.compile(rb"\s*\{\s*(" + JSON_STRING + rb")\s*:")


def first_key(path: Path) -> str | None:
    """The first key of a JSON file's object (None when its first 4 KB start none): tells Discord's JSON from
    Telegram's. Matched in the bytes, not parsed: a parser reads a whole buffer first, and fails on what follows."""
    with path.open("rb") as handle:
        found = _FIRST_KEY.match(handle.read(4096))
    try:
        return str(json.loads(found.group(1))) if found else None
    except ValueError:
        return None


def _channel(path: Path) -> dict[str, Any]:
    """The `channel` object, read before the messages."""
    with path.open("rb") as handle:
        events = jsonevents.parse(handle)
        try:
            for prefix, event, value in events:
                if prefix == "channel":  # the value's first event
                    channel = jsonevents.build(events, event, value)
                    if not isinstance(channel, dict):
                        raise ExportError(f"{path} has a channel that is not an object ({shown(channel)}); "
                                          "is it a DiscordChatExporter JSON export?")
                    return channel
                if prefix == "" and event == "map_key" and value == "messages":
                    break
        except ijson.JSONError as exc:
            raise ExportError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    raise ExportError(f"{path} has no channel before its messages; is it a DiscordChatExporter JSON export?")


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    regular_file(path)
    channel = _channel(path)
    kind = PERSONAL if channel.get("type") == "DirectTextChat" else GROUP
    name = str(channel.get("name") or channel.get("id") or path.stem)
    chat = Chat(_id(channel.get("id"), name), kind, name)
    return Header(one_chat=True), _messages(path, chat, on_read)


def _id(raw: Any, name: str) -> int:
    text = str(raw or "")
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else name_id(name)  # a snowflake


class _Item(msgspec.Struct):
    """The fields of a message that doppel reads (the others are skipped while decoding)."""

    type: Any = None
    timestamp: Any = None
    content: Any = None
    author: Any = None
    attachments: Any = None
    embeds: Any = None
    stickers: Any = None


_MESSAGES = re.compile(rb'"messages"\s*:\s*\[')
_CHUNK = 1 << 20


def _messages(path: Path, chat: Chat, on_read: Callable[[int], None] | None) -> Iterator[Chat | Message]:
    """The messages decoded in batches (readers/jsonarray.py); a file shaped otherwise is read on by ijson from the
    message where the batches stopped, and ijson gives the errors."""
    yield chat
    number = 0
    try:
        for number, item in enumerate(_batched(path, on_read), 1):
            yield _record(item, number, path)
    except Unusual:
        yield from _general(path, on_read, number)
    if on_read is not None:
        on_read(path.stat().st_size)


def _batched(path: Path, on_read: Callable[[int], None] | None) -> Iterator[_Item]:
    skeleton = Skeleton()
    array: ArrayItems[_Item] | None = None
    head = b""  # the bytes before the messages, while their key is looked for
    read = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            read += len(chunk)
            if array is None:
                head += chunk
                start = _messages_key(head)
                if start < 0:
                    if len(head) > 64 << 20:
                        raise Unusual("no messages in the first 64 MB")
                    continue
                skeleton.feed(head[:start])
                array = ArrayItems(_Item)
                chunk = head[start:]
            yield from array.feed(chunk)
            if on_read is not None:
                on_read(read)
    if array is None:
        raise Unusual("no messages")
    yield from skeleton.end_array(array)
    skeleton.close()


_STRING = re.compile(JSON_STRING)


def _messages_key(head: bytes) -> int:
    """Where the top-level `"messages": [` ends in `head` (-1: not in it): the key must be outside every string
    and at depth one (a `messages` key inside the channel is not the export's)."""
    for found in _MESSAGES.finditer(head):
        before = _STRING.sub(b"", head[:found.start()])
        if before.count(b'"') == 0 and before.count(b"{") + before.count(b"[") - before.count(b"}") \
                - before.count(b"]") == 1:
            return found.end()
    return -1


def _general(path: Path, on_read: Callable[[int], None] | None, done: int) -> Iterator[Message]:
    """ijson's reading of the messages after the first `done` (its events `jsonevents`': memory stays bounded
    however deep a field nests)."""
    with path.open("rb") as handle:
        events = jsonevents.parse(handle)
        number = 0
        try:
            for prefix, event, value in events:
                if prefix != "messages.item":
                    continue
                number += 1
                item = jsonevents.build(events, event, value)
                if number > done:
                    yield _record(item, number, path)
                if on_read is not None and number % 5000 == 0:
                    on_read(handle.tell())
        except ijson.IncompleteJSONError:
            raise ExportError(f"{path} ends early; the export looks truncated") from None
        except ijson.JSONError as exc:
            raise ExportError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def _record(item: _Item | dict[str, Any], number: int, path: Path) -> Message:
    try:
        return _message(item if item.__class__ is _Item else msgspec.convert(item, _Item, strict=False), number)
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError, msgspec.ValidationError) as exc:
        raise ExportError(f"{path} has a malformed message ({type(exc).__name__}: {exc})") from None


def _message(item: _Item, number: int) -> Message:
    author = item.author or {}
    sender = f"discord{author.get('id', 'unknown')}"
    name = author.get("nickname") or author.get("name")
    ts = unix_time(datetime.fromisoformat(str(item.timestamp).replace("Z", "+00:00")).timestamp())
    if item.type not in PEOPLE:
        return Message(number, ts, sender, name, "", "service", str(item.type))
    if author.get("isBot"):
        return Message(number, ts, sender, name, "", "bot")
    text = item.content or ""
    if not isinstance(text, str):
        raise TypeError(f"content is {_a(text)}, not text")
    if text.strip():
        if is_location(text):  # a maps link and nothing else: a shared location, media as Telegram's
            return Message(number, ts, sender, name, "", "media", "location")
        return Message(number, ts, sender, name, text, "text")
    media = "sticker" if item.stickers else "attachment" if item.attachments else "embed" if item.embeds else None
    return Message(number, ts, sender, name, "", "media" if media else "empty", media)


def _a(value: Any) -> str:
    """What a JSON value is, as a type error says it: "a list", "a number"."""
    kinds = {dict: "an object", list: "a list", bool: "true or false", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)
