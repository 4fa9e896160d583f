"""Signal Desktop's chats as signal-export writes them (chat.md, v1's index.md, data.json), read into sessions."""

import json

import pytest
from test_readers import _sessions, run

from doppel.preparing.pipeline import detect
from doppel.readers import signal

# signal-export v2.1 and later: seconds, every body ending in two spaces (~ here; ^ is one), a blank line after
# each message
CHAT_MD = """[2023-12-30 21:59:01] Max Orlov: yo~

[2023-12-30 21:59:30] Max Orlov: gym later?
the one near the station~

[2023-12-30 22:00:10] Max Orlov: ~![IMG_0001.jpg](./media/IMG_0001.jpg)~

[2023-12-30 22:00:40] Max Orlov: look [here](https://example.com/gym)~

[2023-12-30 22:01:00] Me:^

> gym later?

го))~
(- Max Orlov: 👍 -)

[2023-12-30 22:01:30] Me: the one with the pool  [voice.m4a](./media/voice%20note.m4a)~

[2023-12-30 22:02:00] Me: (This message was deleted)

[2023-12-30 22:03:00] Max Orlov: Missed voice call~

[2023-12-30 22:04:00] Max Orlov:   (media not exported)~

[2023-12-30 22:05:00] Max Orlov: ~
(( 👍 ))

[2023-12-31 11:59:00] Max Orlov: happy new year lol~

[2023-12-31 12:01:00] Me: и тебя))~
""".replace("~", "  ").replace("^", " ")

EXPECTED = [
    {"start": 1703973541, "turns": [
        ("Max Orlov", ["yo", "gym later?\nthe one near the station", "look [here](https://example.com/gym)"]),
        ("Me", ["го))", "the one with the pool"]), ("Max Orlov", ["👍"])]},
    {"start": 1704023940, "turns": [("Max Orlov", ["happy new year lol"]), ("Me", ["и тебя))"])]},
]


def _write(folder, name="Max Orlov", text=CHAT_MD, file="chat.md"):
    path = folder / "signal-chats" / name / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _stats(folder):
    return json.loads((folder / "stats.json").read_text())


@pytest.mark.parametrize("given", ["file", "chat folder", "export folder"])
def test_signal_markdown_keeps_texts_and_captions_and_drops_placeholders(tmp_path, given):
    path = _write(tmp_path)
    path = {"file": path, "chat folder": path.parent, "export folder": path.parent.parent}[given]
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == EXPECTED
    stats = _stats(tmp_path / "data")
    assert stats["owner"] == {"id": "name:Me", "name": "Me"}
    # the photo and the attachment left out of the export, the missed call, the deleted message
    assert stats["dropped"] == {"media": 2, "service": 1, "empty": 1}


def test_signal_v1_index_md_without_seconds_and_its_quote_layout(tmp_path):
    text = ("[2019-05-29 15:04] Me: How is everyone?  \n[2019-05-29 15:10] Aya: We're great!  \n"
            "[2019-05-29 15:11] Me: \n>\n> We're great!\n>\nglad to hear  \n")
    path = _write(tmp_path, "Aya", text, "index.md")
    result = run("prepare", path.parent, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1559142240, "turns": [
        ("Me", ["How is everyone?"]), ("Aya", ["We're great!"]), ("Me", ["glad to hear"])]}]


def _json_line(date, sender, body, **extra):
    row = {"date": date, "sender": sender, "body": body + "  ", "quote": "", "sticker": None, "reactions": [],
           "attachments": [], "deleted": False, "call": False, "missed": False, **extra}
    return json.dumps(row, ensure_ascii=False) + "\n"


def test_signal_data_json_reads_the_same_messages(tmp_path):
    text = "".join([
        _json_line("2023-12-30T21:59:01.123000", "Max Orlov", "yo"),
        _json_line("2023-12-30T21:59:30", "Max Orlov", "gym later?\nthe one near the station"),
        _json_line("2023-12-30T22:00:10", "Max Orlov", "",
                   attachments=[{"name": "IMG_0001.jpg", "path": "media/IMG_0001.jpg", "missing_kind": None}]),
        _json_line("2023-12-30T22:01:00", "Me", "го))", quote="\n\n> gym later?\n\n",
                   reactions=[["Max Orlov", "👍"]]),
        _json_line("2023-12-30T22:01:30", "Me", "the one with the pool",
                   attachments=[{"name": "voice.m4a", "path": "media/voice.m4a"}]),
        _json_line("2023-12-30T22:02:00", "Me", "", deleted=True),
        _json_line("2023-12-30T22:03:00", "Max Orlov", "Missed voice call", call=True, missed=True),
        _json_line("2023-12-30T22:04:00", "Max Orlov", "Incoming call"),  # before v3.8: no "call" field
        _json_line("2023-12-30T22:05:00", "Max Orlov", "",
                   sticker={"id": "1", "packId": "ab", "packKey": "cd", "emoji": "👍", "extension": "webp"}),
        _json_line("2023-12-31T11:59:00", "Max Orlov", "happy new year lol"),
        _json_line("2023-12-31T12:01:00", "Me", "и тебя))"),
    ])
    path = _write(tmp_path, file="data.json", text=text)
    assert detect(path) == "signal"
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [
        {"start": 1703973541, "turns": [("Max Orlov", ["yo", "gym later?\nthe one near the station"]),
                                        ("Me", ["го))", "the one with the pool"]), ("Max Orlov", ["👍"])]},
        EXPECTED[1]]
    assert _stats(tmp_path / "data")["dropped"] == {"service": 2, "media": 1, "empty": 1}


