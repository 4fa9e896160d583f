"""WhatsApp's "Export chat" (without or with media): one chat, as a `.txt`, or the `.zip` that holds it.

Each message starts a line with its date and time in the phone's locale, then the sender:

    12/31/23, 11:59 PM - Max Orlov: text               Android (12-hour clock; U+202F before PM on newer phones)
    31.12.2023, 23:59 - Max Orlov: text                 Android (24-hour clock, day first)
    [31.12.23, 23:59:59] Max Orlov: text                iOS
    [12/31/23, 11:59:59 PM] Max Orlov: text             iOS (12-hour clock)
    [٣١/١٢/٢٠٢٣، ١١:٥٩:٥٩ م] Max Orlov: text            iOS, Arabic (its digits, comma and PM; U+200F in the date)
    31.12.2023 klo 23.59 - Max Orlov: text              Android, Finnish
    31. 12. 2023. 23:59:59 Max Orlov: text              Croatian, Hungarian (no separator before the name)
    [31/12/2566 BE, 23:59:59] Max Orlov: text           iOS, Thai (Buddhist years, 543 ahead)
    [12/31/R5, 23:59:59] Max Orlov: text                iOS, Japanese era years (Reiwa 5 is 2023, Heisei H)
    31/12/2023, 11:59 in the evening - Max Orlov: text  the clock in words
    [23:59:59, 31/12/23] Max Orlov: text                iOS, Vietnamese (the time first)
    19:07, 20 Sep 2013 - Max Orlov: text                the month as a word (whatsapp_dates.py), the time first
    18 Mar 12:14 - Max Orlov: text                      … without the year, told by the order of lines
    Mar 5, 8:29 PM - Max Orlov: text                    … month first, without the year

Lines without a date continue the message before. The file's layout is the shape of its first message line
(brackets, separators, year first or last and its digits, seconds, clock): every message line of one export has
it, so a pasted line of another shape ("2024-03-05 10:00:00 INFO …" in a day-first chat) is text of the message it
is in; text before the first message line is dropped as "unsupported". Whether the day or the month comes first is
decided from the layout's lines alone: a first number above 12 reads only day first, a second one only month
first, and the order that reads more of them is taken; the lines it cannot read are text, and when they are more
than a tenth of the layout's lines, the file is refused, naming a line of each kind. When no number is above 12,
consecutive dates tell: a chat moves by days, so the order that puts them fewer days apart in all is taken
(01/12, 02/12, 03/12 read month first are months apart). When that too is even (one day), the clock's words tell:
`p. m.`, `a.m.`, Arabic `م`, "in the evening" are written where the day comes first; else a 12-hour clock means
month first (the US), a 24-hour clock day first. `stats.json` says which order was read and why. A two-digit year
is 20YY, a four-digit one as written; a message dated before 2009 (WhatsApp's first year; it does not run on a
phone whose clock is wrong) or after 2099 is dropped, as "unsupported". A layout whose month is a word has no
order to decide; where it writes no year, the years are counted back from the export's date (whatsapp_dates.py)
and `stats.json` says which were assumed. Times are the phone's local time, read as UTC: gaps between messages are
right except across a DST change.

A message longer than 65,536 characters (WhatsApp's own limit) is dropped, as "unsupported". Memory stays bounded
whatever the file holds: a line is read 65,536 characters (and a header) at most and the rest of a longer one
skipped, a message's lines are kept only while within the limit, and a zip's text is inflated as it is read
(whatsapp_text.py, which also reads the chat's name and finds the chat's text in a zip).

System lines (the encryption notice, "X added Y", a changed subject) have no sender on Android; on iOS they are
written under the group's name or, in a personal chat, the other person's, and start with U+200E. A name that
writes only such lines beside two people or more is the group's; a person's line that starts with U+200E is
theirs unless it is a notice (`whatsapp_notices.py`), since people's own texts and captions start with it too.
Placeholders, deleted messages, missed calls and shared locations, in the phones' languages, are told by
`whatsapp_notices.classify`. There are no user ids: a person is their name, and the owner is told by the chat's
name (from the file name, in the phone's language: "WhatsApp Chat with Max Orlov.txt", "WhatsApp-chat met …",
"Чат WhatsApp с …") or given with `--me`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from doppel.errors import ExportError
from doppel.readers import whatsapp_dates, whatsapp_notices
from doppel.readers.files import name_id
from doppel.readers.records import Chat, Header, Message, OnRead, chat_type
from doppel.readers.whatsapp_text import MESSAGE_CAP, ChatText, chat_name

__all__ = ["MESSAGE_CAP", "chat_name", "read"]

_AMPM, _PM, _AM = whatsapp_dates.AMPM, whatsapp_dates.PM, whatsapp_dates.AM
_LINE = re.compile(
    r"^(?P<open>\[?)(?P<a>\d{1,4})(?P<sep>\. |[./-])(?P<b>\d{1,2})(?P=sep)(?P<c>\d{1,4}|[RH]\d{1,2})(?P<era> BE)?"
    r"(?P<comma>\.?,?|،| klo) (?P<h>\d{1,2})[:.](?P<m>\d{2})(?:[:.](?P<s>\d{2}))?"
    rf"(?: ?(?P<ampm>{_AMPM}))?(?P<close>\.?\]?(?: -|:)?) (?P<rest>.*)$")
# Vietnamese: the time first, "[21:41:35, 27/3/22] Name: text"
_TIME_FIRST = re.compile(
    rf"^(?P<open>\[?)(?P<h>\d{{1,2}})[:.](?P<m>\d{{2}})(?:[:.](?P<s>\d{{2}}))?(?: ?(?P<ampm>{_AMPM}))?(?P<comma>,?) "
    r"(?P<a>\d{1,4})(?P<sep>[./-])(?P<b>\d{1,2})(?P=sep)(?P<c>\d{1,4})(?P<era>)(?P<close>\]?(?: -|:)?) (?P<rest>.*)$")
_SENDER = re.compile(r"^(?P<name>[^:]{1,80}?): (?P<text>.*)$", re.S)
_YEARS = whatsapp_dates.YEARS
_MIXED = 0.1  # the share of message lines an order of dates may leave unread before the file is refused


def _layout(m: re.Match[str]) -> re.Pattern[str]:
    """The pattern of a file's message lines, from the first: the same brackets, separators, year first or last and
    its digits, era, seconds or none, clock and separator after the time; only the numbers vary."""
    opening, a, sep, c, era, comma, s, ampm, close = m.group("open", "a", "sep", "c", "era", "comma", "s", "ampm",
                                                             "close")
    sep = re.escape(sep)
    year_first = len(a) == 4
    day = (rf"(?P<a>\d{{{'4' if year_first else '1,3'}}}){sep}(?P<b>\d{{1,2}}){sep}"
           + (r"(?P<c>[RH]\d{1,2})" if c[0] in "RH" else rf"(?P<c>\d{{{'1,2' if year_first else len(c)}}})")
           + re.escape(era or ""))
    time = (r"(?P<h>\d{1,2})[:.](?P<m>\d{2})" + (r"[:.](?P<s>\d{2})" if s else "(?P<s>)")
            + (rf" ?(?P<ampm>{_AMPM})" if ampm else "(?P<ampm>)"))
    first, then = (time, day) if m.re is _TIME_FIRST else (day, time)
    return re.compile(rf"^{re.escape(opening)}{first}{re.escape(comma)} {then}{re.escape(close)} (?P<rest>.*)$")


@dataclass(frozen=True, slots=True)
class _Survey:
    pattern: re.Pattern[str]
    day_first: bool
    buddhist: bool  # years of the Buddhist era ("2565 BE"), 543 ahead
    senders: Counter[str]  # messages per person
    system: frozenset[str]  # names that write only the chat's notices (a group's name, on iOS)
    notes: tuple[tuple[str, str], ...]  # how the order of the date (and the years) were read, for stats.json
    named: bool = False  # the month is a word (whatsapp_dates.py)
    first_year: int = 0  # the first message's year, where the lines write none


def _year(c: str, buddhist: bool) -> int:
    """The year of a date's last number: 20YY, a Japanese era's (Reiwa "R4" is 2022, Heisei "H30" 2018), a
    Buddhist one (543 ahead) or as written ("0001" is the year 1, not 2001)."""
    if c[0] in "RH":
        return (2018 if c[0] == "R" else 1988) + int(c[1:])
    return int(c) + 2000 if len(c) == 2 else int(c) - 543 * buddhist


def _ordinals(a: str, b: str, c: str, buddhist: bool) -> tuple[int, int] | None:
    """The day number of an ambiguous date (both numbers at most 12) read month first and day first."""
    year = _year(c, buddhist)
    try:
        return date(year, int(a), int(b)).toordinal(), date(year, int(b), int(a)).toordinal()
    except ValueError:  # 0, or a year out of range: no evidence
        return None


def _survey(text: ChatText) -> _Survey | None:
    """The layout of message lines, the order of dates and the people, from the message lines alone (None: no
    message line); see the module's docstring for the rule, and `ExportError` when no order reads nine tenths of
    them."""
    pattern = _LINE  # until the first message line tells the layout
    year_first = twelve_hour = buddhist = False
    ampm = ""
    lines = days = months = day_at = month_at = 0  # message lines; those only day / month first reads; the first
    either: Counter[str] = Counter()  # messages per sender, of the lines that either order reads
    only: tuple[Counter[str], Counter[str]] = Counter(), Counter()  # of those only month first, only day first reads
    notices: Counter[str] = Counter()  # lines of the chat's notices, per name they are written under
    plain: set[str] = set()  # names with a line that is no notice
    gaps = [0, 0]  # days between consecutive ambiguous dates, read month first and day first
    last = ""  # the date of the last ambiguous line, as written
    before: tuple[int, int] | None = None
    named: whatsapp_dates.Clock | None = None  # the clock of a layout whose month is a word
    word = ""  # the first line's month
    for n, (line, marked) in enumerate(text.lines(), 1):
        match = pattern.match(line)
        if match is None and pattern is _LINE:
            match = _TIME_FIRST.match(line) or whatsapp_dates.first_line(line)
        if match is None:
            continue
        if pattern is _LINE:
            if match.re in whatsapp_dates.CANDIDATES:
                pattern, named, word = whatsapp_dates.layout(match), whatsapp_dates.Clock(), match["mon"]
            elif len(match["c"]) not in ((1, 2) if len(match["a"]) == 4 else (2, 3, 4)) or (
                    len(match["c"]) == 3 and match["c"][0] not in "RH"):
                continue  # "1.2.3 4:56": a year of one digit, not a message line
            else:
                pattern, year_first, twelve_hour = _layout(match), len(match["a"]) == 4, match["ampm"] is not None
                buddhist, ampm = bool(match["era"]), match["ampm"] or ""
        if named is not None:
            try:
                named(match)
            except ValueError:  # not a date after all ("18 Mars 12:14", 31 February): text, as the reader reads it
                continue
            day = month = False
        else:
            day, month = int(match["a"]) > 12, int(match["b"]) > 12
            if day and month:  # a date neither way (13/13): text, like 31 February
                continue
        lines += 1
        senders = only[1] if day else only[0] if month else either
        if day:
            days, day_at = days + 1, day_at or n
        elif month:
            months, month_at = months + 1, month_at or n
        elif named is None and not (days or months or year_first) and (found := line[:match.end("c")]) != last:
            # a new day, while no date has told the order: its numbers read both ways
            last, now = found, _ordinals(match["a"], match["b"], match["c"], buddhist)
            if now is not None and before is not None:
                gaps[0] += abs(now[0] - before[0])
                gaps[1] += abs(now[1] - before[1])
            before = now or before
        said = _SENDER.match(match["rest"])
        if said:
            name = said["name"]
            if name in plain and not marked:  # most lines: a person's, known by an earlier line
                senders[name] += 1
            elif _is_notice(said["text"], marked):  # a notice, under a person's name or the group's
                notices[name] += 1
            else:
                plain.add(name)
                senders[name] += 1
    if pattern is _LINE:
        return None
    if min(days, months) > _MIXED * lines:
        raise ExportError(f"{text.path} has dates that read only day first (line {day_at}) and dates that read only "
                          f"month first (line {month_at}): {min(days, months):,} of its {lines:,} message lines would "
                          "be lost either way; is it one WhatsApp chat's export?")
    if named is not None:
        notes: tuple[tuple[str, str], ...] = (("dates", f"the month is written as a word ({word!r})"),)
        first_year = 0
        if named.last is not None:  # lines without a year
            first_year, years = whatsapp_dates.first_year(named, text.written)
            notes += (("years", years),)
        return _Survey(pattern, False, False, either, frozenset(_groups(notices, either, text.name)), notes, True,
                       first_year)
    day_first, dates = _order(year_first, days, months, gaps, twelve_hour, ampm)
    people = either + (only[1] if year_first else only[day_first])
    return _Survey(pattern, day_first, buddhist, people, frozenset(_groups(notices, people, text.name)),
                   (("dates", dates),))


def _groups(notices: Counter[str], people: Counter[str], name: str | None) -> set[str]:
    """The names that write only the chat's notices beside two people or more: the group's (its own name when the
    file says it)."""
    system = notices.keys() - people.keys()
    if len(people) < 2:  # a personal chat: both names are people's, whatever their lines begin with
        return set()
    return {name} if name in system else system


def _is_notice(text: str, marked: bool) -> bool:
    """Whether the text of a line is the chat's notice: one iOS marks with U+200E (a placeholder is not), or the
    end-to-end notice, which some exports write under the group's name unmarked."""
    if marked:
        return not whatsapp_notices.is_placeholder(text)
    return text[:8] in whatsapp_notices.E2E_HEADS and whatsapp_notices.is_notice(text)


