"""Messages on a Mac: its database itself, `~/Library/Messages/chat.db` (iMessage and SMS), every chat in it.

The database is opened read-only (`mode=ro`) and never written. The tables read, and their columns:

    chat               ROWID, guid, chat_identifier (a phone number, an e-mail, chatNNN), display_name, style
    chat_handle_join   chat_id, handle_id: the chat's people besides you
    chat_message_join  chat_id, message_id
    message            ROWID, date, is_from_me, handle_id, text, attributedBody, associated_message_type, item_type,
                       cache_has_attachments, balloon_bundle_id, is_audio_message, date_edited, date_retracted, …
    handle             ROWID, id: the other person's phone number or e-mail

`date` counts from 2001-01-01 UTC, in nanoseconds since macOS 10.13 and in seconds before. Since macOS 13 `text`
is often NULL and the text is only in `attributedBody`: an NSAttributedString archived as a typedstream, in
which the string is the NSString object's `+` field, a length (one byte; 0x81 and two bytes; 0x82 and four, little
endian) and that many bytes of UTF-8. doppel reads just that field, in a few lines, rather than add a
typedstream library (pytypedstream decodes the whole archive into Apple's classes, for one string); the attributes
after it (links, mentions) are left out.

A message: tapbacks (`associated_message_type` 2000–3999: loved, liked, … and their removals) are service
messages, as SMS's "Loved “…”" lines; a sticker put on a message (1000), an attachment (U+FFFC marks where each
one was in the text), a voice message or an app's balloon (Apple Pay, games, Digital Touch) is media, kept only
as the text around it; group changes (`item_type` other than 0) are service messages. An edited message is read
as the database stores it: its last text (its history is only in `message_summary_info`); an unsent one has no
text left and is dropped. Your messages are `imessage:me` ("Me"); everyone else is their handle, a phone number or
an e-mail (names live in Contacts, not here). A chat of more than one other person is a group. Rows are read
a chat at a time from SQLite's cursor: memory stays flat.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from doppel.errors import ExportError
from doppel.readers.files import name_id, regular_file, unix_time
from doppel.readers.records import GROUP, Chat, Header, Message, OnRead, chat_type

OWNER = "imessage:me"
_EPOCH = 978_307_200  # 2001-01-01 in unix seconds
_OPTIONAL = {"attributedBody": "NULL", "associated_message_type": "0", "item_type": "0", "cache_has_attachments": "0",
             "balloon_bundle_id": "NULL", "is_audio_message": "0", "date_edited": "0", "date_retracted": "0",
             "group_title": "NULL", "group_action_type": "0"}
_TABLES = ("chat", "chat_handle_join", "chat_message_join", "message", "handle")
_URL = "com.apple.messages.URLBalloonProvider"  # a link's preview: its text is the link someone sent
_SMS_TAPBACK = re.compile(r"^(?:Loved|Liked|Disliked|Laughed at|Emphasized|Questioned|Reacted \S+ to) “.*”$", re.S)
_GROUP = 43  # chat.style of a group; 45 is a chat with one person


def database(path: Path) -> Path:
    """The chat.db of a path: the file itself, or the Messages folder that holds it."""
    return path / "chat.db" if path.is_dir() else path


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The database's header (the owner is "Me") and its chats with their messages, a chat at a time."""
    path = database(path)
    regular_file(path, "point doppel at ~/Library/Messages/chat.db (or a copy of it)")
    db = _connect(path)
    try:
        chats = _query(db, path, "SELECT c.ROWID, c.guid, c.chat_identifier, c.display_name, c.style, "
                                 "(SELECT COUNT(*) FROM chat_handle_join j WHERE j.chat_id = c.ROWID) "
                                 "FROM chat c ORDER BY c.ROWID").fetchall()
        columns = {row[1] for row in _query(db, path, "PRAGMA table_info(message)")}
    except BaseException:
        db.close()
        raise
    picked = ", ".join(f"m.{name}" if name in columns else default for name, default in _OPTIONAL.items())
    sql = ("SELECT m.ROWID, m.date, m.is_from_me, m.text, h.id, " + picked + " FROM chat_message_join j "
           "JOIN message m ON m.ROWID = j.message_id LEFT JOIN handle h ON h.ROWID = m.handle_id "
           "WHERE j.chat_id = ? ORDER BY m.date, m.ROWID")
    return Header(OWNER, one_chat=len(chats) == 1), _items(db, path, chats, sql, on_read)


