from pathlib import Path

import pytest
from conftest import ANN, MAX, ME, T0, dialogue, full_export, msg, personal

from doppel.readers.synthetic import tdesktop_bytes
from doppel.readers.telegram import (
    Chat,
    ExportError,
    Header,
    Message,
    UnusualLayout,
    chat_id,
    iter_export,
    peer_id,
    read,
    read_header,
    to_message,
)
from doppel.readers.telegram_ids import chat_ids, sender_ids, speaker, user_id


def items(path: Path, general: bool = False) -> list:
    return list(iter_export(path, general=general))


def test_full_export_yields_each_chat_then_its_messages(write):
    left = [{"name": "News", "type": "public_channel", "id": 9, "messages": [msg(7, 5, ME, "gm")]}]
    path = write(full_export([personal(MAX, dialogue()), {"type": "saved_messages", "id": ME,
                                                           "messages": []}], left=left))
    got = items(path)
    assert got == [
        Chat(MAX, "personal_chat", "Max"),
        Message(1, T0, f"user{MAX}", "Max Orlov", "yo", "text"),
        Message(2, T0 + 10, f"user{MAX}", "Max Orlov", "gym later?", "text"),
        Message(3, T0 + 30, f"user{ME}", "Me Owner", "го))", "text"),
        Chat(ME, "saved_messages", None),
        Chat(9, "public_channel", "News", left=True),
        Message(7, T0 + 5, f"user{ME}", "Me Owner", "gm", "text"),
    ]
    assert not read_header(path).one_chat and read_header(path).owner_id == f"user{ME}"
    assert items(path, general=True) == got


def test_single_chat_export(write):
    path = write(personal(MAX, dialogue()))
    assert read_header(path).one_chat and read_header(path).owner_id is None
    got = items(path)
    assert got[0] == Chat(MAX, "personal_chat", "Max") and [m.text for m in got[1:]] == [
        "yo", "gym later?", "го))"]
    assert items(path, general=True) == got


def test_entity_list_text_and_sensitive_entities():
    raw = msg(1, 0, MAX, ["call ", {"type": "bold", "text": "me"}, " at ",
                          {"type": "phone", "text": "+44 7700 900123"}, " ",
                          {"type": "email", "text": "a@b.org"}, {"type": "custom_emoji", "text": "🔥",
                                                                 "document_id": "5"}])
    m = to_message(raw)
    assert m.text == "call me at +44 7700 900123 a@b.org🔥"
    assert m.sensitive == (("phone", "+44 7700 900123"), ("email", "a@b.org"))


def test_message_kinds():
    sticker = to_message(msg(1, 0, MAX, "", media_type="sticker", sticker_emoji="👍", file="x"))
    voice = to_message(msg(2, 0, MAX, "", media_type="voice_message", file="x"))
    caption = to_message(msg(3, 0, MAX, "look", photo="p.jpg"))
    forward = to_message(msg(4, 0, MAX, "news", forwarded_from=None))
    dice = to_message(msg(5, 0, MAX, ""))
    burn = to_message(msg(6, 0, MAX, "", photo_file_size=0, self_destruct_period_seconds=10))
    service = to_message({"id": 7, "type": "service", "date": "2024-01-01T00:00:00",
                          "date_unixtime": "5", "actor": "Max", "actor_id": "user201",
                          "action": "phone_call", "text": "", "text_entities": []})
    assert (sticker.kind, sticker.text) == ("sticker", "👍")
    assert (voice.kind, voice.media) == ("media", "voice_message")
    assert (caption.kind, caption.text, caption.media) == ("text", "look", None)
    assert forward.forwarded and forward.kind == "text"
    assert dice.kind == "empty"
    assert (burn.kind, burn.media) == ("media", "photo")
    assert (service.kind, service.media, service.sender_id, service.ts) == (
        "service", "phone_call", "user201", 5)
    assert to_message({"id": 8, "type": "unsupported"}).kind == "unsupported"


def test_old_format_ids_and_dates():
    assert peer_id(4294967296 + 55) == "user55" and peer_id(77) == "user77"
    assert peer_id(8589934592 + 9) == "chat9" and peer_id("channel5") == "channel5"
    assert chat_id(10083966286) == 1494031694
    old = {"id": 1, "type": "message", "date": "2020-01-01T00:00:10", "from": "A", "from_id": 5,
           "text": "x"}
    assert to_message(old).ts == 1577836810 and to_message(old).sender_id == "user5"


def test_invalid_bytes_are_repaired_while_streaming(write):
    path = write(personal(MAX, [msg(1, 0, MAX, "line one\u2028line two\x0bend"),
                                msg(2, 5, MAX, "C:\\x41")]))
    assert b"\\u2028\x80\xa8" in path.read_bytes() and b"\\x0B" in path.read_bytes()
    texts = [m.text for m in items(path)[1:]]
    assert texts == ["line one\u2028line two\x0bend", "C:\\x41"]


