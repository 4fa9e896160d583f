"""Signal Desktop's chats as signal-export (carderne/signal-export, `sigexport`) writes them: a folder per chat.

    [2019-05-29 15:04:00] Me: How is everyone?          chat.md, v2.1 and later (seconds)
    [2019-05-29 15:04] Aya: We're great!                 chat.md v2.0, index.md v1.x ("2019-05-29, 15:04" too)
    {"date": "2019-05-29T15:04:00", "sender": "Aya", "body": "We're great!  ", "quote": "", ...}
                                                         data.json, v2.0 and later (with --json; the default since
                                                         v3.0): one JSON object a line

Read: a chat's `chat.md` (or v1's `index.md`) or `data.json`, the chat's folder (its Markdown: with `--old` only
that holds the merged history), or the export's folder (every chat folder in it). A message is its header line and
the lines up to the next header. The Markdown writes after the text, in this order, a line of reactions
`(- Aya: 👍 -)`, a sticker (`(( 👍 ))`, or a link into `../exported_stickers/`), and each attachment as a link
into `./media/` (`![photo.jpg](./media/photo.jpg)  ` for an image, `[voice.m4a](./media/voice.m4a)  ` else;
`(media not exported)  ` when it was left out); a reply starts with the quoted text as `> ` lines. Those are
removed: the rest is the message (an attachment's caption), and a message with no text left is media (a sticker:
its emoji, as Telegram's). A link the person typed (`[x](https://…)`) stays text: only links into the export's
own folders are attachments. Calls ("Missed voice call", "Incoming video call (accepted, 1m 5s)") and the
sender-less lines of group changes are service messages; "(This message was deleted)" is dropped.

Your messages are written as "Me": that is the owner (there are no ids, so a person is their name; `--same-person
"Me=NAME"` joins you with another export). Times are the computer's local time, read as UTC, as WhatsApp's.
A file is read twice, a line at a time (first for its people, then for the messages): memory stays flat.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from doppel.errors import ExportError
from doppel.readers import text as textfile
from doppel.readers.files import name_id, regular_file
from doppel.readers.records import Chat, Header, Message, OnRead, chat_type

OWNER = "Me"  # the sender signal-export writes on your messages
_SYSTEM = "No-Sender"  # a message without a sender: a group change, a safety-number notice
_HEADER = re.compile(r"^\[(?P<date>\d{4}-\d{2}-\d{2}),? (?P<time>\d{2}:\d{2}(?::\d{2})?)\] (?P<sender>.+?):"
                     r"(?: (?P<text>.*))?$")
_ATTACHMENT = re.compile(r"(?P<image>!?)\[(?P<name>[^\n]*?)\]\((?P<path>\./\S*?|\.\./exported_stickers/\S*?)\) {2}"
                         r"|\((?P<missing>media|attachment) not exported\) {2}")
_REACTIONS = re.compile(r"\n\(- [^\n]*? -\)$")
_STICKER = re.compile(r"\n\(\( (?P<label>[^\n]*) \)\)$")
_CALL = re.compile(r"^(?:Incoming|Outgoing|Missed) (?:(?:voice|video) )?call(?: \([^()\n]*\))?$")
_DELETED = "(This message was deleted)"
CHAT_FILES = ("chat.md", "index.md", "data.json")  # in the order a chat's folder is read
_KINDS = {"jpg": "photo", "jpeg": "photo", "png": "photo", "gif": "photo", "webp": "photo", "heic": "photo",
          "mp4": "video", "mov": "video", "webm": "video", "m4a": "audio", "aac": "audio", "mp3": "audio",
          "ogg": "audio", "opus": "audio"}


def is_markdown(sample: str) -> bool:
    """Whether the start of a text file is signal-export's Markdown rather than a WhatsApp chat whose dates are year
    first (iOS in some locales writes `[2019-05-29 15:04:00] Aya: text` too): a header without seconds (iOS writes
    them, and Android no brackets), or messages that end in the two spaces signal-export puts after every text."""
    lines = sample.splitlines()
    headers = [m for m in map(_HEADER.match, lines) if m is not None]
    if not headers or _HEADER.match(next(line for line in lines if line.strip())) is None:
        return False
    if any(len(m["time"]) == 5 for m in headers):
        return True
    return 2 * sum(line.endswith("  ") for line in lines) >= len(headers)


def chat_file(path: Path) -> Path | None:
    """The chat file in a chat's folder, if it is one."""
    return next((path / name for name in CHAT_FILES if (path / name).is_file()), None)


