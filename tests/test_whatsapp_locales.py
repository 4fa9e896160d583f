"""WhatsApp exports as phones in other languages write them (issue 28): placeholders and notices in every locale are
never kept as text, a real message that begins with U+200E is kept, header layouts of more locales are read, the
order of day and month comes from the file's own evidence (and stats.json says which), and the owner is told by a
file name in the phone's language. The fixtures are this project's own lines, in the layouts the apps write."""

import json
import os
import zipfile
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from doppel.cli import main
from doppel.readers import whatsapp
from doppel.readers.records import Chat, Message

LRM = "\u200e"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def ts(*when: int) -> int:
    return int(datetime(*when, tzinfo=UTC).timestamp())


def read(path):
    """(chat type, [(time, sender, text, kind, media)]) of what `whatsapp.read` gives."""
    items = list(whatsapp.read(path)[1])
    chat = next(i for i in items if isinstance(i, Chat))
    return chat.type, [(m.ts, m.sender_name, m.text, m.kind, m.media) for m in items if isinstance(m, Message)]


def write(tmp_path, text, name="WhatsApp Chat with Max Orlov.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def prepared(path, tmp_path, *args):
    result = run("prepare", path, "-o", tmp_path / "data", "--no-memory", *args)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "data" / "stats.json").read_text())


# --- 1. placeholders and notices are not text ----------------------------------------------------------------------

MEDIA = ("media", "media")


