"""WhatsApp's "Export chat" (without or with media): one chat, as a `.txt`, or the `.zip` that holds it.

Each message starts a line with its date and time in the phone's locale, then the sender:

    12/31/23, 11:59 PM - Max Orlov: text               Android (12-hour clock; U+202F before PM on newer phones)
    31.12.2023, 23:59 - Max Orlov: text                 Android (24-hour clock, day first)
    [31.12.23, 23:59:59] Max Orlov: text                iOS
    [12/31/23, 11:59:59 PM] Max Orlov: text             iOS (12-hour clock)

Lines without a date continue the message before. The file's layout is the shape of its first message line
(brackets, separators, year first or last and its digits, seconds, clock): every message line of one export has
it, so a pasted line of another shape ("2024-03-05 10:00:00 INFO …" in a day-first chat) is text of the message it
is in. Whether the day or the month comes first is decided from the layout's lines alone: a first number above 12
reads only day first, a second one only month first, and the order that reads more of them is taken; the lines it
cannot read are text, and when they are more than a tenth of the layout's lines, the file is refused, naming a
line of each kind. When no date tells, a 12-hour clock means month first (the US), a 24-hour clock day first. A
two-digit year is 20YY, a four-digit one as written; a message dated before 2009 (WhatsApp's first year; it does
not run on a phone whose clock is wrong) or after 2099 is dropped, as "unsupported". Times are the phone's local
time, read as UTC: gaps between messages are right except across a DST change.

A message longer than 65,536 characters (WhatsApp's own limit) is dropped, as "unsupported". Memory stays bounded
whatever the file holds: a line is read 65,536 characters (and a header) at most and the rest of a longer one
skipped, a message's lines are kept only while within the limit, and a zip's text is inflated as it is read.

System lines (the encryption notice, "X added Y", a changed subject) have no sender on Android; on iOS they are
the chat's and start with U+200E. Media placeholders (`<Media omitted>`, `image omitted`, `<attached: …>`) are
media without a caption; deleted messages are dropped. There are no user ids: a person is their name, and the
owner is told by the chat's name (from the file name: "WhatsApp Chat with Max Orlov.txt") or given with `--me`.

In a zip the chat's text is `_chat.txt` (iOS) or "WhatsApp Chat with NAME.txt" (Android), else its only `.txt`;
several candidates, an encrypted member, a compression Python's zipfile cannot inflate (Deflate64), damaged data
or a central directory of more than 8 MiB (some 100,000 members) are one line. Members are read from the zip by
name, never extracted, so a member named `../x.txt` is only a name.
"""

from __future__ import annotations

import contextlib
import functools
import io
import lzma
import re
import zipfile
import zlib
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
    r"^(?P<open>\[?)(?P<a>\d{1,4})(?P<sep>[./-])(?P<b>\d{1,2})(?P=sep)(?P<c>\d{2,4})(?P<comma>,?) (?P<h>\d{1,2})[:.]"
    r"(?P<m>\d{2})(?:[:.](?P<s>\d{2}))?(?: ?(?P<ampm>[AaPp]\.? ?[Mm]\.?|ДП|ПП|дп|пп))?(?P<close>\]?(?: -|:)?) "
    r"(?P<rest>.*)$")
_SENDER = re.compile(r"^(?P<name>[^:]{1,80}?): (?P<text>.*)$", re.S)
_MEDIA = re.compile(r"^(<[^<>]{1,40}>|(image|video|audio|sticker|GIF|document) omitted|<attached: [^>]+>|"
                    r".+ \(file attached\))$", re.I)
_DELETED = re.compile(r"^(this message was deleted|you deleted this message|это сообщение удалено|"
                      r"вы удалили это сообщение)\.?$", re.I)
_NAME = re.compile(r"^WhatsApp Chat (?:with|-|с) (?P<name>.+?)(?: \(\d+\))?$", re.I)
MESSAGE_CAP = 65_536  # characters of one message, WhatsApp's own limit; a longer message is dropped
# a line is read this far at most: a header (date, time, a name of at most 80 characters) is shorter than 256,
# so a line cut here holds a message over the cap, which is dropped whatever the rest of the line says
_LINE_CAP = MESSAGE_CAP + 256
_YEARS = range(2009, 2100)
_MIXED = 0.1  # the share of message lines an order of dates may leave unread before the file is refused
_DIRECTORY = 8 << 20  # bytes of a zip's central directory, which zipfile holds in memory (~550 bytes a member)
_DAMAGED = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError)  # what reading a zip member raises