def _connect(path: Path) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=1.0)
        tables = {row[0] for row in _query(db, path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise _error(path, exc) from None
    missing = [t for t in _TABLES if t not in tables]
    if missing:
        db.close()
        raise ExportError(f"{path} is not a Messages chat.db (it has no table {missing[0]})")
    return db


def _query(db: sqlite3.Connection, path: Path, sql: str, *args: object) -> sqlite3.Cursor:
    try:
        return db.execute(sql, args)
    except sqlite3.Error as exc:
        raise _error(path, exc) from None


def _error(path: Path, exc: sqlite3.Error) -> ExportError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return ExportError(f"{path} is locked (Messages is writing it); quit Messages, or copy chat.db with its "
                           "chat.db-wal beside it and give doppel the copy")
    if "not a database" in text:
        return ExportError(f"{path} is not a readable SQLite database ({text}); is it the Messages chat.db?")
    if "malformed" in text or "corrupt" in text:
        return ExportError(f"{path} is damaged ({text}); copy chat.db again, with its chat.db-wal beside it")
    return ExportError(f"{path} cannot be read ({text}); on a Mac, give the terminal Full Disk Access, or copy "
                       "chat.db elsewhere")


def _items(db: sqlite3.Connection, path: Path, chats: list[tuple], sql: str,
           on_read: Callable[[int], None] | None) -> Iterator[Chat | Message]:
    try:
        for rowid, guid, identifier, display, style, people in chats:
            name = display or identifier or str(rowid)
            kind = GROUP if style == _GROUP else chat_type(people + 1)  # `people`: besides you
            yield Chat(name_id(f"imessage:{guid or rowid}"), kind, name)
            cursor = _query(db, path, sql, rowid)
            while rows := _fetch(cursor, path):
                for row in rows:
                    yield _message(row, identifier if kind != GROUP else None)
        if on_read is not None:
            on_read(path.stat().st_size)
    finally:
        db.close()


def _fetch(cursor: sqlite3.Cursor, path: Path) -> list[tuple]:
    try:
        return cursor.fetchmany(1024)
    except sqlite3.Error as exc:
        raise _error(path, exc) from None


def _message(row: tuple, peer: str | None) -> Message:
    (mid, date, mine, text, handle, body, associated, item, attachments, balloon, audio, edited, retracted,
     group_title, group_action) = row
    try:
        ts = unix_time(_time(date if isinstance(date, int) else 0))
    except ValueError:
        return Message(mid, 0, "system", None, "", "unsupported", "date out of range")
    text = text if isinstance(text, str) else None  # a damaged row may hold bytes
    who = str(handle) if handle else peer
    sid, name = (OWNER, "Me") if mine else (f"imessage:{who}", who) if who else ("system", None)
    if item or group_title or group_action or sid == "system":
        return Message(mid, ts, "system", None, "", "service", "imessage_system")
    if 2000 <= (associated or 0) < 4000:
        return Message(mid, ts, sid, name, "", "service", "reaction")
    if associated == 1000:
        return Message(mid, ts, sid, name, "", "media", "sticker")
    if not text and isinstance(body, bytes):
        text = attributed_text(body)
    text = (text or "").replace("\ufffc", "").strip()
    if retracted or (edited and not text):
        return Message(mid, ts, sid, name, "", "empty")  # unsent
    if _SMS_TAPBACK.match(text):
        return Message(mid, ts, sid, name, "", "service", "reaction")
    if balloon and balloon != _URL:
        return Message(mid, ts, sid, name, "", "media", "app")
    if text:
        return Message(mid, ts, sid, name, text, "text")
    if attachments or audio:
        return Message(mid, ts, sid, name, "", "media", "voice_message" if audio else "attachment")
    return Message(mid, ts, sid, name, "", "empty")


def _time(date: int) -> int:
    """Unix seconds from Messages' time: nanoseconds since 2001 (macOS 10.13 and later), or seconds before."""
    return _EPOCH + (date // 1_000_000_000 if abs(date) > 100_000_000_000 else date)


def attributed_text(blob: bytes) -> str | None:
    """The string of a typedstream NSAttributedString (`attributedBody`), or None when the blob holds none."""
    at = blob.find(b"NSString")
    if at < 0:
        return None
    at = blob.find(b"\x01+", at + 8)
    if at < 0:
        return None
    at += 2
    if at >= len(blob):
        return None
    size, at = blob[at], at + 1
    if size == 0x81:
        size, at = int.from_bytes(blob[at:at + 2], "little"), at + 2
    elif size == 0x82:
        size, at = int.from_bytes(blob[at:at + 4], "little"), at + 4
    elif size > 0x7F:
        return None
    if at + size > len(blob):
        return None
    return blob[at:at + size].decode("utf-8", "replace")
