"""WhatsApp exports written to break doppel (issues 26 and 31): a damaged or odd zip is one line and exit code 2,
memory stays bounded however long a message, and a pasted line never re-dates a chat."""

import json
import zipfile
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from conftest import refused, traced

from doppel.cli import main
from doppel.readers import whatsapp
from doppel.readers.files import name_id
from doppel.readers.records import Chat, Message

CHAT = "WhatsApp Chat with Max Orlov.txt"
TEXT = "30.12.2023, 21:59 - Max Orlov: yo\n30.12.2023, 22:01 - Lena Volkova: gym later?\n"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def messages(path):
    """(id, time, sender, text, kind, media) of each message `whatsapp.read` gives."""
    return [(m.id, m.ts, m.sender_name, m.text, m.kind, m.media) for m in whatsapp.read(path)[1]
            if isinstance(m, Message)]


def ts(*when: int) -> int:
    return int(datetime(*when, tzinfo=UTC).timestamp())


def dropped(path, tmp_path):
    """stats.json's dropped counts of a `prepare` of `path`."""
    result = run("prepare", path, "-o", tmp_path / "data", "--no-memory")
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "data" / "stats.json").read_text())["dropped"]


# --- a damaged zip ------------------------------------------------------------------------------

def _zip(tmp_path, compression=zipfile.ZIP_DEFLATED, members=((CHAT, TEXT),)):
    path = tmp_path / "WhatsApp Chat with Max Orlov.zip"
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, text in members:
            archive.writestr(name, text)
    return path


def _patch(path, local: int, central: int, value: bytes) -> None:
    """Write `value` at `local` bytes into the first member's local header and `central` into its directory entry."""
    data = bytearray(path.read_bytes())
    for at in (local, data.index(b"PK\x01\x02") + central):
        data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


def test_a_zip_with_a_bad_crc_is_one_line(tmp_path):
    path = _zip(tmp_path, zipfile.ZIP_STORED)
    path.write_bytes(path.read_bytes().replace(b"gym later", b"gym LATER"))
    refused(path, tmp_path, f"{path} is damaged: {CHAT!r} cannot be read (Bad CRC-32 for file {CHAT!r}); export "
                            "the chat again")


def test_a_zip_with_a_corrupt_deflate_stream_is_one_line(tmp_path):
    path = _zip(tmp_path)
    data = bytearray(path.read_bytes())
    data[30 + len(CHAT)] = 0xFF  # the stream's first block: final, of the reserved type 3
    path.write_bytes(bytes(data))
    refused(path, tmp_path, f"{path} is damaged: {CHAT!r} cannot be read (Error -3 while decompressing data: "
                            "invalid block type); export the chat again")


def test_a_zip_compressed_with_deflate64_is_one_line(tmp_path):
    path = _zip(tmp_path)
    _patch(path, 8, 10, (9).to_bytes(2, "little"))
    refused(path, tmp_path, f"{path}: {CHAT!r} is compressed with Deflate64, which Python's zipfile cannot read; "
                            "extract it with another tool (7-Zip, unzip) and give doppel the .txt")


def test_an_encrypted_zip_member_is_one_line(tmp_path):
    path = _zip(tmp_path)
    _patch(path, 6, 8, (1).to_bytes(2, "little"))  # general purpose flags: bit 0, encrypted
    refused(path, tmp_path, f"{path}: {CHAT!r} is encrypted; extract it with its password and give doppel the .txt")


# --- which member is the chat -------------------------------------------------------------------

def test_a_zip_without_a_txt_is_one_line(tmp_path):
    path = _zip(tmp_path, members=(("photo.jpg", "jpeg"),))
    refused(path, tmp_path, f"{path} holds no chat text (.txt); is it a WhatsApp export?")


def test_the_chat_s_text_is_chosen_by_its_name_over_a_shorter_txt(tmp_path):
    path = _zip(tmp_path, members=(("notes.txt", "31.12.2023, 10:00 - Ann: not the chat\n"), (CHAT, TEXT)))
    assert [m[2:4] for m in messages(path)] == [("Max Orlov", "yo"), ("Lena Volkova", "gym later?")]


