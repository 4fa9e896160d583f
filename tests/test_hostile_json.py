"""JSON exports written to break doppel (issue 26): each is one line and exit code 2, or is read, and memory stays
bounded however deep the nesting."""

import json

import pytest
from click.testing import CliRunner
from conftest import MAX, ME, msg, personal, refused, traced

from doppel.cli import main
from doppel.errors import ExportError
from doppel.readers import discord
from doppel.readers.telegram import UnusualLayout, iter_export

JSONL_HINT = '; each line is {"chat": …, "sender": …, "time": …, "text": …}'
NOT_A_DATE = "is not a time between the years 1 and 9999"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def nested(depth: int, kind: str) -> bytes:
    """`depth` levels of arrays or objects, written by hand: json.dumps cannot nest that deep."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


# --- Discord ------------------------------------------------------------------------------------

def _discord_message(n: int, text: object = "hi", **extra: object) -> dict:
    return {"id": str(n), "type": "Default", "timestamp": f"2024-01-01T00:00:0{n}+00:00", "content": text,
            "author": {"id": str(100 + n % 2), "name": f"p{n % 2}"}, **extra}


def _discord(tmp_path, channel: object, messages: list | None = None):
    path = tmp_path / "dm.json"
    path.write_text(json.dumps({"guild": {"id": "0", "name": "Direct Messages"}, "channel": channel,
                                "messages": messages or [_discord_message(1), _discord_message(2, "yo")]},
                               indent=2), encoding="utf-8")
    return path


@pytest.mark.parametrize(("channel", "shown"), [([1, 2], "[1, 2]"), (5, "5"), ("general", '"general"'),
                                                 (None, "null")])
def test_a_discord_channel_that_is_not_an_object_is_one_line(tmp_path, channel, shown):
    path = _discord(tmp_path, channel)
    refused(path, tmp_path, f"{path} has a channel that is not an object ({shown}); "
                            "is it a DiscordChatExporter JSON export?")


def test_a_discord_time_that_is_no_date_is_one_line(tmp_path):
    late = _discord_message(2, timestamp="9999-12-31T23:59:59-05:00")  # a valid ISO time, in the year 10000 in UTC
    path = _discord(tmp_path, {"id": "5", "type": "DirectTextChat", "name": "p0"}, [_discord_message(1), late])
    refused(path, tmp_path, f"{path} has a malformed message (ValueError: 253402318799.0 {NOT_A_DATE})")


@pytest.mark.parametrize("kind", ["array", "object"])
def test_discord_embeds_nested_50000_deep_are_skipped_in_bounded_memory(tmp_path, kind):
    path = _discord(tmp_path, {"id": "5", "type": "DirectTextChat", "name": "p0"},
                    [_discord_message(1), _discord_message(2, "", embeds="DEEP"), _discord_message(3, "ok")])
    path.write_bytes(path.read_bytes().replace(b'"DEEP"', b"[" + nested(50_000, kind) + b"]"))
    (key, messages), peak = traced(lambda: (discord.first_key(path), list(discord.read(path)[1])[1:]))
    assert key == "guild" and [(m.text, m.kind, m.media) for m in messages] == [
        ("hi", "text", None), ("", "media", "embed"), ("ok", "text", None)]
    assert peak < 16 << 20, peak


def test_discord_content_nested_deep_is_a_malformed_message_in_bounded_memory(tmp_path):
    path = _discord(tmp_path, {"id": "5", "type": "DirectTextChat", "name": "p0"},
                    [_discord_message(1), _discord_message(2, "DEEP")])
    path.write_bytes(path.read_bytes().replace(b'"DEEP"', nested(5_000, "array")))

    def read() -> None:
        with pytest.raises(ExportError) as err:
            list(discord.read(path)[1])
        assert str(err.value) == f"{path} has a malformed message (TypeError: content is a list, not text)"

    assert traced(read)[1] < 16 << 20


# --- Telegram -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["array", "object"])
def test_a_telegram_field_doppel_does_not_read_nested_deep_is_skipped_in_bounded_memory(write, kind):
    path = write(personal(MAX, [msg(1, 0, MAX, "yo"), msg(2, 5, ME, "го", x="DEEP"), msg(3, 9, MAX, "ok")]))
    path.write_bytes(path.read_bytes().replace(b'"DEEP"', nested(5_000, kind)))
    with pytest.raises(UnusualLayout):  # past the batch decoder's depth
        list(iter_export(path))
    # `prepare` reads the first key to tell Discord's JSON from Telegram's
    (key, messages), peak = traced(lambda: (discord.first_key(path), list(iter_export(path, general=True))[1:]))
    assert key == "name" and [m.text for m in messages] == ["yo", "го", "ok"]
    assert peak < 16 << 20, peak


def test_telegram_s_header_nested_deep_is_read_in_bounded_memory(write):
    path = write({"about": "DEEP", "personal_information": {"user_id": ME, "first_name": "Me"},
                  "chats": {"about": "c", "list": [personal(MAX, [msg(1, 0, MAX, "yo")])]}})
    path.write_bytes(path.read_bytes().replace(b'"DEEP"', nested(5_000, "array")))
    for general in (False, True):
        texts, peak = traced(lambda g=general: [m.text for m in list(iter_export(path, general=g))[1:]])
        assert texts == ["yo"] and peak < 16 << 20, peak


@pytest.mark.parametrize(("value", "shown"), [('"99999999999999999999"', "99999999999999999999"),
                                              ('"253402300800"', "253402300800"), ('"-62135596801"', "-62135596801"),
                                              ("253402300800.5", "253402300800.5")])
def test_a_telegram_time_that_is_no_date_is_a_malformed_message(write, tmp_path, value, shown):
    path = write(personal(MAX, [msg(1, 0, MAX, "yo"), msg(2, 5, ME, "го")]))
    path.write_bytes(path.read_bytes().replace(b'"date_unixtime": "1700000005"', b'"date_unixtime": ' + value.encode()))
    refused(path, tmp_path, f"{path} has a malformed message (chat {MAX}, message 2: {shown} {NOT_A_DATE})")


@pytest.mark.parametrize("kind", ["telegram", "discord"])
@pytest.mark.parametrize("number", [b"9" * 5000, b"1e999", b"-1e999"])
def test_a_number_beyond_a_64_bit_integer_or_a_double_is_one_line(write, tmp_path, kind, number):
    # the batch decoder refuses it, and the general reader says what it is (not "the file looks truncated")
    if kind == "telegram":
        path = write(personal(MAX, [msg(1, 0, MAX, "yo"), msg(2, 5, ME, "го")]))
        path.write_bytes(path.read_bytes().replace(b'"1700000005"', number))
    else:
        path = _discord(tmp_path, {"id": "5", "type": "DirectTextChat", "name": "p0"},
                        [_discord_message(1), _discord_message(2, "yo", timestamp="LONG")])
        path.write_bytes(path.read_bytes().replace(b'"LONG"', number))
    refused(path, tmp_path, f"{path} is not valid JSON (a number beyond a 64-bit integer or a double)")


def test_skipped_events_are_those_past_the_depth_and_a_value_is_built_without_them():
    from io import BytesIO

    from doppel.readers import jsonevents

    data = b'{"a": [1, {"b": ' + nested(jsonevents.DEPTH + 5, "array") + b', "c": 2.5}], "d": "x"}'
    events = jsonevents.parse(BytesIO(data))
    assert next(events) == ("", "start_map", None) and next(events) == ("", "map_key", "a")
    prefix, event, value = next(events)
    built = jsonevents.build(events, event, value)
    inner: list = []
    for _ in range(jsonevents.DEPTH - 4):  # b's arrays are levels 4 to DEPTH (the object holding b is level 3)
        inner = [inner]
    assert prefix == "a" and built == [1, {"b": inner, "c": 2.5}]
    assert list(events) == [("", "map_key", "d"), ("d", "string", "x"), ("", "end_map", None)]


# --- JSONL --------------------------------------------------------------------------------------

def _jsonl(tmp_path, *lines: str):
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


LINE = '{"chat": "a", "sender": "b", "time": 1700000000, "text": "x"}'


def test_a_jsonl_line_nested_past_the_decoder_s_depth_is_one_line(tmp_path):
    path = _jsonl(tmp_path, LINE, LINE.replace('"x"}', '"x", "extra": ' + nested(100_000, "array").decode() + "}"))
    refused(path, tmp_path, f"{path}, line 2: not a message (nested too deeply to decode){JSONL_HINT}")


@pytest.mark.parametrize(("time", "shown"), [
    ("1e999", "Infinity"), ("-1e999", "-Infinity"), ("1e300", "1e+300"),
    ("9223372036854775808", "9223372036854775808"), ("253402300800", "253402300800"),
    ('"9999-12-31T23:59:59-05:00"', "253402318799.0")])
def test_a_jsonl_time_that_is_no_date_is_one_line(tmp_path, time, shown):
    path = _jsonl(tmp_path, LINE, LINE.replace("1700000000", time))
    refused(path, tmp_path, f"{path}, line 2: not a message ({shown} {NOT_A_DATE}){JSONL_HINT}")


def test_jsonl_me_on_two_senders_is_refused_naming_both(tmp_path):
    me = LINE.replace('"x"}', '"x", "me": true}')
    path = _jsonl(tmp_path, me, me.replace('"text"', '"n": 1, "text"'), LINE, me.replace('"b"', '"c"'))
    refused(path, tmp_path, f"{path}, line 4: \"me\": true on 'c', and on 'b' (line 1); "
                            "only your own messages say it")


# --- Messenger and Instagram ----------------------------------------------------------------------

def _meta(tmp_path, participants: object = ..., timestamp: str = "1703973541000", extra: str = ""):
    thread = tmp_path / "inbox" / "maxorlov_1"
    thread.mkdir(parents=True, exist_ok=True)
    data: dict = {"title": "Max Orlov", "messages": [
        {"sender_name": "Lena Volkova", "timestamp_ms": 1703973600000, "content": "го))"},
        {"sender_name": "Max Orlov", "timestamp_ms": "TIME", "content": "yo"}]}
    if participants is not ...:
        data["participants"] = participants
    path = thread / "message_1.json"
    path.write_text(json.dumps(data).replace('"TIME"', timestamp + extra), encoding="utf-8")
    return path


def test_a_messenger_file_nested_past_the_decoder_s_depth_is_one_line(tmp_path):
    path = _meta(tmp_path, extra=', "x": ' + nested(100_000, "array").decode())
    refused(path.parent, tmp_path, f"{path} is not readable JSON (nested too deeply to decode)")


@pytest.mark.parametrize(("participants", "shown"), [(5, "5"), ("Max Orlov", '"Max Orlov"'),
                                                     ({"name": "Max Orlov"}, '{"name": "Max Orlov"}')])
def test_messenger_participants_that_are_not_a_list_are_one_line(tmp_path, participants, shown):
    path = _meta(tmp_path, participants)
    refused(path.parent, tmp_path, f"{path} has participants that are not a list ({shown})")


@pytest.mark.parametrize("participants", [None, ...])
def test_messenger_participants_null_or_absent_are_no_one_named(tmp_path, participants):
    path = _meta(tmp_path, participants)
    result = run("prepare", path.parent, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"]["name"] == "Lena Volkova" and stats["sessions"]["train"] == 1


@pytest.mark.parametrize(("timestamp", "shown"), [
    ("Infinity", "Infinity"), ("NaN", "NaN"), ("null", "null"), ('"soon"', '"soon"'), ("true", "true"),
    ("1e300", "1e+300"), ("9223372036854775808000", "9223372036854775808000"), ("-62135596801000", "-62135596801000")])
def test_a_messenger_time_that_is_no_date_is_one_line(tmp_path, timestamp, shown):
    path = _meta(tmp_path, [{"name": "Max Orlov"}, {"name": "Lena Volkova"}], timestamp)
    refused(path.parent, tmp_path, f"{path} has a malformed message (number 1 from the oldest: timestamp_ms {shown} "
                                   "is not a time in milliseconds between the years 1 and 9999)")
