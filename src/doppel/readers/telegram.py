"""Streaming reader for Telegram Desktop JSON exports (both layouts) → `Chat` and `Message` records.

Facts about the format (field shapes, quirks, owner rules) are in docs/telegram-format.md.
Memory stays constant in the file size: chat boundaries are found by scanning the byte stream for chat headers
(`_pieces`), each chat's messages are decoded a batch at a time by msgspec (readers/jsonarray.py), and the bytes
around them are checked by ijson as they come. A file shaped otherwise is read by the general reader, two ijson
passes that accept any key order.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import ijson
import msgspec
from msgspec import UNSET

from doppel.errors import ExportError
from doppel.readers import jsonevents
from doppel.readers.files import unix_time
from doppel.readers.jsonarray import JSON_STRING, ArrayItems, Skeleton, Unusual
from doppel.readers.repair import RepairingReader

Layout = Literal["full", "single"]
OnRead = Callable[[int], None] | None  # told the number of bytes read so far
_USER_SHIFT = 1 << 32  # v1.4.8-v2.7.1 exports wrote peer ids shifted by 2^32 (users) / 2^33 (chats)
_SENSITIVE = frozenset({"phone", "email", "bank_card"})
_MEDIA_KEYS = (
    "photo", "file", "contact_information", "location_information", "poll", "todo_list",
    "game_title", "invoice_information", "giveaway_information", "paid_stars_amount", "place_name",
)


@dataclass(frozen=True, slots=True)
class Chat:
    id: int
    type: str | None
    name: str | None
    left: bool = False  # from the `left_chats` section of a full export


class Message(msgspec.Struct, frozen=True):
    id: int  # 0: the export gives none (preparing/sessions.py `content_id`)
    ts: int  # unix seconds, UTC
    sender_id: str  # "user123", "channel123", "chat123"
    sender_name: str | None  # display name at export time; None for deleted accounts
    text: str  # plain text: caption for media, the emoji for a sticker
    kind: Literal["text", "sticker", "media", "service", "empty", "unsupported", "bot"]
    media: str | None = None  # service action, or media type of a message without text
    forwarded: bool = False
    sensitive: tuple[tuple[str, str], ...] = ()  # (type, text) of phone/e-mail/bank-card entities


@dataclass(frozen=True, slots=True)
class Header:
    layout: Layout
    owner_id: str | None  # from personal_information (full export) or None
    shifted: bool = False  # chat ids are v1.4.8-v2.7.1 shifted peer ids (integer from_id values)
    owner_name: str | None = None  # "first_name last_name" from personal_information
    notes: tuple[tuple[str, str], ...] = ()  # (what, how it was read): WhatsApp's order of dates, for stats.json


def peer_id(raw: int | str | None) -> str:
    """Normalise a `from_id` of any format version to the "user123" form."""
    if isinstance(raw, str):
        return raw
    if raw is None:
        return "unknown"
    if raw >= 2 * _USER_SHIFT:
        return f"chat{raw - 2 * _USER_SHIFT}"
    return f"user{raw - _USER_SHIFT if raw >= _USER_SHIFT else raw}"


def chat_id(raw: Any) -> int:
    """Bare chat id; undoes the shift of v1.4.8-v2.7.1 exports."""
    value = int(raw)
    if value >= 2 * _USER_SHIFT:
        return value - 2 * _USER_SHIFT
    return value - _USER_SHIFT if value >= _USER_SHIFT else value


class RawMessage(msgspec.Struct):
    """The fields of a message object that doppel reads (the others are skipped while decoding); `UNSET`: absent."""

    id: Any = 0  # absent in some converted files: 0 in both readers, which preparing replaces by a content id
    type: Any = None
    date: Any = UNSET
    date_unixtime: Any = UNSET
    from_: Any = msgspec.field(default=UNSET, name="from")
    from_id: Any = UNSET
    actor: Any = UNSET
    actor_id: Any = UNSET
    action: Any = None
    text: Any = ""
    forwarded_from: Any = UNSET
    media_type: Any = None
    sticker_emoji: Any = None
    self_destruct_period_seconds: Any = UNSET
    poll: Any = UNSET
    photo: Any = UNSET
    file: Any = UNSET
    contact_information: Any = UNSET
    location_information: Any = UNSET
    todo_list: Any = UNSET
    game_title: Any = UNSET
    invoice_information: Any = UNSET
    giveaway_information: Any = UNSET
    paid_stars_amount: Any = UNSET
    place_name: Any = UNSET


def _timestamp(m: RawMessage) -> int:
    raw = m.date_unixtime
    if raw is not UNSET and raw is not None:
        return unix_time(int(raw) if isinstance(raw, str) else raw)
    # Exports before v3.7.6 have only local wall-clock time; gaps between messages are still right
    # except across a DST change.
    return int(datetime.fromisoformat(m.date).replace(tzinfo=UTC).timestamp())


def _text(raw: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    if isinstance(raw, str):
        return raw, ()
    if not raw:
        return "", ()
    parts: list[str] = []
    sensitive: list[tuple[str, str]] = []
    for part in raw:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict):
            piece = part.get("text") or ""
            if not isinstance(piece, str):
                piece = str(piece)
            parts.append(piece)
            kind = part.get("type")
            if kind in _SENSITIVE and piece:
                sensitive.append((kind, piece))
    return "".join(parts), tuple(sensitive)


def _sender(raw: Any, name: Any) -> str:
    """The sender's id; without one (some hand-made or converted exports), their name stands for it."""
    if (raw is None or raw is UNSET) and isinstance(name, str) and name:
        return f"name:{name}"
    return peer_id(None if raw is UNSET else raw)


