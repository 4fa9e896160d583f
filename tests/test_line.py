"""LINE's chat history .txt, in English and Japanese and both clocks, read into the same sessions."""

import json

import pytest
from conftest import refused
from test_readers import ANDROID_US, _sessions, run

from doppel.preparing.pipeline import detect

ENGLISH = """[LINE] Chat history with Max Orlov
Saved on: 2023/12/31 12:10

2023/12/30(Sat)
21:59\tMax Orlov\tyo
21:59\tMax Orlov\t"gym later?
the one near the station"
22:00\tMax Orlov\t[Photo]
22:00\tMax Orlov\t[Sticker]
22:01\tLena Volkova\tго))
22:02\tLena Volkova\t☎ Missed call
22:03\tLena Volkova\tLena Volkova unsent a message.
22:04\tMax Orlov\t"say ""hi""
to Ann"

2023/12/31(Sun)
11:59\tMax Orlov\thappy new year lol
12:01\tLena Volkova\tи тебя))
12:05\tMax Orlov\t☎ Call time 0:35
"""

JAPANESE = """[LINE] Max Orlovとのトーク履歴
保存日時：2023/12/31 12:10

2023/12/30(土)
午後9:59\tMax Orlov\tyo
午後9:59\tMax Orlov\t"gym later?
the one near the station"
午後10:00\tMax Orlov\t[写真]
午後10:00\tMax Orlov\t[スタンプ]
午後10:01\tLena Volkova\tго))
午後10:02\tLena Volkova\t☎ 不在着信
午後10:03\tLena Volkova\tメッセージの送信を取り消しました
午後10:04\tMax Orlov\t"say ""hi""
to Ann"

2023/12/31(日)
午前11:59\tMax Orlov\thappy new year lol
午後12:01\tLena Volkova\tи тебя))
午後12:05\tMax Orlov\t☎ 通話時間 0:35
"""

# the English phone of later versions: weekday first, a 12-hour clock after the time
WEEKDAY_FIRST = """[LINE] Chat history with Max Orlov
Saved on: 12/31/2023, 12:10 PM

Sat, 12/30/2023
09:59 PM\tMax Orlov\tyo
09:59 PM\tMax Orlov\t"gym later?
the one near the station"
10:00 PM\tMax Orlov\t[Photo]
10:00 PM\tMax Orlov\t[Sticker]
10:01 PM\tLena Volkova\tго))
10:02 PM\tLena Volkova\t☎ Missed call
10:03 PM\tLena Volkova\tYou unsent a message.
10:04 PM\tMax Orlov\t"say ""hi""
to Ann"

Sun, 12/31/2023
11:59 AM\tMax Orlov\thappy new year lol
12:01 PM\tLena Volkova\tи тебя))
12:05 PM\tMax Orlov\t☎ Call time 0:35
"""

EXPECTED = [
    {"start": 1703973540, "turns": [("Max Orlov", ["yo", "gym later?\nthe one near the station"]),
                                     ("Lena Volkova", ["го))"]), ("Max Orlov", ['say "hi"\nto Ann'])]},
    {"start": 1704023940, "turns": [("Max Orlov", ["happy new year lol"]), ("Lena Volkova", ["и тебя))"])]},
]


@pytest.mark.parametrize("text", [ENGLISH, JAPANESE, WEEKDAY_FIRST], ids=["english", "japanese", "weekday-first"])
def test_line_histories_give_the_same_sessions_without_placeholders(tmp_path, text):
    path = tmp_path / "[LINE] Chat with Max Orlov.txt"
    path.write_text(text, encoding="utf-8")
    assert detect(path) == "line"
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == EXPECTED
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"] == {"id": "name:Lena Volkova", "name": "Lena Volkova"}  # the title names Max
    # the photo and the sticker; the two calls; the unsent message
    assert stats["dropped"] == {"media": 2, "service": 2, "empty": 1}


def test_a_day_first_weekday_date_is_read_day_first(tmp_path):
    text = ("[LINE] Chat history with Max Orlov\n\nTue, 05/03/2024\n21:05\tMax Orlov\thi\n21:06\tLena Volkova\they\n"
            "Wed, 06/03/2024\n09:00\tMax Orlov\tmorning\n09:01\tLena Volkova\tmorning!\n")
    path = tmp_path / "chat.txt"
    path.write_text(text, encoding="utf-8")
    assert run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0").exit_code == 0
    # 5 March 2024, a Tuesday (5 May was a Sunday), 21:05 UTC; then 6 March, 09:00
    assert [s["start"] for s in _sessions(tmp_path / "data")] == [1709672700, 1709715600]


def test_a_line_group_needs_include_groups_and_its_notices_are_service(tmp_path):
    text = ("[LINE] Chat history in Crew\n\n2024/03/05(Tue)\n21:00\tAnn joined the group.\n21:05\tMax\thi all\n"
            "21:06\tAnn\that\n21:07\tLena\tyo\n")
    path = tmp_path / "[LINE] Chat in Crew.txt"
    path.write_text(text, encoding="utf-8")
    assert run("prepare", path, "-o", tmp_path / "data").output == (
        "doppel: error: this export is the group 'Crew'; groups are used only with --include-groups\n")
    result = run("prepare", path, "-o", tmp_path / "data", "--include-groups", "--me", "Lena", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1709672700, "turns": [
        ("Max", ["hi all"]), ("Ann", ["hat"]), ("Lena", ["yo"])]}]
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["dropped"] == {"service": 1}


def test_a_line_file_is_told_from_a_whatsapp_one(tmp_path):
    (tmp_path / "a.txt").write_text(ENGLISH, encoding="utf-8")
    (tmp_path / "b.txt").write_text(ENGLISH.split("\n", 2)[2], encoding="utf-8")  # without its title
    (tmp_path / "WhatsApp Chat with Max Orlov.txt").write_text(ANDROID_US, encoding="utf-8")
    assert [detect(tmp_path / n) for n in ("a.txt", "b.txt", "WhatsApp Chat with Max Orlov.txt")] == [
        "line", "line", "whatsapp"]


@pytest.mark.parametrize(("content", "expected"), [
    ("[LINE] Chat history with Max\nSaved on: 2024/03/06 10:00\n", " has no LINE message lines (like "
     "'2024/03/05(Tue)', then '21:05<TAB>Name<TAB>text'); is it a LINE chat history?"),
    ("[LINE] Chat history with Max\n21:05\tMax\thi\n", ", line 2: a message before any date line; is it a LINE chat "
     "history?"),
    (b"[LINE] Chat history with Max\n2024/03/05(Tue)\n21:05\tMax\t\xff\n", " is not UTF-8 text (byte 55 of a block); "
     "is it a LINE chat history?"),
])
def test_bad_line_input_is_one_line(tmp_path, content, expected):
    path = tmp_path / "[LINE] Chat with Max.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    refused(path, tmp_path, f"{path}{expected}")
