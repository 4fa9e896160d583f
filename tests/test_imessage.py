"""The Messages chat.db of a Mac, built here with sqlite3 in the tables and columns macOS writes, read into sessions."""

import json
import sqlite3

import pytest
from test_readers import _sessions, run

from doppel.preparing.pipeline import detect
from doppel.readers import imessage
from doppel.readers.imessage import attributed_text
from doppel.readers.records import Message

SCHEMA = """
CREATE TABLE handle (ROWID INTEGER PRIMARY KEY AUTOINCREMENT UNIQUE, id TEXT NOT NULL, country TEXT,
    service TEXT NOT NULL, uncanonicalized_id TEXT, person_centric_id TEXT);
CREATE TABLE chat (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, style INTEGER, state INTEGER,
    account_id TEXT, properties BLOB, chat_identifier TEXT, service_name TEXT, room_name TEXT, account_login TEXT,
    is_archived INTEGER DEFAULT 0, last_addressed_handle TEXT, display_name TEXT, group_id TEXT);
CREATE TABLE chat_handle_join (chat_id INTEGER REFERENCES chat (ROWID) ON DELETE CASCADE,
    handle_id INTEGER REFERENCES handle (ROWID) ON DELETE CASCADE, UNIQUE(chat_id, handle_id));
CREATE TABLE chat_message_join (chat_id INTEGER REFERENCES chat (ROWID) ON DELETE CASCADE,
    message_id INTEGER REFERENCES message (ROWID) ON DELETE CASCADE, message_date INTEGER DEFAULT 0,
    PRIMARY KEY (chat_id, message_id));
CREATE TABLE message (ROWID INTEGER PRIMARY KEY AUTOINCREMENT, guid TEXT UNIQUE NOT NULL, text TEXT,
    replace INTEGER DEFAULT 0, service_center TEXT, handle_id INTEGER DEFAULT 0, subject TEXT, country TEXT,
    attributedBody BLOB, version INTEGER DEFAULT 0, type INTEGER DEFAULT 0, service TEXT, account TEXT,
    date INTEGER, date_read INTEGER, date_delivered INTEGER, is_from_me INTEGER DEFAULT 0,
    is_empty INTEGER DEFAULT 0, cache_has_attachments INTEGER DEFAULT 0, is_audio_message INTEGER DEFAULT 0,
    item_type INTEGER DEFAULT 0, other_handle INTEGER DEFAULT 0, group_title TEXT,
    group_action_type INTEGER DEFAULT 0, associated_message_guid TEXT DEFAULT NULL,
    balloon_bundle_id TEXT DEFAULT NULL, payload_data BLOB, associated_message_type INTEGER DEFAULT 0,
    message_summary_info BLOB DEFAULT NULL, date_edited INTEGER DEFAULT 0, date_retracted INTEGER DEFAULT 0);
"""
OLD_SCHEMA = SCHEMA.replace(", date_edited INTEGER DEFAULT 0, date_retracted INTEGER DEFAULT 0", "").replace(
    "attributedBody BLOB, ", "")


def typedstream(text: str) -> bytes:
    """An NSAttributedString archived as macOS archives `attributedBody`: the string, then its attributes."""
    data = text.encode()
    size = bytes([len(data)]) if len(data) < 0x80 else b"\x81" + len(data).to_bytes(2, "little")
    return (b"\x04\x0bstreamtyped\x81\xe8\x03\x84\x01@\x84\x84\x84\x12NSAttributedString\x00\x84\x84\x08NSObject\x00"
            b"\x85\x92\x84\x84\x84\x08NSString\x01\x94\x84\x01+" + size + data + b"\x86\x84\x02iI\x01"
            + bytes([min(len(text), 0x7F)]) + b"\x92\x84\x84\x84\x0cNSDictionary\x00\x94\x84\x01i\x01\x92\x84\x96\x96"
            b"\x1d__kIMMessagePartAttributeName\x86\x92\x84\x84\x84\x08NSNumber\x00\x84\x84\x07NSValue\x00\x94\x84"
            b"\x01*\x84\x99\x99\x00\x86\x86\x86")


def apple(unix: int, nanoseconds: bool = True) -> int:
    return (unix - 978_307_200) * (1_000_000_000 if nanoseconds else 1)


LONG = "a long one: " + "very " * 40 + "long"  # over 127 bytes: a length of three bytes in the typedstream
MAX, ANN = "+15551234567", "ann@example.com"