@pytest.mark.parametrize(("names", "what"), [
    (("a.txt", "b.txt"),
     "several .txt files, none named like a chat's text (_chat.txt, 'WhatsApp Chat with NAME.txt')"),
    ((CHAT, "x/_chat.txt", "WhatsApp Chat with Ann.txt", "WhatsApp Chat with Bo.txt"), "the texts of several chats"),
])
def test_several_candidate_texts_in_a_zip_are_one_line(tmp_path, names, what):
    path = _zip(tmp_path, members=[(name, TEXT) for name in names])
    shown = ", ".join(repr(n) for n in names[:3]) + (", …" if len(names) > 3 else "")
    refused(path, tmp_path, f"{path} holds {what}: {shown}; extract the chat's .txt and give doppel that")


def test_a_member_named_outside_the_zip_is_read_from_the_zip_alone(tmp_path):
    inside = tmp_path / "a" / "b"
    inside.mkdir(parents=True)
    outside = tmp_path / CHAT  # where extracting "../../" + CHAT next to the zip would put it
    outside.write_text("31.12.2023, 10:00 - Eve: from outside\n31.12.2023, 10:01 - Mallory: yes\n", encoding="utf-8")
    path = _zip(inside, members=((f"../../{CHAT}", TEXT),))
    assert [m[2:4] for m in messages(path)] == [("Max Orlov", "yo"), ("Lena Volkova", "gym later?")]
    result = run("prepare", path, "-o", tmp_path / "data", "--me", "Lena Volkova", "--no-memory")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHAT, "a", "data"]
    assert sorted(p.name for p in inside.iterdir()) == [path.name]


def test_a_zip_whose_directory_is_too_large_is_one_line_before_it_is_read(tmp_path):
    names = [f"{i:03d}" + "x" * 59_997 + ".jpg" for i in range(150)]  # 150 names of 60,004 bytes
    path = _zip(tmp_path, zipfile.ZIP_STORED, members=[(CHAT, TEXT)] + [(n, "") for n in names])
    listed = 46 * 151 + len(CHAT) + 150 * 60_004  # a directory entry is 46 bytes and the name
    refused(path, tmp_path, f"{path} lists too many members ({listed:,} bytes of zip directory, more than "
                            "8,388,608); extract the chat's .txt and give doppel that")


# --- bounded memory: a message over WhatsApp's cap ----------------------------------------------

def test_messages_over_the_cap_are_dropped_and_a_zip_is_read_in_bounded_memory(tmp_path):
    cap = whatsapp.MESSAGE_CAP
    exact = "x" * 100 + "\n" + "y" * (cap - 103) + "\n"  # and "z": 100 + 1 + (cap - 103) + 1 + 1 characters
    lines = ["30.12.2023, 21:59 - Max Orlov: yo\n",
             f"30.12.2023, 22:00 - Lena Volkova: {exact}z\n",  # exactly the cap: kept
             f"30.12.2023, 22:01 - Max Orlov: {'a' * cap}\n",  # the cap on one line: kept
             f"30.12.2023, 22:02 - Lena Volkova: {'b' * (cap + 1)}\n",  # one character over: dropped
             "30.12.2023, 22:03 - Max Orlov: start\n", "and then another line of it\n" * 40_000,  # 1 MB: dropped
             "30.12.2023, 22:04 - Lena Volkova: ok\n",
             "30.12.2023, 22:05 - Max Orlov: " + "c" * (3 << 20)]  # 3 MB and no newline: dropped
    path = _zip(tmp_path, members=((CHAT, "".join(lines)),))
    got, peak = traced(lambda: messages(path))
    day = ts(2023, 12, 30)
    assert got == [(1, day + 21 * 3600 + 59 * 60, "Max Orlov", "yo", "text", None),
                   (2, day + 22 * 3600, "Lena Volkova", exact + "z", "text", None),
                   (3, day + 22 * 3600 + 60, "Max Orlov", "a" * cap, "text", None),
                   (4, day + 22 * 3600 + 120, "Lena Volkova", "", "unsupported", "too long"),
                   (5, day + 22 * 3600 + 180, "Max Orlov", "", "unsupported", "too long"),
                   (6, day + 22 * 3600 + 240, "Lena Volkova", "ok", "text", None),
                   (7, day + 22 * 3600 + 300, "Max Orlov", "", "unsupported", "too long")]
    assert len(exact + "z") == cap
    assert peak < 1 << 20, peak  # the member holds 4 MB: it is streamed, and no message is kept past the cap
    assert dropped(path, tmp_path) == {"unsupported": 3}