def is_export(path: Path) -> bool:
    """Whether a folder is a signal-export chat folder, or the export's folder of them."""
    return chat_file(path) is not None or any(chat_file(p) for p in _folders(path))


def is_json(path: Path) -> bool:
    """Whether a `.json` file is signal-export's data.json: its first line one message object."""
    try:
        with path.open("rb") as handle:
            first = handle.readline(1 << 16)
    except OSError:
        return False
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and {"date", "sender", "body"} <= row.keys()


def _folders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The export's header (the owner is "Me") and its chats with their messages, in order."""
    if path.is_dir():
        own = chat_file(path)
        files = [own] if own else [f for f in map(chat_file, _folders(path)) if f is not None]
        if not files:
            raise ExportError(f"{path} holds no Signal chat (a folder with chat.md or data.json, as signal-export "
                              "writes)")
    else:
        regular_file(path, "point doppel at a chat's chat.md or data.json, or the export's folder")
        files = [path]
    chats = [(file, _people(file)) for file in files]
    return Header(f"name:{OWNER}", one_chat=len(files) == 1), _items(chats, on_read)


def _people(file: Path) -> set[str]:
    """The senders of a chat file (the first pass); `ExportError` when it has no message."""
    people: set[str] = set()
    if file.suffix.lower() == ".json":
        for number, row in _rows(file):
            people.add(_field(row, "sender", file, number))
    else:
        for line, _ in textfile.lines(file, "a Signal export"):
            found = _header(line)
            if found is not None:
                people.add(found[0]["sender"])
    if not people:
        raise ExportError(f"{file} has no Signal message lines (like '[2019-05-29 15:04:00] Aya: text'); is it "
                          "signal-export's chat.md?")
    return people - {_SYSTEM}


def _items(chats: list[tuple[Path, set[str]]], on_read: Callable[[int], None] | None) -> Iterator[Chat | Message]:
    done = 0
    for file, people in chats:
        name = (file.parent.name or file.stem) if file.name.lower() in CHAT_FILES else file.stem
        yield Chat(name_id(f"signal:{name}"), chat_type(len(people)), name)
        progress = (lambda n, base=done: on_read(base + n)) if on_read else None
        yield from (_json if file.suffix.lower() == ".json" else _markdown)(file, progress)
        done += file.stat().st_size


def _markdown(file: Path, on_read: Callable[[int], None] | None) -> Iterator[Message]:
    head: tuple[int, str] | None = None
    body: list[str] = []
    length, number = 0, 0
    for line, cut in textfile.lines(file, "a Signal export", on_read):
        found = _header(line)
        if found is None:
            length += len(line) + 1 + (textfile.LINE_CAP if cut else 0)
            if length <= textfile.MESSAGE_CAP:
                body.append(line)
            continue
        if head is not None:
            yield _message(number, *head, body, length)
        number += 1
        match, ts = found
        head = (ts, match["sender"])
        body = [match["text"] or ""]
        length = len(body[0]) + (textfile.LINE_CAP if cut else 0)
    if head is not None:
        yield _message(number, *head, body, length)


def _header(line: str) -> tuple[re.Match[str], int] | None:
    """A message's header line and its time; one whose date is no date ("[2019-13-45 …", a pasted log) is text."""
    match = _HEADER.match(line)
    if match is None:
        return None
    try:
        return match, _time(f"{match['date']}T{match['time']}")
    except ValueError:
        return None