def test_a_signal_group_needs_include_groups_and_sender_less_lines_are_service(tmp_path):
    text = ("[2024-01-05 10:00:00] No-Sender:   \n\n[2024-01-05 10:00:05] Aya: hi all  \n\n"
            "[2024-01-05 10:00:09] Jim: hey  \n\n[2024-01-05 10:00:10] Me: yo  \n")
    path = _write(tmp_path, "Crew", text)
    assert run("prepare", path, "-o", tmp_path / "data").output == (
        "doppel: error: this export is the group 'Crew'; groups are used only with --include-groups\n")
    result = run("prepare", path, "-o", tmp_path / "data", "--include-groups", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1704448805, "turns": [
        ("Aya", ["hi all"]), ("Jim", ["hey"]), ("Me", ["yo"])]}]
    assert _stats(tmp_path / "data")["dropped"] == {"service": 1}


WHATSAPP_IOS_YEAR_FIRST = "[2023-12-30 21:59:01] Max Orlov: yo\n[2023-12-30 22:01:00] Lena Volkova: го))\n"


def test_a_signal_text_file_is_told_from_a_whatsapp_one(tmp_path):
    cases = {"signal.txt": CHAT_MD, "readme-sample.txt": "[2019-05-29, 15:04] Me: How is everyone?\n"
             "[2019-05-29, 15:10] Aya: We're great!\n", "WhatsApp Chat with Max Orlov.txt": WHATSAPP_IOS_YEAR_FIRST,
             "android.txt": "30.12.2023, 21:59 - Max Orlov: yo\n", "chat.md": CHAT_MD}
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert {name: detect(tmp_path / name) for name in cases} == {
        "signal.txt": "signal", "readme-sample.txt": "signal", "WhatsApp Chat with Max Orlov.txt": "whatsapp",
        "android.txt": "whatsapp", "chat.md": "signal"}
    assert detect(_write(tmp_path).parent.parent) == "signal"


@pytest.mark.parametrize(("file", "content", "expected"), [
    ("chat.md", "hello there\n", "chat.md has no Signal message lines (like '[2019-05-29 15:04:00] Aya: text'); is "
                                 "it signal-export's chat.md?"),
    ("chat.md", b"[2023-12-30 21:59:01] Max: \xff\xfe\n", "chat.md is not UTF-8 text (byte 27 of a block); is it a "
                                                          "Signal export?"),
    ("data.json", _json_line("2023-12-30T21:59:01", "Max", "yo") + '{"date": "2023-12-30T2',
     "data.json, line 2: not a message of signal-export's data.json (one JSON object a line, "
     '{"date": …, "sender": …, "body": …}); is the file truncated?'),
    ("data.json", _json_line("yesterday", "Max", "yo"), "data.json, line 1: 'yesterday' is not a date"),
])
def test_bad_signal_input_is_one_line(tmp_path, file, content, expected):
    path = tmp_path / "Max" / file
    path.parent.mkdir()
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    result = run("prepare", path, "-o", tmp_path / "data", "--format", "signal")
    assert result.exit_code == 2 and result.output == f"doppel: error: {path.parent}/{expected}\n"
    assert not (tmp_path / "data").exists()


def test_a_header_line_with_no_date_is_text_of_its_message(tmp_path):
    text = ("[2023-12-30 21:59:01] Max: see the log:\n[2023-13-45 99:00:00] ERROR: boom  \n"
            "[2023-12-30 21:59:05] Me: ok  \n")
    result = run("prepare", _write(tmp_path, "Max", text), "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1703973541, "turns": [
        ("Max", ["see the log:\n[2023-13-45 99:00:00] ERROR: boom"]), ("Me", ["ok"])]}]


def test_a_sticker_exported_by_v3_9_is_its_emoji_and_one_without_is_media(tmp_path):
    text = ("[2024-01-05 10:00:00] Max:   [👍](../exported_stickers/ab12/7.webp)  \n\n"
            "[2024-01-05 10:00:01] Max:   [sticker](../exported_stickers/ab12/8.webp)  \n\n"
            "[2024-01-05 10:00:02] Me: nice  \n")
    result = run("prepare", _write(tmp_path, "Max", text), "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1704448800, "turns": [("Max", ["👍"]), ("Me", ["nice"])]}]
    assert _stats(tmp_path / "data")["dropped"] == {"media": 1}


def test_an_empty_signal_folder_says_so(tmp_path):
    (tmp_path / "out" / "x").mkdir(parents=True)
    result = run("prepare", tmp_path / "out", "-o", tmp_path / "data", "--format", "signal")
    assert result.output == (f"doppel: error: {tmp_path / 'out'} holds no Signal chat (a folder with chat.md or "
                             "data.json, as signal-export writes)\n")


def test_a_long_signal_message_is_dropped_as_unsupported(tmp_path):
    text = CHAT_MD + "[2023-12-31 12:02:00] Max Orlov: " + "x" * (signal.textfile.MESSAGE_CAP + 10) + "  \n"
    result = run("prepare", _write(tmp_path, text=text), "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _stats(tmp_path / "data")["dropped"]["unsupported"] == 1