# (seconds after 2023-12-30 21:59:01 UTC, from: None is you, columns)
MESSAGES = [
    (0, MAX, {"text": "yo"}),
    (29, MAX, {"text": None, "attributedBody": typedstream("gym later?\nthe one near the station")}),
    (69, MAX, {"text": "\ufffc", "cache_has_attachments": 1}),
    (79, MAX, {"text": "\ufffc\ufffc", "cache_has_attachments": 1, "associated_message_type": 0}),
    (119, None, {"text": "го))"}),
    (120, None, {"text": "Liked “yo”", "associated_message_type": 2001, "associated_message_guid": "p:0/m1"}),
    (121, MAX, {"text": "Removed a like from “го))”", "associated_message_type": 3001}),
    (125, None, {"text": None, "attributedBody": typedstream("see you at 8"), "date_edited": 1}),
    (130, None, {"text": None, "attributedBody": None, "date_edited": 1}),  # unsent
    (135, MAX, {"text": "Loved “see you at 8”"}),  # a tapback from a phone that sends SMS
    (140, MAX, {"text": None, "associated_message_type": 1000, "cache_has_attachments": 1}),  # a sticker on it
    (145, MAX, {"text": "\ufffcthe gym", "cache_has_attachments": 1}),
    (150, MAX, {"text": "\ufffc", "balloon_bundle_id": "com.apple.PassbookUIService.PeerPaymentMessagesExtension"}),
    (160, MAX, {"text": None, "is_audio_message": 1, "cache_has_attachments": 1}),
    (50399, MAX, {"text": None, "attributedBody": typedstream(LONG)}),
    (50519, None, {"text": "и тебя))"}),
]

EXPECTED = [
    {"start": 1703973541, "turns": [("+15551234567", ["yo", "gym later?\nthe one near the station"]),
                                     ("Me", ["го))", "see you at 8"]), ("+15551234567", ["the gym"])]},
    {"start": 1704023940, "turns": [("+15551234567", [LONG]), ("Me", ["и тебя))"])]},
]


def chat_db(folder, messages=MESSAGES, schema=SCHEMA, nanoseconds=True, group=False):
    """~/Library/Messages/chat.db with one chat (with Max, or a group with Max and Ann)."""
    path = folder / "Messages" / "chat.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(schema)
    db.execute("INSERT INTO handle (ROWID, id, service) VALUES (1, ?, 'iMessage'), (2, ?, 'iMessage')", (MAX, ANN))
    if group:
        db.execute("INSERT INTO chat (ROWID, guid, style, chat_identifier, service_name, display_name) VALUES "
                   "(1, 'iMessage;+;chat123456', 43, 'chat123456', 'iMessage', 'Crew')")
        db.execute("INSERT INTO chat_handle_join VALUES (1, 1), (1, 2)")
    else:
        db.execute("INSERT INTO chat (ROWID, guid, style, chat_identifier, service_name, display_name) VALUES "
                   "(1, ?, 45, ?, 'iMessage', '')", (f"iMessage;-;{MAX}", MAX))
        db.execute("INSERT INTO chat_handle_join VALUES (1, 1)")
    columns = {row[1] for row in db.execute("PRAGMA table_info(message)")}
    for n, (after, sender, values) in enumerate(MESSAGES if messages is None else messages, 1):
        row = {"guid": f"m{n}", "date": apple(1703973541 + after, nanoseconds), "is_from_me": int(sender is None),
               "handle_id": {None: 0, MAX: 1, ANN: 2}[sender], "service": "iMessage", **values}
        row = {k: v for k, v in row.items() if k in columns}
        db.execute(f"INSERT INTO message ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
        db.execute("INSERT INTO chat_message_join VALUES (1, ?, ?)", (n, row["date"]))
    db.commit()
    db.close()
    return path


def test_attributed_body_gives_its_string_of_any_length():
    assert [attributed_text(typedstream(t)) for t in ("Noter test", "𝖍𝖊𝖑𝖑𝖔", LONG)] == ["Noter test", "𝖍𝖊𝖑𝖑𝖔", LONG]
    assert attributed_text(b"\x04\x0bstreamtyped\x81\xe8\x03") is None


@pytest.mark.parametrize("given", ["chat.db", "Messages folder"])
def test_chat_db_keeps_texts_and_drops_tapbacks_attachments_and_unsent(tmp_path, given):
    path = chat_db(tmp_path)
    path = path if given == "chat.db" else path.parent
    assert detect(path) == "imessage"
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == EXPECTED
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"] == {"id": "imessage:me", "name": "Me"}
    # the photo, the two photos, the sticker, Apple Pay, the voice message; the three tapbacks; the unsent message
    assert stats["dropped"] == {"media": 5, "service": 3, "empty": 1}


def test_an_old_chat_db_counts_seconds_and_has_no_attributed_body(tmp_path):
    old = [(after, who, values) for after, who, values in MESSAGES if values.get("text")]
    path = chat_db(tmp_path, old, OLD_SCHEMA, nanoseconds=False)
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [
        {"start": 1703973541, "turns": [("+15551234567", ["yo"]), ("Me", ["го))"]), ("+15551234567", ["the gym"])]}]


def test_a_group_chat_needs_include_groups_and_its_changes_are_service(tmp_path):
    messages = [(0, MAX, {"text": "hi all"}), (5, None, {"text": None, "item_type": 2, "group_title": "Crew"}),
                (10, ANN, {"text": "hey"}), (20, None, {"text": "yo"})]
    path = chat_db(tmp_path, messages, group=True)
    assert run("prepare", path, "-o", tmp_path / "data").output == (
        "doppel: error: this export is the group 'Crew'; groups are used only with --include-groups\n")
    result = run("prepare", path, "-o", tmp_path / "data", "--include-groups", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1703973541, "turns": [
        ("+15551234567", ["hi all"]), ("ann@example.com", ["hey"]), ("Me", ["yo"])]}]
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["dropped"] == {"service": 1}