def _message(number: int, ts: int, sender: str, lines: list[str], length: int) -> Message:
    """A Markdown message from its lines (the header's text first)."""
    if length > textfile.MESSAGE_CAP:
        return Message(number, ts, f"name:{sender}", sender, "", "unsupported", "too long")
    if not lines[0].strip() and any(line.startswith(">") for line in lines[1:]):
        lines = _unquoted(lines[1:])
    body = "\n".join(lines)
    if body.strip() == _DELETED:
        return Message(number, ts, f"name:{sender}", sender, "", "empty")
    media, sticker = None, None
    for found in _ATTACHMENT.finditer(body):
        if found["path"] and "exported_stickers/" in found["path"]:
            sticker = found["name"]
        else:
            media = media or ("photo" if found["image"] else _kind(found["name"] or ""))
    body = _ATTACHMENT.sub("", body).rstrip()
    label = _STICKER.search(body)  # written after the reactions
    if label is not None:
        sticker, body = label["label"], body[:label.start()]
    body = _REACTIONS.sub("", body)
    return _record(number, ts, sender, body.strip(), media, sticker)


def _unquoted(lines: list[str]) -> list[str]:
    """A reply's lines without the quoted message before its text: blank lines, `>` lines, blank lines."""
    at = 0
    while at < len(lines) and not lines[at].strip():
        at += 1
    while at < len(lines) and (lines[at] == ">" or lines[at].startswith("> ")):
        at += 1
    return lines[at:] or [""]


def _record(number: int, ts: int, sender: str, text: str, media: str | None, sticker: str | None,
            call: bool = False) -> Message:
    sid = f"name:{sender}"
    if sender == _SYSTEM:
        return Message(number, ts, "system", None, "", "service", "signal_system")
    if call or _CALL.match(text):
        return Message(number, ts, sid, sender, "", "service", "phone_call")
    if text:
        return Message(number, ts, sid, sender, text, "text")
    if sticker and sticker != "sticker":  # "sticker": signal-export's stand-in for a sticker without an emoji
        return Message(number, ts, sid, sender, sticker, "sticker")
    if media or sticker:
        return Message(number, ts, sid, sender, "", "media", media or "sticker")
    return Message(number, ts, sid, sender, "", "empty")


def _kind(name: str) -> str:
    return _KINDS.get(name.rsplit(".", 1)[-1].lower(), "file") if "." in name else "file"


def _time(value: str) -> int:
    return int(datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp())


def _rows(file: Path, on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, (line, cut) in enumerate(textfile.lines(file, "a Signal export", on_read), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line) if not cut else None
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict):
            raise ExportError(f"{file}, line {number}: not a message of signal-export's data.json (one JSON object "
                              'a line, {"date": …, "sender": …, "body": …}); is the file truncated?')
        yield number, row


def _field(row: dict[str, Any], key: str, file: Path, number: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ExportError(f"{file}, line {number}: {key!r} is not text in this message of signal-export's data.json")
    return value


def _json(file: Path, on_read: Callable[[int], None] | None) -> Iterator[Message]:
    for number, row in _rows(file, on_read):
        sender, body = _field(row, "sender", file, number), row.get("body") or ""
        try:
            ts = _time(_field(row, "date", file, number))
        except ValueError:
            raise ExportError(f"{file}, line {number}: {row['date']!r} is not a date") from None
        if not isinstance(body, str):
            raise ExportError(f"{file}, line {number}: 'body' is not text in this message of signal-export's "
                              "data.json")
        if len(body) > textfile.MESSAGE_CAP:
            yield Message(number, ts, f"name:{sender}", sender, "", "unsupported", "too long")
            continue
        if row.get("deleted") is True:
            yield Message(number, ts, f"name:{sender}", sender, "", "empty")
            continue
        sticker = row.get("sticker")
        if isinstance(sticker, dict):  # v3.9 and later: the sticker's record
            sticker = sticker.get("emoji") or "sticker"
        listed = row.get("attachments")
        attachments = [a for a in listed if isinstance(a, dict)] if isinstance(listed, list) else []
        media = None
        if attachments:
            first = attachments[0]
            media = "file" if first.get("missing_kind") else _kind(str(first.get("name") or first.get("path") or ""))
        yield _record(number, ts, sender, body.strip(), media, sticker if isinstance(sticker, str) else None,
                      row.get("call") is True)