@pytest.mark.parametrize(("body", "expected"), [
    (f"Some file.txt {LRM}document omitted", MEDIA),  # iOS, English
    (f"Vertrag.pdf • 3 Seiten {LRM}Dokument weggelassen", MEDIA),  # German
    (f"facture.pdf {LRM}document manquant", MEDIA),  # French
    (f"отчёт.pdf {LRM}документ отсутствует", MEDIA),  # Russian
    (f"{LRM}Bild weggelassen", MEDIA), (f"{LRM}imagen omitida", MEDIA), (f"{LRM}immagine omessa", MEDIA),
    (f"{LRM}afbeelding weggelaten", MEDIA), (f"{LRM}изображение отсутствует", MEDIA), (f"{LRM}sticker omitted", MEDIA),
    (f"Some file.txt {LRM}<attached: 00000046-Some file.txt>", MEDIA),
    (f"{LRM}<adjunto: 00000012-AUDIO-2023-12-30-22-00-00.opus>", MEDIA),  # longer than 40 characters
    (f"IMG_0042.jpg <{LRM}attached>", MEDIA), ("< attached: 00000012-PHOTO-2023-12-30-22-00-00.jpg >", MEDIA),
    ("IMG-20231230-WA0001.jpg (Datei angehängt)", MEDIA), ("IMG-20231230-WA0001.jpg (fichier joint)", MEDIA),
    ("IMG-20231230-WA0001.jpg (archivo adjunto)", MEDIA), ("IMG-20231230-WA0001.jpg (ファイル添付)", MEDIA),
    ("null", MEDIA),  # Android: view-once media
    ("Данное сообщение удалено", ("empty", None)), ("Tato zpráva byla odstraněna.", ("empty", None)),
    ("This message has been deleted", ("empty", None)),
    ("Waiting for this message. This may take a while.", ("empty", None)),
    ("location: https://maps.google.com/?q=52.520008,13.404954", ("media", "location")),
    ("Standort: https://maps.google.com/?q=52.520008,13.404954", ("media", "location")),
    ("live location shared", ("media", "location")), ("https://maps.app.goo.gl/x7Yq2Lm", ("media", "location")),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_placeholder_in_any_locale_is_not_text(tmp_path, body, expected):
    path = write(tmp_path, f"[30.12.23, 21:59:01] Max Orlov: yo\n[30.12.23, 22:00:00] Lena Volkova: {body}\n")
    assert read(path)[1][1] == (ts(2023, 12, 30, 22), "Lena Volkova", "", *expected)


@pytest.mark.parametrize("call", ["Missed voice call", "Zmeškaný hovor", "Пропущенный аудиозвонок",
                                  f"{LRM}Missed video call, {LRM}Tap to call back"])
def test_a_missed_call_is_a_service_message(tmp_path, call):
    path = write(tmp_path, f"30.12.2023, 21:59 - Max Orlov: yo\n30.12.2023, 22:00 - Lena Volkova: {call}\n")
    assert read(path)[1][1] == (ts(2023, 12, 30, 22), None, "", "service", "call")


@pytest.mark.parametrize("placeholder", ["IMG-20231230-WA0001.jpg (file attached)", "<Media omitted>",
                                         f"{LRM}<attached: 00000012-PHOTO-2023-12-30-22-00-00.jpg>"])
def test_a_caption_is_kept_without_its_placeholder(tmp_path, placeholder):
    path = write(tmp_path, f"30.12.2023, 21:59 - Max Orlov: yo\n30.12.2023, 22:00 - Lena Volkova: {placeholder}\n"
                           "look at this view\nfrom the top\n")
    assert read(path)[1][1] == (ts(2023, 12, 30, 22), "Lena Volkova", "look at this view\nfrom the top", "text", None)


def test_an_edited_message_keeps_its_text_without_the_marker(tmp_path):
    path = write(tmp_path, "30.12.2023, 21:59 - Max Orlov: yo\n"
                           "30.12.2023, 22:00 - Lena Volkova: see you at 8 <This message was edited>\n")
    assert read(path)[1][1] == (ts(2023, 12, 30, 22), "Lena Volkova", "see you at 8", "text", None)


def test_the_notice_under_a_groups_name_is_nobodys(tmp_path):
    text = ("[30.12.23, 21:58:10] Crew: Messages and calls are end-to-end encrypted. No one outside of this chat, not "
            "even WhatsApp, can read or listen to them.\n"
            f"[30.12.23, 21:58:11] Crew: {LRM}Max Orlov created group “Crew”\n"
            "[30.12.23, 21:59:01] Max Orlov: yo\n[30.12.23, 22:00:00] Lena Volkova: hi!\n"
            "[30.12.23, 22:01:00] Ann Lee: hey all\n")
    kind, got = read(write(tmp_path, text, "WhatsApp Chat with Crew.txt"))
    assert kind == "private_group"
    assert got[:2] == [(ts(2023, 12, 30, 21, 58, 10), None, "", "service", "whatsapp_system"),
                       (ts(2023, 12, 30, 21, 58, 11), None, "", "service", "whatsapp_system")]
    stats = prepared(write(tmp_path, text, "WhatsApp Chat with Crew.txt"), tmp_path, "--include-groups",
                     "--me", "Lena Volkova")
    assert sorted(s["name"] for s in stats["speakers"]) == ["Ann Lee", "Lena Volkova", "Max Orlov"]
    assert stats["dropped"] == {"service": 2}


# --- 2. a real message may begin with U+200E -----------------------------------------------------------------------

def test_a_message_that_begins_with_u200e_is_kept(tmp_path):
    text = (f"[30.12.23, 21:58:10] Max Orlov: {LRM}Messages and calls are end-to-end encrypted. No one outside of "
            "this chat, not even WhatsApp, can read or listen to them.\n"
            f"[30.12.23, 21:59:01] Max Orlov: {LRM}yo, what's up\n"
            f"[30.12.23, 22:00:00] Lena Volkova: {LRM}שלום! all good\n"
            f"[30.12.23, 22:00:30] Max Orlov: {LRM}Your security code with Lena Volkova changed. Tap to learn more.\n"
            f"[30.12.23, 22:01:00] Lena Volkova: {LRM}<attached: 00000012-PHOTO-2023-12-30-22-01-00.jpg>\n"
            "the view from here\n")
    kind, got = read(write(tmp_path, text))
    assert kind == "personal_chat"
    assert got == [(ts(2023, 12, 30, 21, 58, 10), None, "", "service", "whatsapp_system"),
                   (ts(2023, 12, 30, 21, 59, 1), "Max Orlov", "yo, what's up", "text", None),
                   (ts(2023, 12, 30, 22), "Lena Volkova", "שלום! all good", "text", None),
                   (ts(2023, 12, 30, 22, 0, 30), None, "", "service", "whatsapp_system"),
                   (ts(2023, 12, 30, 22, 1), "Lena Volkova", "the view from here", "text", None)]


# --- 3. header layouts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("first", "second", "times"), [
    # Arabic, Arabic-Indic digits, U+200F after the day and the month, the Arabic comma, "م" (PM) and "ص" (AM)
    ("[١٨\u200f/٣\u200f/٢٠٢٢، ٢:٥٦:٠٠ م]", "[١٩\u200f/٣\u200f/٢٠٢٢، ٩:٠٥:٠٠ ص]",
     (ts(2022, 3, 18, 14, 56), ts(2022, 3, 19, 9, 5))),
    ("[18/3/2022، 2:56:00 م]", "[19/3/2022، 9:05:00 ص]", (ts(2022, 3, 18, 14, 56), ts(2022, 3, 19, 9, 5))),
    ("13.6.2018 klo 21.25.15 -", "14.6.2018 klo 8.05.00 -", (ts(2018, 6, 13, 21, 25, 15), ts(2018, 6, 14, 8, 5))),
    ("13. 6. 2018. 21:25:15", "14. 6. 2018. 08:05:00", (ts(2018, 6, 13, 21, 25, 15), ts(2018, 6, 14, 8, 5))),
    ("2022/12/14, 13:34. -", "2022/12/15, 08:05. -", (ts(2022, 12, 14, 13, 34), ts(2022, 12, 15, 8, 5))),
    ("[2023/5/4, 16:13:23]", "[2023/5/14, 08:05:00]", (ts(2023, 5, 4, 16, 13, 23), ts(2023, 5, 14, 8, 5))),
    ("[27/3/2565 BE, 21:41:35]", "[28/3/2565 BE, 08:05:00]", (ts(2022, 3, 27, 21, 41, 35), ts(2022, 3, 28, 8, 5))),
    ("12/03/2024, 9:15 in the morning -", "12/03/2024, 3:05 in the afternoon -",
     (ts(2024, 3, 12, 9, 15), ts(2024, 3, 12, 15, 5))),
    ("13.06.18 21.25.15:", "14.06.18 08.05.00:", (ts(2018, 6, 13, 21, 25, 15), ts(2018, 6, 14, 8, 5))),
    ("[21:41:35, 27/3/22]", "[08:05:00, 28/3/22]", (ts(2022, 3, 27, 21, 41, 35), ts(2022, 3, 28, 8, 5))),
    ("[3/27/R4, 21:41:35]", "[3/28/R4, 8:05:00]", (ts(2022, 3, 27, 21, 41, 35), ts(2022, 3, 28, 8, 5))),
    # the month as a word: the time first, day first, month first, in other languages, in brackets
    ("19:07, 20 Sep 2013 -", "08:05, 21 Sep 2013 -", (ts(2013, 9, 20, 19, 7), ts(2013, 9, 21, 8, 5))),
    ("20 Sep 2013, 19:07 -", "1 Oct 2013, 08:05 -", (ts(2013, 9, 20, 19, 7), ts(2013, 10, 1, 8, 5))),
    ("Mar 5, 2013, 8:29 PM -", "Mar 6, 2013, 9:05 AM -", (ts(2013, 3, 5, 20, 29), ts(2013, 3, 6, 9, 5))),
    ("[20 sept. 2013, 19:07:12]", "[21 sept. 2013, 08:05:00]", (ts(2013, 9, 20, 19, 7, 12), ts(2013, 9, 21, 8, 5))),
    ("20. März 2013, 19:07 -", "2. Mai 2013, 08:05 -", (ts(2013, 3, 20, 19, 7), ts(2013, 5, 2, 8, 5))),
    ("20 мар. 2013, 19:07 -", "21 мая 2013, 08:05 -", (ts(2013, 3, 20, 19, 7), ts(2013, 5, 21, 8, 5))),
    ("20 févr. 2013 19:07 -", "21 août 2013 08:05 -", (ts(2013, 2, 20, 19, 7), ts(2013, 8, 21, 8, 5))),
], ids=["arabic-indic", "arabic-western", "finnish", "croatian", "year-first-dot", "year-first-unpadded",
        "buddhist", "clock-words", "no-comma", "time-first", "japanese-era", "named-time-first", "named-day-first",
        "named-month-first", "named-brackets", "named-german", "named-russian", "named-french"])