# --- the order of dates (issue 31) --------------------------------------------------------------

def _chat(line, n: int = 100, pasted: int = 50, paste: str = ""):
    """`n` messages through March 2024, every 31 a day, alternately Max's and Lena's, each written by `line(day,
    hour, minute, who, text)`; message `pasted` has `paste` on a line of its own. With the messages expected."""
    rows, expected = [], []
    for i in range(n):
        day, hour, minute, who = 1 + i % 31, 10 + i // 31, i % 60, ("Max Orlov", "Lena Volkova")[i % 2]
        text = f"look at this\n{paste}\nweird, right?" if i == pasted else f"message {i}"
        rows.append(line(day, hour, minute, who, text) + "\n")
        expected.append((i + 1, ts(2024, 3, day, hour, minute), who, text, "text", None))
    return "".join(rows), expected


def _day_first(day, hour, minute, who, text):
    return f"{day:02d}/03/2024, {hour:02d}:{minute:02d} - {who}: {text}"


def _month_first(day, hour, minute, who, text):
    twelve = (hour - 1) % 12 + 1
    return f"3/{day}/24, {twelve}:{minute:02d}\u202f{'AM' if hour < 12 else 'PM'} - {who}: {text}"


@pytest.mark.parametrize(("line", "paste"), [
    (_day_first, "2024-03-05 10:00:00 INFO deploy started"),  # a log line in a day-first chat
    (_month_first, "13/03/2024, 10:00 - bot: pasted"),  # a day-first line in a US chat
], ids=["log-line-in-day-first", "day-first-line-in-us"])
def test_a_pasted_date_line_is_text_and_never_re_dates_the_chat(tmp_path, line, paste):
    text, expected = _chat(line, paste=paste)
    path = tmp_path / CHAT
    path.write_text(text, encoding="utf-8")
    assert messages(path) == expected
    assert expected[50][3] == f"look at this\n{paste}\nweird, right?"


def test_dates_that_read_only_one_way_each_are_refused_naming_the_lines(tmp_path):
    text, expected = _chat(_day_first, n=40, pasted=-1)
    path = tmp_path / CHAT
    lines = text.splitlines(keepends=True)
    us = "03/13/2024, 10:00 - Ann: 13 March, US style"
    path.write_text("".join(lines[:39]) + us + "\n", encoding="utf-8")  # one line in 40 is text; Ann is nobody
    assert messages(path) == [*expected[:38], (*expected[38][:3], f"message 38\n{us}", "text", None)]
    assert next(whatsapp.read(path)[1]) == Chat(name_id("Max Orlov"), "personal_chat", "Max Orlov")
    us = "".join(f"03/{13 + i}/2024, 11:{i:02d} - Ann: US {i}\n" for i in range(5))
    path.write_text(text + us, encoding="utf-8")  # 5 in 45 read only month first: more than a tenth
    refused(path, tmp_path, f"{path} has dates that read only day first (line 13) and dates that read only month "
                            "first (line 41): 5 of its 45 message lines would be lost either way; is it one WhatsApp "
                            "chat's export?")


def test_a_four_digit_year_0001_is_not_2001_and_a_date_before_whatsapp_is_dropped(tmp_path):
    path = tmp_path / CHAT
    path.write_text("30/12/2023, 21:59 - Max Orlov: yo\n01/01/0001, 10:00 - Lena Volkova: year one\n"
                    "01/01/2001, 10:00 - Max Orlov: 2001\n30/12/2023, 22:01 - Lena Volkova: gym later?\n"
                    "30/12/2023, 22:02 - Max Orlov: ok\n31/12/2099, 10:00 - Lena Volkova: late\n", encoding="utf-8")
    assert messages(path) == [(1, ts(2023, 12, 30, 21, 59), "Max Orlov", "yo", "text", None),
                              (2, 0, "Lena Volkova", "", "unsupported", "date out of range"),
                              (3, 0, "Max Orlov", "", "unsupported", "date out of range"),
                              (4, ts(2023, 12, 30, 22, 1), "Lena Volkova", "gym later?", "text", None),
                              (5, ts(2023, 12, 30, 22, 2), "Max Orlov", "ok", "text", None),
                              (6, ts(2099, 12, 31, 10), "Lena Volkova", "late", "text", None)]
    assert dropped(path, tmp_path) == {"unsupported": 2, "single-speaker session": 1}