def _order(year_first: bool, days: int, months: int, gaps: list[int], twelve_hour: bool, ampm: str
           ) -> tuple[bool, str]:
    """(whether dates are day first, why), from the strongest evidence the file holds."""
    if year_first:
        return False, "year/month/day: the year is written first"
    if days != months:
        more = "day/month" if days > months else "month/day"
        return days > months, (f"{more}: {max(days, months):,} message lines have a first number above 12"
                               if days > months else
                               f"{more}: {max(days, months):,} message lines have a second number above 12")
    if gaps[0] != gaps[1]:
        order = "day/month" if gaps[1] < gaps[0] else "month/day"
        return gaps[1] < gaps[0], (f"{order}: consecutive dates are {min(gaps):,} days apart in all read this way, "
                                   f"{max(gaps):,} read the other way")
    if "." in ampm or ampm in ("م", "ص") or ampm.startswith(("in ", "at ")):
        return True, f"day/month: no date tells, and the clock's {ampm!r} is written where the day comes first"
    if twelve_hour:
        return False, "month/day: no date tells, and a 12-hour clock is the US's, which writes the month first"
    return True, "day/month: no date tells, and a 24-hour clock is written where the day comes first"


class _Clock:
    """Unix seconds of a date line's match; a day's start is computed once while its messages follow each other."""

    def __init__(self, day_first: bool, buddhist: bool = False) -> None:
        self.day_first, self.buddhist = day_first, buddhist
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
            if ampm in _PM and h < 12:
                h += 12
            elif ampm in _AM and h == 12:
                h = 0
            elif ampm == "atnight":  # 9 at night is 21:00, 1 at night 01:00
                h = h + 12 if 6 <= h < 12 else 0 if h == 12 else h
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
            year = _year(c, self.buddhist)
        if year not in _YEARS:
            datetime(2000, month, day)  # ValueError for a day of no year (2000 has a 29 February)
            return None
        return int(datetime(year, month, day, tzinfo=UTC).timestamp())


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The export's header (one chat, no owner id, how its dates were read) and its chat and messages, in order.
    The text is read twice, a line at a time: first for the layout, the order of dates and the people, then for the
    messages."""
    text = ChatText(path)
    survey = _survey(text)
    if survey is None or not survey.senders:
        raise ExportError(f"{path} has no WhatsApp message lines (like '31/12/2023, 23:59 - Name: text'); is it "
                          "a WhatsApp chat export?")
    name = text.name or path.stem
    return Header(one_chat=True, notes=survey.notes), _messages(
        text, Chat(name_id(name), chat_type(len(survey.senders)), name), survey, path.stat().st_size, on_read)


def _message(number: int, head: tuple[str | None, int | None, bool], body: str, length: int,
             system: frozenset[str]) -> Message:
    """The message of a header (sender, time, marked by U+200E) and its lines joined."""
    sender, ts, marked = head
    sid = "system" if sender is None else f"name:{sender}"
    if ts is None:
        return Message(number, 0, sid, sender, "", "unsupported", "date out of range")
    if length > MESSAGE_CAP:
        return Message(number, ts, sid, sender, "", "unsupported", "too long")
    if sender is None:
        return Message(number, ts, "system", None, "", "service", "whatsapp_system")
    kind, kept, what = whatsapp_notices.classify(body)
    if kind == "text" and (sender in system or (marked and what is None and whatsapp_notices.is_notice(body))):
        kind, what = "service", "whatsapp_system"  # iOS: a notice under the group's or a person's name
    if kind == "service":
        return Message(number, ts, "system", None, "", "service", what)
    if kind == "text":
        return Message(number, ts, sid, sender, kept, "text")
    return Message(number, ts, sid, sender, "", kind, what)


def _messages(text: ChatText, chat: Chat, survey: _Survey, size: int, on_read: Callable[[int], None] | None
              ) -> Iterator[Chat | Message]:
    yield chat
    pattern, system = survey.pattern, survey.system
    clock: Callable[[re.Match[str]], int | None] = (
        whatsapp_dates.Clock(survey.first_year) if survey.named else _Clock(survey.day_first, survey.buddhist))
    pending: list[str] = []  # the message's lines, while they are within MESSAGE_CAP
    length = 0  # the message's characters, lines joined by newlines
    head: tuple[str | None, int | None, bool] | None = None  # sender (None: a system line), time, marked by U+200E
    number = 0
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
        if head is not None:
            yield _message(number, head, (pending[0] if len(pending) == 1 else "\n".join(pending)).strip(), length,
                           system)
        elif any(p.strip() for p in pending):  # text before the first message line: said, not lost in silence
            yield Message(0, 0, "system", None, "", "unsupported", "before the first message line")
        number += 1
        first = match["rest"]
        said = _SENDER.match(first)
        if said is None:
            head = (None, ts, False)
        else:
            name, first = said.group("name", "text")
            head = (name, ts, marked)
        length = len(first)
        pending = [first] if length <= MESSAGE_CAP else []
        if on_read is not None and number % 2000 == 0:
            on_read(min(text.position, size))
    if head is not None:
        yield _message(number, head, "\n".join(pending).strip(), length, system)
    if on_read is not None:
        on_read(size)
