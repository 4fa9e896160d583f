"""Facebook Messenger and Instagram, from Meta's "Download your information" (JSON).

Each conversation is a folder (`messages/inbox/maxorlov_123/`) of `message_1.json`, `message_2.json`, … —
message_1 the newest, and each file newest first:

    {"participants": [{"name": "Max Orlov"}, {"name": "Lena Volkova"}], "title": "Max Orlov",
     "messages": [{"sender_name": "Max Orlov", "timestamp_ms": 1700000000000, "content": "yo",
                   "reactions": [...], "share": {...}, "photos": [...]}, ...]}

Meta writes text as mojibake: each byte of the UTF-8 text escaped as a character of its own ("Ð¿Ñ\\u0080Ð¸" for
"при"). It is repaired where the string is exactly that (its characters all below 256 and, read as bytes, valid
UTF-8); any other string is already right and stays as it is. What Meta writes where nobody wrote a text ("Max
sent an attachment.", "Reacted ❤ to your message", poll, call and group notices: readers/notices.py) is media or a
service message, as are older exports' `Call`, `Subscribe` and `Unsubscribe` messages; a shared location (a maps
link and nothing else) is media. Give doppel a conversation's folder or one of its files, or a folder that holds
many conversations (the `inbox`, or the whole export): all are read. A person is their name. One conversation: the
other participant is its title, which tells who you are; many: you are the one in every personal conversation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from doppel.errors import ExportError
from doppel.readers.files import name_id, regular_file, shown, unix_time
from doppel.readers.notices import is_location, meta_notice, subjects
from doppel.readers.records import Chat, Header, Message, OnRead, chat_type

_FILE = re.compile(r"^message_(\d+)\.json$")
_MEDIA = ("photos", "videos", "audio_files", "gifs", "files", "sticker")
_SERVICE = frozenset({"Call", "Subscribe", "Unsubscribe"})  # older exports' `type`: calls, joins, leaves


def is_meta(path: Path) -> bool:
    """A `message_N.json`, or a folder that holds some (at any depth)."""
    if path.is_file():
        return bool(_FILE.match(path.name))
    return path.is_dir() and next(path.rglob("message_1.json"), None) is not None


def repair(text: str) -> str:
    """Meta's mojibake undone; text that is not mojibake comes back unchanged."""
    if not text or text.isascii():
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _threads(path: Path) -> list[list[Path]]:
    """The conversations: each a list of its message files, oldest (highest number) first."""
    folders = [path.parent] if path.is_file() else sorted({p.parent for p in path.rglob("message_*.json")
                                                           if _FILE.match(p.name)})
    threads = []
    for folder in folders:
        files = [p for p in folder.iterdir() if _FILE.match(p.name)]
        threads.append(sorted(files, key=lambda p: -int(_FILE.match(p.name).group(1))))  # type: ignore[union-attr]
    return [t for t in threads if t]


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise ExportError(f"{path} is not readable JSON (nested too deeply to decode)") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not readable JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise ExportError(f"{path} is not a Messenger or Instagram conversation (no messages list)")
    if not isinstance(data.get("participants") or [], list):
        raise ExportError(f"{path} has participants that are not a list ({shown(data['participants'])})")
    return data


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    if not path.is_dir():
        regular_file(path, "point doppel at a conversation's folder or one of its message_N.json")
    threads = _threads(path)
    if not threads:
        raise ExportError(f"{path} holds no message_N.json; point doppel at a conversation's folder or the inbox")
    return Header(one_chat=len(threads) == 1), _items(threads, on_read)


def _items(threads: list[list[Path]], on_read: OnRead) -> Iterator[Chat | Message]:
    done = 0
    for files in threads:
        first = _load(files[-1])  # message_1: the newest, with the conversation's title and participants
        people = [repair(str(p.get("name", ""))) for p in first.get("participants") or [] if isinstance(p, dict)]
        title = repair(str(first.get("title") or ", ".join(people) or files[0].parent.name))
        kind = chat_type(len(people))
        yield Chat(name_id(str(first.get("thread_path") or files[0].parent)), kind, title)
        about = subjects(people)
        number = 0
        for file in files:
            data = first if file == files[-1] else _load(file)
            for item in reversed(data["messages"]):  # each file is newest first
                number += 1
                yield _message(item, number, file, about)
            done += file.stat().st_size
            if on_read is not None:
                on_read(done)


def _message(item: Any, number: int, file: Path, about: frozenset[str]) -> Message:
    if not isinstance(item, dict) or "timestamp_ms" not in item:
        raise ExportError(f"{file} has a malformed message (number {number} from the oldest: no timestamp_ms)")
    name = repair(str(item.get("sender_name") or "")) or None
    sender = f"name:{name}" if name else "unknown"
    raw = item["timestamp_ms"]
    try:
        ts = unix_time(int(raw) if isinstance(raw, str) else raw, 1000)
    except ValueError:
        raise ExportError(f"{file} has a malformed message (number {number} from the oldest: timestamp_ms "
                          f"{shown(raw)} is not a time in milliseconds between the years 1 and 9999)") from None
    if item.get("is_unsent"):
        return Message(number, ts, sender, name, "", "empty")
    kind = item.get("type")
    if (isinstance(kind, str) and kind in _SERVICE) or "call_duration" in item:
        return Message(number, ts, sender, name, "", "service", "call" if "call_duration" in item else "group")
    text = repair(str(item.get("content") or ""))
    notice = meta_notice(text, about, name) if text else None
    if notice is not None:  # "Max sent an attachment.", "Reacted ❤ to your message": never what someone wrote
        return Message(number, ts, sender, name, "", *notice)
    if is_location(text):
        return Message(number, ts, sender, name, "", "media", "location")
    if text.strip():
        return Message(number, ts, sender, name, text, "text")
    media = next((k for k in _MEDIA if item.get(k)), "share" if item.get("share") else None)
    return Message(number, ts, sender, name, "", "media" if media else "empty", media)