def test_more_header_layouts_are_read(tmp_path, first, second, times):
    path = write(tmp_path, f"{first} Max Orlov: yo\n{second} Lena Volkova: hi\nsecond line\n")
    assert read(path) == ("personal_chat", [(times[0], "Max Orlov", "yo", "text", None),
                                            (times[1], "Lena Volkova", "hi\nsecond line", "text", None)])


def written(path, *day):
    """`path`, modified on `day` (the day the export was written, for a file whose lines have no year)."""
    os.utime(path, (ts(*day),) * 2)
    return path


def test_years_not_written_are_counted_back_from_the_exports_date(tmp_path):
    """`18 Mar 12:14 -`: the last message is of the export's year; each time the dates go back (more than a day)
    a year begins; a date a day back (a clock set back) is the same year."""
    path = written(write(tmp_path, "Chat exported by hand\n"
                                   "30 Dec 23:14 - Max Orlov: yo\n2 Jan 08:05 - Lena Volkova: happy new year\n"
                                   "1 Jan 09:05 - Max Orlov: same\n18 Mar 12:14 - Lena Volkova: hi\nsecond line\n"
                                   "17 Feb 10:00 - Max Orlov: a year on\n"), 2025, 5, 3)
    assert read(path)[1] == [(0, None, "", "unsupported", "before the first message line"),
                             (ts(2023, 12, 30, 23, 14), "Max Orlov", "yo", "text", None),
                             (ts(2024, 1, 2, 8, 5), "Lena Volkova", "happy new year", "text", None),
                             (ts(2024, 1, 1, 9, 5), "Max Orlov", "same", "text", None),
                             (ts(2024, 3, 18, 12, 14), "Lena Volkova", "hi\nsecond line", "text", None),
                             (ts(2025, 2, 17, 10), "Max Orlov", "a year on", "text", None)]
    stats = prepared(path, tmp_path)
    assert stats["reading"] == {"WhatsApp Chat with Max Orlov.txt": {
        "dates": "the month is written as a word ('Dec')",
        "years": "not written: 2023 to 2025 assumed, the last message taken to be of 2025, the year the export was "
                 "written (2025-05-03); the dates go back 2 times, each a new year"}}
    # the pasted line, and the three sessions of one message each (days and months apart)
    assert stats["dropped"] == {"unsupported": 1, "single-speaker session": 3}


