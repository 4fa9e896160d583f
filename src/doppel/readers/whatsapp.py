"""WhatsApp's "Export chat" (without or with media): one chat, as a `.txt`, or the `.zip` that holds it.

Each message starts a line with its date and time in the phone's locale, then the sender:

    12/31/23, 11:59 PM - Max Orlov: text               Android (12-hour clock; U+202F before PM on newer phones)
    31.12.2023, 23:59 - Max Orlov: text                 Android (24-hour clock, day first)
    [31.12.23, 23:59:59] Max Orlov: text                iOS
    [12/31/23, 11:59:59 PM] Max Orlov: text             iOS (12-hour clock)

Lines without a date continue the message before. Whether the day or the month comes first is decided from the
file's own dates (a first number above 12 is a day; a second one above 12 is a day too); when no date tells,
a 12-hour clock means month first (the US), a 24-hour clock day first. Times are the phone's local time, read
as UTC: gaps between messages are right except across a DST change.

System lines (the encryption notice, "X added Y", a changed subject) have no sender on Android; on iOS they are
the chat's and start with U+200E. Media placeholders (`<Media omitted>`, `image omitted`, `<attached: …>`) are
media without a caption; deleted messages are dropped. There are no user ids: a person is their name, and the
owner is told by the chat's name (from the file name: "WhatsApp Chat with Max Orlov.txt") or given with `--me`.
"""

from __future__ import annotations

import contextlib
import io
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from doppel.errors import ExportError
from doppel.readers.files import name_id, regular_file
from doppel.readers.telegram import Chat, Header, Message

_INVISIBLE = str.maketrans({"\u200e": None, "\u200f": None, "\u202a": None, "\u202c": None, "\ufeff": None,
                            "\u202f": " ", "\u00a0": " "})
_MARKS = re.compile("[" + "".join(map(chr, _INVISIBLE)) + "]")  # a line holding none needs no cleaning
_LINE = re.compile(
    r"^\[?(?P<a>\d{1,4})[./-](?P<b>\d{1,2})[./-](?P<c>\d{2,4}),? (?P<h>\d{1,2})[:.](?P<m>\d{2})(?:[:.](?P<s>\d{2}))?"
    r"(?: ?(?P<ampm>[AaPp]\.? ?[Mm]\.?|ДП|ПП|дп|пп))?\]?(?: -|:)? (?P<rest>.*)$")
_SENDER = re.compile(r"^(?P<name>[^:]{1,80}?): (?P<text>.*)$", re.S)
_MEDIA = re.compile(r"^(<[^<>]{1,40}>|(image|video|audio|sticker|GIF|document) omitted|<attached: [^>]+>|"
                    r".+ \(file attached\))$", re.I)
_DELETED = re.compile(r"^(this message was deleted|you deleted this message|это сообщение удалено|"
                      r"вы удалили это сообщение)\.?$", re.I)
_NAME = re.compile(r"^WhatsApp Chat (?:with|-|с) (?P<name>.+?)(?: \(\d+\))?$", re.I)


def chat_name(path: Path) -> str | None:
    match = _NAME.match(path.stem)
    return match.group("name") if match else None


class _Text:
    """The chat's text, a `.txt` or the `.txt` inside a `.zip`, read as lines as often as needed (never whole)."""

    def __init__(self, path: Path) -> None:
        regular_file(path, "point doppel at the chat's .txt or .zip")
        self.path, self.inner, self.name = path, None, chat_name(path)
        self.position = 0  # bytes of the file read so far (inside a zip: in proportion to the text read)
        self._scale = 1.0
        if path.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(path) as archive:
                    texts = [n for n in archive.namelist() if n.lower().endswith(".txt")]
            except zipfile.BadZipFile as exc:
                raise ExportError(f"{path} is not a readable zip ({exc})") from None
            if not texts:
                raise ExportError(f"{path} holds no chat text (.txt); is it a WhatsApp export?")
            self.inner = min(texts, key=lambda n: (n != "_chat.txt", len(n)))
            with zipfile.ZipFile(path) as archive:
                self._scale = path.stat().st_size / max(1, archive.getinfo(self.inner).file_size)
            self.name = self.name or chat_name(Path(self.inner))

    def lines(self) -> Iterator[tuple[re.Match[str] | None, str, bool]]:
        """(the line's date match, the line without invisible marks, whether its text after "Name: " began with
        U+200E, which iOS puts before system lines and placeholders)."""
        with contextlib.ExitStack() as stack:
            if self.inner is None:
                raw: IO[bytes] = stack.enter_context(self.path.open("rb"))
            else:
                raw = stack.enter_context(stack.enter_context(zipfile.ZipFile(self.path)).open(self.inner))
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)
            try:
                for n, line in enumerate(text):
                    if n % 4096 == 0:
                        self.position = int(raw.tell() * self._scale)
                    line = line.rstrip("\r\n")
                    if line.isascii() or _MARKS.search(line) is None:  # most lines: nothing to clean
                        yield _LINE.match(line), line, False
                    else:
                        clean = line.translate(_INVISIBLE)
                        yield _LINE.match(clean), clean, ": \u200e" in line
            except UnicodeDecodeError as exc:
                raise ExportError(f"{self.path} is not UTF-8 text (byte {exc.start} of a block); is it a WhatsApp "
                                  "export?") from None


