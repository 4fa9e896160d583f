"""Telegram Desktop JSON exports (both layouts: a full export, one chat's) → `Chat` and `Message` records.

Facts about the format (field shapes, quirks, owner rules) are in docs/telegram-format.md. `read` is the reader's
entry point: the fast streaming pass of readers/telegram_scan.py, and where the file surprises it, the general pass
reading on from the item where the fast one stopped. Memory stays constant in the file size. Ids (users as
`user123`, the shifted ids of old exports) follow readers/telegram_ids.py.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import ijson
import msgspec
from msgspec import UNSET

from doppel.errors import ExportError
from doppel.readers import jsonevents, telegram_scan
from doppel.readers.files import regular_file, unix_time
from doppel.readers.records import Chat, Header, Message, OnRead
from doppel.readers.repair import RepairingReader
from doppel.readers.telegram_ids import chat_id, peer_id, speaker
from doppel.readers.telegram_scan import RawMessage, UnusualLayout

__all__ = ["Chat", "ExportError", "Header", "Message", "RawMessage", "UnusualLayout", "chat_id", "export_file",
           "iter_export", "open_export", "peer_id", "read", "read_header", "to_message"]
_SENSITIVE = frozenset({"phone", "email", "bank_card"})
_MEDIA_KEYS = (
    "photo", "file", "contact_information", "location_information", "poll", "todo_list",
    "game_title", "invoice_information", "giveaway_information", "paid_stars_amount", "place_name",
)




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
    if path.is_dir():
        if not (path / "result.json").exists():
            html = (path / "export_results.html").exists() or (path / "messages.html").exists()
            raise ExportError(f"{path} is an HTML export; re-export with 'Machine-readable JSON'" if html
                              else f"{path} has no result.json; point doppel at a Telegram JSON export")
        path = path / "result.json"
    regular_file(path, "point doppel at the export's result.json")
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
    """Whether the file is one chat's export, and the owner (a full export's), from the keys before the first chat."""
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
        return Header(one_chat=True, shifted=_shifted_ids(path))
    if keys & {"chats", "left_chats", "personal_information", "about"}:
        return Header(_owner_id(path, me.get("user_id")), _owner_name(me), shifted=_shifted_ids(path))
    if {"info.json", "msgsCount"} & keys:
        raise ExportError(f"{path} looks like an exteraGram export; use Telegram Desktop's JSON export")
    raise ExportError(f"{path} is not a Telegram Desktop export (no 'messages' or 'chats' key)")


def _owner_id(path: Path, raw: Any) -> str | None:
    if raw is None:
        return None
    try:
        return speaker(int(raw))  # always the plain id, even above 2^32
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


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The reader's entry point (readers/records.py): the export's header, and its chats with their messages.

    The fast pass reads the file as Telegram Desktop writes it. Where the file surprises it (`UnusualLayout`), the
    general pass, which reads any key order and gives the authoritative error, reads the file again and gives what
    comes after the items the fast pass gave: the caller sees one stream and never starts over.
    """
    path = export_file(path)
    header = read_header(path)
    return header, _fast_then_general(path, header, on_read)


def _fast_then_general(path: Path, header: Header, on_read: OnRead) -> Iterator[Chat | Message]:
    chats: list[Chat] = []  # the chats the fast pass gave: the general pass must give them again
    try:
        yield from _items(path, header, False, on_read, chats)
        return
    except UnusualLayout as exc:
        done = exc.done
    again = _items(path, header, True, on_read)
    given = [item for item in itertools.islice(again, done) if isinstance(item, Chat)]
    if given != chats:  # a file the two passes read differently (never one Telegram Desktop wrote)
        raise ExportError(f"{path} is not shaped as Telegram Desktop writes it, and its chats read differently "
                          "when read again; is it a Telegram Desktop JSON export?")
    yield from again


def iter_export(path: Path, general: bool = False, on_read: OnRead = None) -> Iterator[Chat | Message]:
    """Yield each chat, then its messages, in file order: one pass (`read` runs both).

    Raises `ExportError` on bad input. The fast path raises `UnusualLayout` (possibly after
    yielding) when the file is not shaped as Telegram Desktop writes it; `general=True` reads any key order
    and gives the authoritative error.
    """
    path = export_file(path)
    yield from _items(path, read_header(path), general, on_read)


def _items(path: Path, header: Header, general: bool, on_read: OnRead,
           chats: list[Chat] | None = None) -> Iterator[Chat | Message]:
    with open_export(path) as raw:
        if not general:
            yield from _normalised(telegram_scan.fast(raw, header.one_chat, on_read), header, path, chats)
            return
        try:
            yield from _normalised(telegram_scan.general(raw, header.one_chat, on_read), header, path)
        except ijson.IncompleteJSONError as exc:
            raise ExportError(f"{path} ends early ({_short(exc)}); the export looks truncated") from None
        except ijson.JSONError as exc:
            raise ExportError(f"{path} is not valid JSON ({_short(exc)})") from None
        except (KeyError, ValueError, TypeError, OverflowError) as exc:  # messages are `_normalised`'s
            raise ExportError(f"{path} has a malformed chat ({_short(exc)})") from None


_BROADCAST = frozenset({"private_channel", "public_channel", "private_supergroup", "public_supergroup"})


def _normalised(items: Iterator[Chat | Any], header: Header, path: Path,
                chats: list[Chat] | None = None) -> Iterator[Chat | Message]:
    """Bare chat ids and `Message` records; a message that cannot be read is an `ExportError`. In a shifted
    (v1.4.8-v2.7.1) export a channel's own posts come as `chat<id>`: they are `channel<id>`, as newer exports say.
    The chats are appended to `chats`, and an `UnusualLayout` of `items` is told how many items were given."""
    chat: Chat | None = None
    done = 0
    try:
        for done, item in enumerate(items, 1):  # noqa: B007 (`done` is read when the loop is cut short)
            if isinstance(item, Chat):
                chat = _bare(item, header.shifted)
                if chats is not None:
                    chats.append(chat)
                yield chat
                continue
            try:
                message = to_message(item)
            except (KeyError, ValueError, TypeError, AttributeError, OverflowError, msgspec.ValidationError) as exc:
                mid = item.get("id", "?") if isinstance(item, dict) else getattr(item, "id", "?")
                raise ExportError(f"{path} has a malformed message (chat {chat.id if chat else '?'}, "
                                  f"message {mid}: {_short(exc)})") from None
            if header.shifted and chat is not None and chat.type in _BROADCAST \
                    and message.sender_id == f"chat{chat.id}":
                message = msgspec.structs.replace(message, sender_id=f"channel{chat.id}")
            yield message
    except UnusualLayout as exc:
        exc.done = done  # each item taken was given
        raise