def _poll(m: RawMessage) -> str:
    question = m.poll.get("question") if isinstance(m.poll, dict) else None
    return question if isinstance(question, str) else ""


def _name(value: Any) -> str | None:
    return None if value is UNSET else value


def to_message(m: RawMessage | dict[str, Any]) -> Message:
    """Normalise one raw message (decoded, or as a dict of the JSON object)."""
    if m.__class__ is not RawMessage:
        m = msgspec.convert(m, RawMessage, strict=False)
    kind = m.type
    if kind == "unsupported" or (m.date is UNSET and m.date_unixtime is UNSET):
        return Message(int(m.id), 0, "unknown", None, "", "unsupported")
    ts = unix_time(int(m.date_unixtime)) if m.date_unixtime.__class__ is str else _timestamp(m)
    mid = int(m.id)
    if kind == "service":
        action = m.action or "custom_action"
        sender = _sender(m.actor_id, m.actor) if m.actor_id is not UNSET or m.actor is not UNSET \
            else _sender(m.from_id, m.from_)
        return Message(mid, ts, sender, _name(m.actor), "", "service", action)
    raw = m.text
    text, sensitive = (raw, ()) if raw.__class__ is str else _text(raw)
    forwarded = m.forwarded_from is not UNSET
    name = _name(m.from_)
    sender_id = m.from_id if m.from_id.__class__ is str else _sender(m.from_id, name)
    if text:  # the common case; a caption is kept whatever the media
        return Message(mid, ts, sender_id, name, text, "text", None, forwarded, sensitive)
    if _poll(m):  # the question is what was said
        return Message(mid, ts, sender_id, name, _poll(m), "text", "poll", forwarded)
    media = m.media_type or next((k for k in _MEDIA_KEYS if getattr(m, k) is not UNSET), None)
    if media == "sticker" and m.sticker_emoji:
        return Message(mid, ts, sender_id, name, m.sticker_emoji, "sticker", media, forwarded)
    if media is None and m.self_destruct_period_seconds is not UNSET:
        media = "photo"
    return Message(mid, ts, sender_id, name, "", "media" if media else "empty", media, forwarded)