def _survey(text: _Text) -> tuple[bool, Counter[str]]:
    """(whether dates are day/month, messages per sender): the dates tell (a first number above 12 is a day, a
    second one above 12 too; a four-digit first number is a year), else the clock does (12-hour: month first)."""
    first_day = second_day = year_first = twelve_hour = False
    senders: Counter[str] = Counter()
    for match, _, _ in text.lines():
        if match is None:
            continue
        a, b, ampm, rest = match.group("a", "b", "ampm", "rest")
        year_first |= len(a) == 4
        first_day |= int(a) > 12
        second_day |= int(b) > 12
        twelve_hour |= ampm is not None
        said = _SENDER.match(rest)
        if said:
            senders[said.group("name")] += 1
    day_first = False if year_first else True if first_day else False if second_day else not twelve_hour
    return day_first, senders


class _Clock:
    """Unix seconds of a date line's match; a day's start is computed once while its messages follow each other."""

    def __init__(self, day_first: bool) -> None:
        self.day_first = day_first
        self.date: tuple[str, str, str] | None = None
        self.day = 0

    def __call__(self, m: re.Match[str]) -> int:
        a, b, c, hour, minute, second, ampm = m.group("a", "b", "c", "h", "m", "s", "ampm")
        if (a, b, c) != self.date:
            self.day, self.date = self._day(a, b, c), (a, b, c)
        day = self.day
        h = int(hour)
        if ampm is not None:
            ampm = ampm.replace(".", "").replace(" ", "").lower()
            if ampm in ("pm", "пп") and h < 12:
                h += 12
            elif ampm in ("am", "дп") and h == 12:
                h = 0
        if h > 23:
            raise ValueError("hour out of range")
        if int(minute) > 59 or (second is not None and int(second) > 59):
            raise ValueError("minute or second out of range")
        return day + h * 3600 + int(minute) * 60 + (int(second) if second else 0)

    def _day(self, a: str, b: str, c: str) -> int:
        if len(a) == 4:
            year, month, day = int(a), int(b), int(c)
        else:
            day, month = (int(a), int(b)) if self.day_first else (int(b), int(a))
            year = int(c) + 2000 if int(c) < 100 else int(c)
        return int(datetime(year, month, day, tzinfo=UTC).timestamp())


def read(path: Path, on_read: Callable[[int], None] | None = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The export's header (one chat, no owner id) and its chat and messages, in order. The text is read twice, a
    line at a time: first for the order of dates and the people, then for the messages."""
    text = _Text(path)
    day_first, senders = _survey(text)
    if not senders:
        raise ExportError(f"{path} has no WhatsApp message lines (like '31/12/2023, 23:59 - Name: text'); is it "
                          "a WhatsApp chat export?")
    kind = "personal_chat" if len(senders) <= 2 else "private_group"
    name = text.name or path.stem
    return Header("single", None), _messages(text, Chat(name_id(name), kind, name), day_first,
                                             path.stat().st_size, on_read)


def _messages(text: _Text, chat: Chat, day_first: bool, size: int, on_read: Callable[[int], None] | None
              ) -> Iterator[Chat | Message]:
    yield chat
    clock = _Clock(day_first)
    pending: list[str] = []
    head: tuple[str | None, int, bool] | None = None  # sender (None: a system line), time, marked by U+200E
    number = 0

    def message() -> Message | None:
        if head is None:
            return None
        sender, ts, marked = head
        body = "\n".join(pending).strip()
        if sender is None:
            return Message(number, ts, "system", None, "", "service", "whatsapp_system")
        if _DELETED.match(body):
            return Message(number, ts, f"name:{sender}", sender, "", "empty")
        if _MEDIA.match(body):
            return Message(number, ts, f"name:{sender}", sender, "", "media", "media")
        if marked:  # iOS: the encryption notice, "X added Y", … under the chat's or a person's name
            return Message(number, ts, "system", None, "", "service", "whatsapp_system")
        return Message(number, ts, f"name:{sender}", sender, body, "text")

    for match, line, marked in text.lines():
        ts = None
        if match is not None:
            try:
                ts = clock(match)
            except ValueError:  # not a date after all: a continuation line that starts with numbers
                ts = None
        if match is None or ts is None:
            pending.append(line)
            continue
        found = message()
        if found is not None:
            yield found
        number += 1
        said = _SENDER.match(match.group("rest"))
        head = (said.group("name"), ts, marked) if said else (None, ts, False)
        pending = [said.group("text") if said else match.group("rest")]
        if on_read is not None and number % 2000 == 0:
            on_read(min(text.position, size))
    found = message()
    if found is not None:
        yield found
    if on_read is not None:
        on_read(size)