def test_a_chat_db_that_is_locked_or_no_chat_db_is_one_line(tmp_path):
    path = chat_db(tmp_path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = run("prepare", path, "-o", tmp_path / "data")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 2 and result.output == (
        f"doppel: error: {path} is locked (Messages is writing it); quit Messages, or copy chat.db with its "
        "chat.db-wal beside it and give doppel the copy\n")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE notes (body TEXT)").connection.close()
    garbage = tmp_path / "x" / "chat.db"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a database at all" * 100)
    truncated = tmp_path / "cut" / "chat.db"
    truncated.parent.mkdir()
    truncated.write_bytes(path.read_bytes()[:2000])
    outputs = [run("prepare", p, "-o", tmp_path / "data").output for p in (other, garbage, truncated)]
    assert outputs[:2] == [
        f"doppel: error: {other} is not a Messages chat.db (it has no table chat)\n",
        f"doppel: error: {garbage} is not a readable SQLite database (file is not a database); is it the Messages "
        "chat.db?\n"]
    assert outputs[2] == (f"doppel: error: {truncated} is damaged (database disk image is malformed); copy chat.db "
                          "again, with its chat.db-wal beside it\n")
    assert not (tmp_path / "data").exists()


TAPBACKS = ("Loved", "Liked", "Disliked", "Laughed at", "Emphasized", "Questioned")


def test_every_tapback_and_its_removal_is_a_reaction_not_a_message(tmp_path):
    """`associated_message_type` 2000–2005 (a tapback) and 3000–3005 (its removal): each row is dropped as the
    service message "reaction", whatever its text says; the edited message around them is its last text."""
    rows = [(0, MAX, {"text": "yo"})]
    rows += [(1 + n, None, {"text": f"{word} “yo”", "associated_message_type": 2000 + n})
             for n, word in enumerate(TAPBACKS)]
    rows += [(10 + n, MAX, {"text": f"Removed a {word.lower()} from “yo”", "associated_message_type": 3000 + n})
             for n, word in enumerate(TAPBACKS)]
    rows += [(20, None, {"text": "see you at 9", "attributedBody": typedstream("see you at 9"),
                         "date_edited": apple(1703973600)})]
    items = imessage.read(chat_db(tmp_path, rows))[1]
    got = [(m.ts - 1703973541, m.sender_name, m.text, m.kind, m.media) for m in items if isinstance(m, Message)]
    assert got == [(0, MAX, "yo", "text", None),
                   *[(1 + n, "Me", "", "service", "reaction") for n in range(6)],
                   *[(10 + n, MAX, "", "service", "reaction") for n in range(6)],
                   (20, "Me", "see you at 9", "text", None)]