# --- layout and owner ---------------------------------------------------------------------------

def export_file(path: Path) -> Path:
    """The export's JSON file: `path` itself, or `path/result.json` for an export folder.

    Anything but a regular file is refused before it is opened: a FIFO without a writer would block.
    """
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if path.is_dir():
        if not (path / "result.json").exists():
            html = (path / "export_results.html").exists() or (path / "messages.html").exists()
            raise ExportError(f"{path} is an HTML export; re-export with 'Machine-readable JSON'" if html
                              else f"{path} has no result.json; point doppel at a Telegram JSON export")
        path = path / "result.json"
    if not stat.S_ISREG(path.stat().st_mode):
        raise ExportError(f"{path} is not a regular file; point doppel at the export's result.json")
    return path


def open_export(path: Path) -> BinaryIO:
    """Open an export file, turning the common wrong inputs into one clear `ExportError`."""
    path = export_file(path)
    handle = path.open("rb")
    start = handle.read(512).lstrip(b"\xef\xbb\xbf \t\r\n")
    handle.seek(0)
    if start[:1] == b"<":
        handle.close()
        raise ExportError(f"{path} is an HTML export; re-export with 'Machine-readable JSON'")
    if start[:1] != b"{":
        handle.close()
        raise ExportError(f"{path} is not a Telegram Desktop JSON export (no JSON object)")
    return handle


def read_header(path: Path) -> Header:
    """Layout and owner, from the keys written before the first chat."""
    path = export_file(path)
    with open_export(path) as raw:
        keys: set[str] = set()
        me: dict[str, Any] = {}
        try:
            for prefix, event, value in jsonevents.parse(RepairingReader(raw)):
                if prefix == "" and event == "map_key":
                    keys.add(value)
                    if value in ("messages", "chats", "left_chats"):
                        break
                elif prefix.startswith("personal_information.") and event in ("string", "number", "null"):
                    me[prefix.removeprefix("personal_information.")] = value
        except ijson.JSONError as exc:
            hint = "; is the file truncated?" if isinstance(exc, ijson.IncompleteJSONError) else ""
            raise ExportError(f"{path} is not valid JSON ({_short(exc)}){hint}") from None
    if "messages" in keys:
        return Header("single", None, _shifted_ids(path))
    if keys & {"chats", "left_chats", "personal_information", "about"}:
        return Header("full", _owner_id(path, me.get("user_id")), _shifted_ids(path), _owner_name(me))
    if {"info.json", "msgsCount"} & keys:
        raise ExportError(f"{path} looks like an exteraGram export; use Telegram Desktop's JSON export")
    raise ExportError(f"{path} is not a Telegram Desktop export (no 'messages' or 'chats' key)")


def _owner_id(path: Path, raw: Any) -> str | None:
    if raw is None:
        return None
    try:
        return f"user{int(raw)}"  # always the plain id, even above 2^32
    except (ValueError, TypeError):
        raise ExportError(f"{path} has a malformed personal_information.user_id ({raw!r})") from None


def _owner_name(me: dict[str, Any]) -> str | None:
    parts = (me.get("first_name"), me.get("last_name"))
    return " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip()) or None


_FROM_ID = re.compile(rb'"(?:from_id|actor_id)"\s*:\s*(["\d-])')


def _shifted_ids(path: Path, limit: int = 64 << 20) -> bool:
    """Whether chat ids are shifted: only exports whose from_id values are integers (before v2.7.2) did that.

    Since v2.7.2 ids are bare, and a modern 64-bit user id above 2^32 must not be "unshifted".
    """
    with path.open("rb") as raw:
        tail = b""
        while raw.tell() < limit and (chunk := raw.read(1 << 20)):
            found = _FROM_ID.search(tail + chunk)
            if found:
                return found.group(1) != b'"'
            tail = chunk[-64:]
    return False


def _bare(item: Chat, shifted: bool) -> Chat:
    return replace(item, id=chat_id(item.id)) if shifted else item


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__