def test_a_last_day_after_the_exports_day_is_of_the_year_before(tmp_path):
    path = written(write(tmp_path, "Mar 5, 8:29 PM - Max Orlov: yo\nMar 6, 9:05 AM - Lena Volkova: hi\n"), 2025, 3, 1)
    header, items = whatsapp.read(path)
    assert [(m.ts, m.sender_name, m.text) for m in items if isinstance(m, Message)] == [
        (ts(2024, 3, 5, 20, 29), "Max Orlov", "yo"), (ts(2024, 3, 6, 9, 5), "Lena Volkova", "hi")]
    assert header.notes == (("dates", "the month is written as a word ('Mar')"),
                            ("years", "not written: 2024 assumed, the last message taken to be of 2024, the year "
                                      "before the export's (2025-03-01)"))


def test_a_zip_without_years_is_dated_by_its_member(tmp_path):
    path = tmp_path / "WhatsApp Chat with Max Orlov.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("WhatsApp Chat with Max Orlov.txt", (2016, 1, 10, 12, 0, 0)),
                         "30 Dec 23:14 - Max Orlov: yo\n2 Jan 08:05 - Lena Volkova: hi\n")
    written(path, 2026, 7, 1)  # the zip's own time: when it was copied, not when it was written
    assert [m[:3] for m in read(path)[1]] == [(ts(2015, 12, 30, 23, 14), "Max Orlov", "yo"),
                                              (ts(2016, 1, 2, 8, 5), "Lena Volkova", "hi")]


def test_a_line_that_only_looks_like_a_named_date_is_text(tmp_path):
    path = write(tmp_path, "18 Mar 12:14 - Max Orlov: yo\n31 Feb 12:15 - Max Orlov: not a day\n"
                           "18 Foo 12:16 - Max Orlov: not a month\n18 Mar 12:17 - Lena Volkova: hi\n")
    assert [m[1:3] for m in read(path)[1]] == [
        ("Max Orlov", "yo\n31 Feb 12:15 - Max Orlov: not a day\n18 Foo 12:16 - Max Orlov: not a month"),
        ("Lena Volkova", "hi")]


def test_clock_words_are_not_the_speakers_name(tmp_path):
    path = write(tmp_path, "12/03/2024, 9:15 in the morning - Wolfgang: Guten Morgen\n"
                           "12/03/2024, 12:30 in the afternoon - Lena Volkova: lunch?\n"
                           "12/03/2024, 7:05 in the evening - Wolfgang: dinner\n"
                           "12/03/2024, 11:40 at night - Lena Volkova: night\n"
                           "13/03/2024, 1:10 at night - Wolfgang: still up\n")
    assert read(path)[1] == [(ts(2024, 3, 12, 9, 15), "Wolfgang", "Guten Morgen", "text", None),
                             (ts(2024, 3, 12, 12, 30), "Lena Volkova", "lunch?", "text", None),
                             (ts(2024, 3, 12, 19, 5), "Wolfgang", "dinner", "text", None),
                             (ts(2024, 3, 12, 23, 40), "Lena Volkova", "night", "text", None),
                             (ts(2024, 3, 13, 1, 10), "Wolfgang", "still up", "text", None)]