def chat_name(path: Path) -> str | None:
    match = _NAME.match(path.stem)
    return match.group("name") if match else None


def _directory_size(path: Path) -> int:
    """The size of a zip's central directory by its end record, found as zipfile finds it (0 without one: zipfile
    then says what is wrong); read before zipfile, which reads the whole directory into memory."""
    with path.open("rb") as handle:
        end = handle.seek(0, io.SEEK_END)
        handle.seek(max(0, end - 22 - 65_535))
        tail = handle.read()
    at = len(tail) - 22
    # a record without a comment ends the file; one with a comment is the last signature
    if not (at >= 0 and tail[at:at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return 0
    size = int.from_bytes(tail[at + 12:at + 16], "little")
    # zip64: the sizes are in a record right before its locator, right before the end record
    if at >= 76 and tail[at - 20:at - 16] == b"PK\x06\x07" and tail[at - 76:at - 72] == b"PK\x06\x06":
        size = int.from_bytes(tail[at - 36:at - 28], "little")
    return size


def _chat_member(path: Path) -> zipfile.ZipInfo:
    """The member of a zip that holds the chat's text; `ExportError` for anything doppel cannot read from it."""
    listed = _directory_size(path)
    if listed > _DIRECTORY:
        raise ExportError(f"{path} lists too many members ({listed:,} bytes of zip directory, more than "
                          f"{_DIRECTORY:,}); extract the chat's .txt and give doppel that")
    try:
        with zipfile.ZipFile(path) as archive:
            texts = [i for i in archive.infolist() if i.filename.lower().endswith(".txt")]
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:  # ValueError: a name that is not its UTF-8
        raise ExportError(f"{path} is not a readable zip ({exc})") from None
    if not texts:
        raise ExportError(f"{path} holds no chat text (.txt); is it a WhatsApp export?")
    base = [i.filename.rsplit("/", 1)[-1] for i in texts]
    chats = [i for i, name in zip(texts, base, strict=True) if name == "_chat.txt" or _NAME.match(name[:-4])]
    if len(chats) == 1 or (not chats and len(texts) == 1):
        info = (chats or texts)[0]
    else:
        shown = ", ".join(repr(i.filename) for i in (chats or texts)[:3]) + (", …" if len(chats or texts) > 3 else "")
        what = "the texts of several chats" if chats else "several .txt files, none named like a chat's text " \
            "(_chat.txt, 'WhatsApp Chat with NAME.txt')"
        raise ExportError(f"{path} holds {what}: {shown}; extract the chat's .txt and give doppel that")
    if info.flag_bits & 0x1:
        raise ExportError(f"{path}: {info.filename!r} is encrypted; extract it with its password and give doppel the "
                          ".txt")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        method = "Deflate64" if info.compress_type == 9 else f"compression method {info.compress_type}"
        raise ExportError(f"{path}: {info.filename!r} is compressed with {method}, which Python's zipfile cannot "
                          "read; extract it with another tool (7-Zip, unzip) and give doppel the .txt")
    return info


class _Text:
    """The chat's text, a `.txt` or the `.txt` inside a `.zip`, read as lines as often as needed (never whole)."""

    def __init__(self, path: Path) -> None:
        regular_file(path, "point doppel at the chat's .txt or .zip")
        self.path, self.inner, self.name = path, None, chat_name(path)
        self.position = 0  # bytes of the file read so far (inside a zip: in proportion to the text read)
        self._scale = 1.0
        if path.suffix.lower() == ".zip":
            info = _chat_member(path)
            self.inner = info.filename
            self._scale = path.stat().st_size / max(1, info.file_size)
            self.name = self.name or chat_name(Path(self.inner))

    def lines(self) -> Iterator[tuple[str, bool]]:
        """(the line without invisible marks, whether its text after "Name: " began with U+200E, which iOS puts
        before system lines and placeholders). A line is read `_LINE_CAP` characters at most; the rest of a longer
        one is read past and left out."""
        with contextlib.ExitStack() as stack:
            if self.inner is None:
                raw: IO[bytes] = stack.enter_context(self.path.open("rb"))
            else:
                archive = stack.enter_context(zipfile.ZipFile(self.path))
                try:
                    raw = stack.enter_context(archive.open(self.inner))
                except (*_DAMAGED, RuntimeError, NotImplementedError) as exc:
                    raise ExportError(f"{self.path}: {self.inner!r} cannot be read ({exc})") from None
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)
            read = functools.partial(text.readline, _LINE_CAP)
            try:
                for n, line in enumerate(iter(read, "")):
                    if n % 4096 == 0:
                        self.position = int(raw.tell() * self._scale)
                    if len(line) == _LINE_CAP and line[-1] != "\n":
                        for rest in iter(read, ""):
                            if rest[-1] == "\n":
                                break
                    line = line.rstrip("\r\n")
                    if line.isascii() or _MARKS.search(line) is None:  # most lines: nothing to clean
                        yield line, False
                    else:
                        yield line.translate(_INVISIBLE), ": \u200e" in line
            except UnicodeDecodeError as exc:
                raise ExportError(f"{self.path} is not UTF-8 text (byte {exc.start} of a block); is it a WhatsApp "
                                  "export?") from None
            except _DAMAGED as exc:
                raise ExportError(f"{self.path} is damaged: {self.inner!r} cannot be read ({exc}); export the "
                                  "chat again") from None


def _layout(m: re.Match[str]) -> re.Pattern[str]:
    """The pattern of a file's message lines, from the first: the same brackets, separators, year first or last and
    its digits, seconds or none, clock and separator after the time; only the numbers vary."""
    opening, a, sep, c, comma, s, ampm, close = m.group("open", "a", "sep", "c", "comma", "s", "ampm", "close")
    sep = re.escape(sep)
    return re.compile(
        rf"^{re.escape(opening)}(?P<a>\d{{{'4' if len(a) == 4 else '1,3'}}}){sep}(?P<b>\d{{1,2}}){sep}"
        rf"(?P<c>\d{{{len(c)}}}){comma} (?P<h>\d{{1,2}})[:.](?P<m>\d{{2}})"
        + (r"[:.](?P<s>\d{2})" if s else "(?P<s>)")
        + (r" ?(?P<ampm>[AaPp]\.? ?[Mm]\.?|ДП|ПП|дп|пп)" if ampm else "(?P<ampm>)")
        + rf"{re.escape(close)} (?P<rest>.*)$")


def _survey(text: _Text) -> tuple[re.Pattern[str] | None, bool, Counter[str]]:
    """(the pattern of message lines, whether dates are day/month, messages per sender), from the message lines
    alone; see the module's docstring for the rule, and `ExportError` when no order reads nine tenths of them."""
    pattern = _LINE  # until the first message line tells the layout
    year_first = twelve_hour = False
    lines = days = months = day_at = month_at = 0  # message lines; those only day / month first reads; the first
    either: Counter[str] = Counter()  # messages per sender, of the lines that either order reads
    only: tuple[Counter[str], Counter[str]] = Counter(), Counter()  # of those only month first, only day first reads
    for n, (line, _) in enumerate(text.lines(), 1):
        match = pattern.match(line)
        if match is None:
            continue
        if pattern is _LINE:
            pattern, year_first, twelve_hour = _layout(match), len(match["a"]) == 4, match["ampm"] is not None
        day, month = int(match["a"]) > 12, int(match["b"]) > 12
        if day and month:  # a date neither way (13/13): text, like 31 February
            continue
        lines += 1
        senders = only[1] if day else only[0] if month else either
        if day:
            days, day_at = days + 1, day_at or n
        elif month:
            months, month_at = months + 1, month_at or n
        said = _SENDER.match(match["rest"])
        if said:
            senders[said.group("name")] += 1
    if pattern is _LINE:
        return None, False, either
    if year_first:  # year, month, day
        return pattern, False, either + only[1]
    day_first = days > months if days != months else not twelve_hour
    if min(days, months) > _MIXED * lines:
        raise ExportError(f"{text.path} has dates that read only day first (line {day_at}) and dates that read only "
                          f"month first (line {month_at}): {min(days, months):,} of its {lines:,} message lines would "
                          "be lost either way; is it one WhatsApp chat's export?")
    return pattern, day_first, either + only[day_first]


class _Clock:
    """Unix seconds of a date line's match; a day's start is computed once while its messages follow each other."""

    def __init__(self, day_first: bool) -> None:
        self.day_first = day_first
        self.date: tuple[str, str, str] | None = None
        self.day: int | None = 0

    def __call__(self, m: re.Match[str]) -> int | None:
        """The time, None for a date out of `_YEARS`; ValueError when it is no date at all."""
        a, b, c, hour, minute, second, ampm = m.group("a", "b", "c", "h", "m", "s", "ampm")
        if (a, b, c) != self.date:
            self.day, self.date = self._day(a, b, c), (a, b, c)
        h = int(hour)
        if ampm:  # "" in a layout without a clock's AM/PM
            ampm = ampm.replace(".", "").replace(" ", "").lower()
            if ampm in ("pm", "пп") and h < 12:
                h += 12
            elif ampm in ("am", "дп") and h == 12:
                h = 0
        if h > 23:
            raise ValueError("hour out of range")
        if int(minute) > 59 or (second and int(second) > 59):
            raise ValueError("minute or second out of range")
        if self.day is None:
            return None
        return self.day + h * 3600 + int(minute) * 60 + (int(second) if second else 0)

    def _day(self, a: str, b: str, c: str) -> int | None:
        if len(a) == 4:
            year, month, day = int(a), int(b), int(c)
        else:
            day, month = (int(a), int(b)) if self.day_first else (int(b), int(a))
            year = int(c) + 2000 if len(c) == 2 else int(c)  # "0001" is the year 1, not 2001
        if year not in _YEARS:
            datetime(2000, month, day)  # ValueError for a day of no year (2000 has a 29 February)
            return None
        return int(datetime(year, month, day, tzinfo=UTC).timestamp())


def read(path: Path, on_read: Callable[[int], None] | None = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The export's header (one chat, no owner id) and its chat and messages, in order. The text is read twice, a
    line at a time: first for the layout, the order of dates and the people, then for the messages."""
    text = _Text(path)
    pattern, day_first, senders = _survey(text)
    if pattern is None or not senders:
        raise ExportError(f"{path} has no WhatsApp message lines (like '31/12/2023, 23:59 - Name: text'); is it "
                          "a WhatsApp chat export?")
    kind = "personal_chat" if len(senders) <= 2 else "private_group"
    name = text.name or path.stem
    return Header("single", None), _messages(text, Chat(name_id(name), kind, name), pattern, day_first,
                                             path.stat().st_size, on_read)


def _messages(text: _Text, chat: Chat, pattern: re.Pattern[str], day_first: bool, size: int,
              on_read: Callable[[int], None] | None) -> Iterator[Chat | Message]:
    yield chat
    clock = _Clock(day_first)
    pending: list[str] = []  # the message's lines, while they are within MESSAGE_CAP
    length = 0  # the message's characters, lines joined by newlines
    head: tuple[str | None, int | None, bool] | None = None  # sender (None: a system line), time, marked by U+200E
    number = 0

    def message() -> Message | None:
        if head is None:
            return None
        sender, ts, marked = head
        sid = "system" if sender is None else f"name:{sender}"
        if ts is None:
            return Message(number, 0, sid, sender, "", "unsupported", "date out of range")
        if length > MESSAGE_CAP:
            return Message(number, ts, sid, sender, "", "unsupported", "too long")
        body = "\n".join(pending).strip()
        if sender is None:
            return Message(number, ts, "system", None, "", "service", "whatsapp_system")
        if _DELETED.match(body):
            return Message(number, ts, sid, sender, "", "empty")
        if _MEDIA.match(body):
            return Message(number, ts, sid, sender, "", "media", "media")
        if marked:  # iOS: the encryption notice, "X added Y", … under the chat's or a person's name
            return Message(number, ts, "system", None, "", "service", "whatsapp_system")
        return Message(number, ts, sid, sender, body, "text")

    for line, marked in text.lines():
        match = pattern.match(line)
        if match is not None:
            try:
                ts = clock(match)
            except ValueError:  # not a date after all: a continuation line that starts with numbers
                match = None
        if match is None:
            length += len(line) + 1
            if length <= MESSAGE_CAP:
                pending.append(line)
            else:
                pending.clear()  # the message is dropped: what is left of it need not be kept
            continue
        found = message()
        if found is not None:
            yield found
        number += 1
        said = _SENDER.match(match.group("rest"))
        head = (said.group("name"), ts, marked) if said else (None, ts, False)
        first = said.group("text") if said else match.group("rest")
        length = len(first)
        pending = [first] if length <= MESSAGE_CAP else []
        if on_read is not None and number % 2000 == 0:
            on_read(min(text.position, size))
    found = message()
    if found is not None:
        yield found
    if on_read is not None:
        on_read(size)