# --- the fast streaming pass --------------------------------------------------------------------

# A chat object as Telegram Desktop writes it: optional name, then type, id, messages.
_HEADER = re.compile(
    rb'(?:"name"\s*:\s*(null|' + JSON_STRING + rb')\s*,\s*)?"type"\s*:\s*(null|' + JSON_STRING
    + rb')\s*,\s*"id"\s*:\s*(-?\d+)\s*,\s*"messages"\s*:\s*\[\Z'
)
_KEY = re.compile(rb'"(messages|chats|left_chats)"\s*:\s*([\[{])')
_LOOKBACK = 4096  # a chat header (name of at most 255 characters, escaped) fits in this
_CHUNK = 1 << 20


class UnusualLayout(Exception):
    """The fast byte scanner met a layout it does not know; read again with `general=True`."""


def _escaped(buf: bytes, quote: int) -> bool:
    """Whether the quote at `quote` is preceded by an odd run of backslashes (inside a string)."""
    run = 0
    while quote - run > 0 and buf[quote - run - 1] == 0x5C:
        run += 1
    return run % 2 == 1


def _json_string(raw: bytes) -> str:
    try:
        return str(json.loads(raw))
    except ValueError:  # e.g. invalid UTF-8: the general reader gives the error
        raise UnusualLayout("unreadable chat header") from None


def _pieces(raw: BinaryIO, layout: Layout, on_read: OnRead) -> Iterator[bytes | Chat | str]:
    """Repaired bytes cut at anchors: a `Chat` after each chat header (just past `"messages": [`),
    a list name ("chats" / "left_chats") just past `"chats": {`, with byte pieces in between."""
    reader = RepairingReader(raw, _CHUNK, on_read)
    tail = b""  # already handed-out bytes, kept as look-behind for chat headers
    pending = b""
    left = False
    while True:
        chunk = reader.read()
        eof = not chunk
        buf = tail + pending + chunk
        # keep 64 bytes back so that no key is cut in half, except at the end of the file
        limit = len(buf) if eof else max(len(tail), len(buf) - 64)
        given = len(tail)
        for match in _KEY.finditer(buf, len(tail), limit):
            if _escaped(buf, match.start()):
                continue
            key = match.group(1).decode()
            if key == "messages":
                header = _HEADER.search(buf, max(0, match.end() - _LOOKBACK), match.end())
                if header is None:
                    raise UnusualLayout(f"unexpected 'messages' key at byte ~{reader.consumed}")
                name = None if header.group(1) in (None, b"null") else _json_string(header.group(1))
                kind = None if header.group(2) == b"null" else _json_string(header.group(2))
                yield buf[given:match.end()]
                yield Chat(int(header.group(3)), kind, name, left)
            elif match.group(2) == b"{" and layout == "full":
                left = key == "left_chats"
                yield buf[given:match.end()]
                yield key
            given = match.end()
        if given < limit:
            yield buf[given:limit]
        if eof:
            return
        tail = buf[max(0, limit - _LOOKBACK):limit]
        pending = buf[limit:]


def _fast(raw: BinaryIO, layout: Layout, on_read: OnRead) -> Iterator[Chat | RawMessage]:
    """Each chat, then its messages decoded in batches (see jsonarray.py). The bytes outside the message arrays,
    with each array emptied, must make one valid JSON document: a truncated or damaged file is `UnusualLayout`,
    and the general reader gives the error."""
    skeleton = Skeleton()
    array: ArrayItems[RawMessage] | None = None
    try:
        for piece in _pieces(raw, layout, on_read):
            if isinstance(piece, bytes):
                if array is None:
                    skeleton.feed(piece)
                else:
                    yield from array.feed(piece)
            elif isinstance(piece, Chat):
                if array is not None:
                    yield from skeleton.end_array(array)
                array = array or ArrayItems(RawMessage)
                yield piece
        if array is not None:
            yield from skeleton.end_array(array)
        skeleton.close()
    except Unusual as exc:
        raise UnusualLayout(str(exc)) from None