def test_text_before_the_first_message_line_is_counted(tmp_path):
    path = write(tmp_path, "some header the user pasted\n30.12.2023, 21:59 - Max Orlov: yo\n"
                           "30.12.2023, 22:00 - Lena Volkova: hi\n")
    assert read(path)[1][0] == (0, None, "", "unsupported", "before the first message line")
    assert prepared(path, tmp_path)["dropped"] == {"unsupported": 1}


# --- 4. day and month from the file's evidence ---------------------------------------------------------------------

def test_consecutive_days_tell_the_order(tmp_path):
    """Four days of December 2024 in a 12-hour clock: read month first they would be months apart."""
    text = "".join(f"[0{d}/12/2024, 10:05:23 AM] Max Orlov: day {d}\n[0{d}/12/2024, 10:06:00 AM] Lena Volkova: ok\n"
                   for d in range(1, 5))
    path = write(tmp_path, text)
    assert [m[0] for m in read(path)[1][::2]] == [ts(2024, 12, d, 10, 5, 23) for d in range(1, 5)]
    assert prepared(path, tmp_path)["reading"] == {"WhatsApp Chat with Max Orlov.txt": {
        "dates": "day/month: consecutive dates are 3 days apart in all read this way, 91 read the other way"}}


def test_the_us_order_is_kept_by_the_same_evidence(tmp_path):
    text = "".join(f"[12/0{d}/24, 10:05:23\u202fAM] Max Orlov: day {d}\n"
                   f"[12/0{d}/24, 10:06:00\u202fAM] Lena Volkova: ok\n" for d in range(1, 5))
    path = write(tmp_path, text)
    assert [m[0] for m in read(path)[1][::2]] == [ts(2024, 12, d, 10, 5, 23) for d in range(1, 5)]
    assert prepared(path, tmp_path)["reading"]["WhatsApp Chat with Max Orlov.txt"]["dates"] == (
        "month/day: consecutive dates are 3 days apart in all read this way, 91 read the other way")


@pytest.mark.parametrize("clock", ["p.m.", "p. m."])
def test_a_spanish_clock_reads_day_first(tmp_path, clock):
    path = write(tmp_path, f"[09/10/22 11:37:00 {clock}] Max Orlov: hola\n"
                           f"[09/10/22 11:38:00 {clock}] Lena Volkova: qué tal\n")
    assert [m[0] for m in read(path)[1]] == [ts(2022, 10, 9, 23, 37), ts(2022, 10, 9, 23, 38)]
    assert prepared(path, tmp_path)["reading"]["WhatsApp Chat with Max Orlov.txt"]["dates"] == (
        f"day/month: no date tells, and the clock's {clock!r} is written where the day comes first")


def test_a_day_above_12_still_decides(tmp_path):
    path = write(tmp_path, "30.12.2023, 21:59 - Max Orlov: yo\n30.12.2023, 22:00 - Lena Volkova: hi\n")
    assert prepared(path, tmp_path)["reading"]["WhatsApp Chat with Max Orlov.txt"]["dates"] == (
        "day/month: 2 message lines have a first number above 12")


# --- 6. the owner from a file name in the phone's language ---------------------------------------------------------

@pytest.mark.parametrize("name", [
    "WhatsApp-chat met Max Orlov", "WhatsApp Chat mit Max Orlov", "Чат WhatsApp с Max Orlov",
    "Discussion WhatsApp avec Max Orlov", "Chat de WhatsApp con Max Orlov", "Conversa do WhatsApp com Max Orlov",
    "Chat WhatsApp con Max Orlov", "WhatsApp chat s Max Orlov", "Max Orlov ile WhatsApp Sohbeti",
    "WhatsApp Chat with Max Orlov (2)",
])
def test_the_chats_name_in_other_languages_tells_the_owner(tmp_path, name):
    path = write(tmp_path, "30.12.2023, 21:59 - Max Orlov: yo\n30.12.2023, 22:00 - Lena Volkova: hi\n",
                 name + ".txt")
    assert whatsapp.chat_name(path) == "Max Orlov"
    assert prepared(path, tmp_path)["owner"] == {"id": "name:Lena Volkova", "name": "Lena Volkova"}
