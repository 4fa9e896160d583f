"""The two passes over a Telegram Desktop export's bytes, each giving every chat and then its raw messages.

`fast`: chat boundaries are found by scanning the byte stream for chat headers (`_pieces`), each chat's messages
are decoded a batch at a time by msgspec (readers/jsonarray.py), and the bytes around them are checked by ijson as
they come; memory stays constant in the file size. A file shaped otherwise raises `UnusualLayout`. `general`: two
ijson passes that accept any key order, slower; it gives the authoritative error. readers/telegram.py runs them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

import msgspec
from msgspec import UNSET

from doppel.readers import jsonevents
from doppel.readers.jsonarray import JSON_STRING, ArrayItems, Skeleton, Unusual
from doppel.readers.records import Chat, OnRead
from doppel.readers.repair import RepairingReader


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
    """The fast byte scanner met a layout it does not know; read again with the general pass. `done`: the items
    given before it (set by readers/telegram.py)."""

    done = 0


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


def _pieces(raw: BinaryIO, one_chat: bool, on_read: OnRead) -> Iterator[bytes | Chat | str]:
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
            elif match.group(2) == b"{" and not one_chat:
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


def fast(raw: BinaryIO, one_chat: bool, on_read: OnRead) -> Iterator[Chat | RawMessage]:
    """Each chat, then its messages decoded in batches (see jsonarray.py). The bytes outside the message arrays,
    with each array emptied, must make one valid JSON document: a truncated or damaged file is `UnusualLayout`,
    and the general reader gives the error."""
    skeleton = Skeleton()
    array: ArrayItems[RawMessage] | None = None
    try:
        for piece in _pieces(raw, one_chat, on_read):
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

def general(raw: BinaryIO, one_chat: bool, on_read: OnRead) -> Iterator[Chat | dict[str, Any]]:
    """Two ijson passes: chat metadata first, then messages; slower but independent of key order. The events
    are `jsonevents`': memory stays bounded however deep a field nests."""
    lists = ("",) if one_chat else ("chats.list.item", "left_chats.list.item")
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