def test_header_tricks_inside_strings_do_not_confuse_the_scanner(write):
    tricky = 'x", "type": "personal_chat", "id": 5, "messages": [ "chats": {'
    path = write(full_export([personal(MAX, [msg(1, 0, MAX, tricky), msg(2, 1, ME, "ok")],
                                       name='Max "the" \\ Orlov')]))
    got = items(path)
    assert got[0] == Chat(MAX, "personal_chat", 'Max "the" \\ Orlov')
    assert [m.text for m in got[1:]] == [tricky, "ok"]


def test_unusual_key_order_falls_back_to_the_general_reader(tmp_path):
    chat = {"id": MAX, "messages": [msg(1, 0, MAX, "yo")], "type": "personal_chat", "name": "Max"}
    path = tmp_path / "result.json"
    path.write_bytes(tdesktop_bytes(full_export([chat])))
    with pytest.raises(UnusualLayout):
        items(path)
    assert items(path, general=True) == [Chat(MAX, "personal_chat", "Max"),
                                         Message(1, T0, f"user{MAX}", "Max Orlov", "yo", "text")]


def test_many_chats_across_read_chunks_keep_their_messages(write):
    chats = [personal(1000 + c, [msg(c * 100 + i, c * 1000 + i, 1000 + c, "x" * 3000)
                                 for i in range(60)], name=f"P{c}") for c in range(12)]
    path = write(full_export(chats))
    got = items(path)
    assert got == items(path, general=True)
    owners = {}
    current = None
    for item in got:
        if isinstance(item, Chat):
            current = item.id
        else:
            owners.setdefault(current, set()).add(item.sender_id)
    assert owners == {1000 + c: {f"user{1000 + c}"} for c in range(12)}


@pytest.mark.parametrize(("content", "message"), [
    (b"<!DOCTYPE html><html>", "is an HTML export; re-export with 'Machine-readable JSON'"),
    (b"[1, 2, 3]", "is not a Telegram Desktop JSON export (no JSON object)"),
    (b'{"foo": 1}', "is not a Telegram Desktop export (no 'messages' or 'chats' key)"),
])
def test_bad_inputs(tmp_path, content, message):
    path = tmp_path / "result.json"
    path.write_bytes(content)
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        items(path)


def test_html_export_folder_and_missing_path(tmp_path):
    (tmp_path / "messages.html").write_text("<html>")
    with pytest.raises(ExportError, match="is an HTML export"):
        items(tmp_path)
    with pytest.raises(ExportError, match="no such file or directory"):
        items(tmp_path / "nope.json")


def test_truncated_file(write):
    path = write(full_export([personal(MAX, dialogue())]))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(UnusualLayout):
        items(path)
    with pytest.raises(ExportError, match=r"ends early .*; the export looks truncated"):
        items(path, general=True)


def test_owner_id_above_2_to_the_32_is_not_taken_for_a_shifted_one(write):
    # Telegram's 64-bit user ids (many accounts since 2021) exceed 2^32; personal_information.user_id is
    # always written plain, never shifted
    big = 5_000_000_001
    path = write({"about": "x", "personal_information": {"user_id": big, "first_name": "Me"},
                  "chats": {"about": "c", "list": []}})
    assert read_header(path).owner_id == "user5000000001"


@pytest.mark.parametrize("general", [False, True])
def test_chat_ids_are_unshifted_only_in_exports_with_integer_sender_ids(write, general):
    big = 5_000_000_001  # a modern 64-bit user id, above 2^32: bare since v2.7.2
    modern = write(full_export([personal(big, [msg(1, 0, big, "hi", name="New User")])]), "modern.json")
    assert [i.id for i in items(modern, general=general) if isinstance(i, Chat)] == [big]
    old_message = {"id": 1, "type": "message", "date": "2020-01-01T00:00:10", "from": "A", "from_id": 201,
                   "text": "x"}
    old = write(full_export([{"name": "A", "type": "personal_chat", "id": 4294967296 + 201,
                              "messages": [old_message]}]), "old.json")
    assert [i.id for i in items(old, general=general) if isinstance(i, Chat)] == [201]


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize(("field", "value", "reason"), [
    ("date_unixtime", "abc", "invalid literal for int() with base 10: 'abc'"),
    ("text", 5, "'int' object is not iterable"),
    ("id", None, "int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"),
])
def test_a_malformed_message_is_an_export_error_naming_chat_and_message(write, general, field, value, reason):
    bad = msg(2, 10, MAX, "gym later?")
    bad[field] = value
    path = write(full_export([personal(ME, []), personal(MAX, [msg(1, 0, MAX, "yo"), bad])]))
    with pytest.raises(ExportError) as err:
        items(path, general=general)
    mid = 2 if field != "id" else None
    assert str(err.value) == f"{path} has a malformed message (chat {MAX}, message {mid}: {reason})"