# --- the general pass (any key order), used when the scanner is surprised ------------------------

def _general(raw: BinaryIO, layout: Layout, on_read: OnRead) -> Iterator[Chat | dict[str, Any]]:
    """Two ijson passes: chat metadata first, then messages; slower but independent of key order. The events
    are `jsonevents`': memory stays bounded however deep a field nests."""
    lists = ("",) if layout == "single" else ("chats.list.item", "left_chats.list.item")
    chats: list[Chat] = []
    meta: dict[str, Any] = {}
    for prefix, event, value in jsonevents.parse(RepairingReader(raw)):
        base = prefix.rsplit(".", 1)[0] if "." in prefix else ""
        if base in lists and event in ("string", "number", "null") and prefix != base:
            meta[prefix.rsplit(".", 1)[-1]] = value
        elif prefix in lists and event == "end_map":
            chats.append(Chat(int(meta.get("id", 0)), meta.get("type"), meta.get("name"),
                              prefix.startswith("left_chats")))
            meta = {}
    raw.seek(0)
    index = -1
    item_prefixes = {f"{p}.messages.item" if p else "messages.item" for p in lists}
    events = jsonevents.parse(RepairingReader(raw, on_read=on_read))
    for prefix, event, value in events:
        if prefix in lists and event == "start_map":
            index += 1
            yield chats[index]
        elif prefix in item_prefixes:  # a message's first event (not an object: `to_message` says so)
            yield jsonevents.build(events, event, value)


def iter_export(path: Path, general: bool = False,
                on_read: OnRead = None) -> Iterator[Chat | Message]:
    """Yield each chat, then its messages, in file order.

    Raises `ExportError` on bad input. The fast path raises `UnusualLayout` (possibly after
    yielding) when the file is not shaped as Telegram Desktop writes it; the caller then starts
    over with `general=True`, which reads any key order and gives the authoritative error.
    """
    path = export_file(path)
    header = read_header(path)
    with open_export(path) as raw:
        if not general:
            yield from _normalised(_fast(raw, header.layout, on_read), header, path)
            return
        try:
            yield from _normalised(_general(raw, header.layout, on_read), header, path)
        except ijson.IncompleteJSONError as exc:
            raise ExportError(f"{path} ends early ({_short(exc)}); the export looks truncated") from None
        except ijson.JSONError as exc:
            raise ExportError(f"{path} is not valid JSON ({_short(exc)})") from None
        except (KeyError, ValueError, TypeError, OverflowError) as exc:  # messages are `_normalised`'s
            raise ExportError(f"{path} has a malformed chat ({_short(exc)})") from None


_BROADCAST = frozenset({"private_channel", "public_channel", "private_supergroup", "public_supergroup"})


def _normalised(items: Iterator[Chat | Any], header: Header, path: Path) -> Iterator[Chat | Message]:
    """Bare chat ids and `Message` records; a message that cannot be read is an `ExportError`. In a shifted
    (v1.4.8-v2.7.1) export a channel's own posts come as `chat<id>`: they are `channel<id>`, as newer exports say."""
    chat: Chat | None = None
    for item in items:
        if isinstance(item, Chat):
            chat = _bare(item, header.shifted)
            yield chat
            continue
        try:
            message = to_message(item)
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError, msgspec.ValidationError) as exc:
            mid = item.get("id", "?") if isinstance(item, dict) else getattr(item, "id", "?")
            raise ExportError(f"{path} has a malformed message (chat {chat.id if chat else '?'}, "
                              f"message {mid}: {_short(exc)})") from None
        if header.shifted and chat is not None and chat.type in _BROADCAST and message.sender_id == f"chat{chat.id}":
            message = msgspec.structs.replace(message, sender_id=f"channel{chat.id}")
        yield message