def test_a_message_that_is_not_an_object_is_an_export_error(write):
    path = write(full_export([personal(MAX, [msg(1, 0, MAX, "yo"), "oops"])]))
    with pytest.raises(UnusualLayout):  # the batch decoder is told objects only
        items(path)
    with pytest.raises(ExportError) as err:
        items(path, general=True)
    assert str(err.value) == f"{path} has a malformed message (chat {MAX}, message ?: Expected `object`, got `str`)"


def test_an_export_folder_is_read_as_its_result_json(write, tmp_path):
    path = write(full_export([personal(MAX, dialogue())]))
    assert read_header(tmp_path) == read_header(path) == Header(f"user{ME}", "Me Owner")
    assert items(tmp_path) == items(path)


@pytest.mark.parametrize(("info", "name"), [
    ({"first_name": " Me ", "last_name": "Owner"}, "Me Owner"),
    ({"first_name": "Me"}, "Me"),
    ({"last_name": "Owner", "first_name": None}, "Owner"),
    ({"first_name": "", "last_name": ""}, None),
])
def test_owner_name_from_personal_information(write, info, name):
    path = write({"about": "x", "personal_information": {"user_id": ME, **info}, "chats": {"about": "c", "list": []}})
    assert read_header(path) == Header(f"user{ME}", name)


def test_malformed_owner_id_is_an_export_error(write):
    path = write({"about": "x", "personal_information": {"user_id": "me"}, "chats": {"about": "c", "list": []}})
    with pytest.raises(ExportError) as err:
        read_header(path)
    assert str(err.value) == f"{path} has a malformed personal_information.user_id ('me')"


def test_invalid_utf8_in_a_chat_name_sends_the_fast_reader_to_the_general_one(write):
    path = write(full_export([personal(MAX, dialogue())]))
    path.write_bytes(path.read_bytes().replace(b'"name": "Max"', b'"name": "M\xffx"'))
    with pytest.raises(UnusualLayout):
        items(path)
    with pytest.raises(ExportError, match="invalid bytes in UTF8 string"):
        items(path, general=True)


def test_read_goes_on_with_the_general_pass_where_the_fast_one_stopped(write):
    long = [msg(i, i, MAX, f"{i} " + "x" * 3000) for i in range(1, 401)]  # past a read chunk: batches are given
    odd = {"id": ANN, "messages": [msg(500, 900, ANN, "hey")], "type": "personal_chat", "name": "Ann"}
    path = write(full_export([personal(MAX, long), odd]))
    with pytest.raises(UnusualLayout) as stopped:
        items(path)
    assert 1 < stopped.value.done <= 401
    header, stream = read(path)
    got = list(stream)
    assert header == Header(f"user{ME}", "Me Owner") and got == items(path, general=True)
    assert [m.id for m in got[1:401]] == list(range(1, 401)) and got[401:] == [
        Chat(ANN, "personal_chat", "Ann"), Message(500, T0 + 900, f"user{ANN}", "Ann Lee", "hey", "text")]


def test_a_file_whose_chats_read_differently_the_second_time_is_one_line(write):
    # a chat-shaped object outside the chats list: the fast scanner takes it for a chat, the general pass does not
    export = {"about": "x", "extra": {"list": [{"type": "personal_chat", "id": 5, "messages": []}]},
              **full_export([{"id": MAX, "messages": dialogue(), "type": "personal_chat", "name": "Max"}])}
    path = write(export)
    with pytest.raises(ExportError) as err:
        list(read(path)[1])
    assert str(err.value) == (f"{path} is not shaped as Telegram Desktop writes it, and its chats read differently "
                              "when read again; is it a Telegram Desktop JSON export?")


def test_a_telegram_user_is_a_number_written_one_way():
    assert speaker(700100301) == "user700100301" and user_id("user700100301") == 700100301
    assert [user_id(s) for s in ("name:Max", "channel5", "user", "user12x", "discord12")] == [None] * 5
    assert sender_ids("201", False) == ["201", "user201"] and sender_ids("Max", True) == ["Max"]
    assert sender_ids(str(ME + (1 << 32)), True)[-1] == f"user{ME}"
    assert chat_ids("-5", False) == (-5,) and chat_ids(str(MAX + (1 << 32)), True) == (MAX + (1 << 32), MAX)
    assert chat_ids("Max", True) == ()
