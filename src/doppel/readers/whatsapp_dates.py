"""WhatsApp's dates with the month as a word, and the clock's half of the day in every layout.

Some phones write the month's name rather than its number, with or without the year, the time first or last:

    19:07, 20 Sep 2013 - Max Orlov: text               the time first, day and month, the year
    18 Mar 12:14 - Max Orlov: text                     day and month, no year
    Mar 5, 8:29 PM - Max Orlov: text                   month and day, no year, a 12-hour clock
    [20 Sep 2013, 19:07:12] Max Orlov: text            the same in iOS's brackets

The month is an English, German, French, Spanish, Portuguese, Italian, Dutch, Swedish, Polish, Turkish or Russian
name, whole or cut short (`Sep`, `sept.`, `März`, `Mrz`, `févr.`, `мар.`). These layouts are tried only on a
file's lines before its first message line, when no layout of numbers reads it: the common layouts cost nothing
more. Where no year is written, the years are told by the order of lines: a chat goes forwards, so a date more
than a day before the one above it is in the next year, and the last message is of the year the export was
written (the file's date: a zip member's own, else the file's modification time), or of the year before when its
day comes later in the year than the export's. The reading note says which years were assumed.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime

# the clock's half of the day: "PM", "p. m.", "ПП", Arabic "م"; English "in the morning" …
AMPM = r"[AaPp]\.? ?[Mm]\.?|ДП|ПП|дп|пп|م|ص|in the (?:morning|afternoon|evening)|at night"
PM = frozenset({"pm", "пп", "م", "intheafternoon", "intheevening"})
AM = frozenset({"am", "дп", "ص", "inthemorning"})
YEARS = range(2009, 2100)  # WhatsApp's first year on: an earlier date is a phone's wrong clock

_NAMES = (  # January to December, in each language (Russian as a date writes it, and as a word)
    "january february march april may june july august september october november december",
    "januar februar märz april mai juni juli august september oktober november dezember",
    "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
    "janeiro fevereiro março abril maio junho julho agosto setembro outubro novembro dezembro",
    "gennaio febbraio marzo aprile maggio giugno luglio agosto settembre ottobre novembre dicembre",
    "januari februari maart april mei juni juli augustus september oktober november december",
    "januari februari mars april maj juni juli augusti september oktober november december",
    "stycznia lutego marca kwietnia maja czerwca lipca sierpnia września października listopada grudnia",
    "ocak şubat mart nisan mayıs haziran temmuz ağustos eylül ekim kasım aralık",
    "января февраля марта апреля мая июня июля августа сентября октября ноября декабря",
    "январь февраль март апрель май июнь июль август сентябрь октябрь ноябрь декабрь",
)


def _months() -> dict[str, int]:
    """Each month's name and each of its beginnings of three letters or more, but a beginning two months share
    (French "jui": juin, juillet)."""
    found: dict[str, set[int]] = {}
    for names in _NAMES:
        for number, name in enumerate(names.split(), 1):
            for end in range(3, len(name) + 1):
                found.setdefault(name[:end], set()).add(number)
    months = {word: next(iter(numbers)) for word, numbers in found.items() if len(numbers) == 1}
    return months | {"mrz": 3, "mrt": 3, "sep": 9, "sept": 9}


MONTHS = _months()
_WORD = r"[^\W\d_]{3,12}\.?"
_TIME = rf"(?P<h>\d{{1,2}})[:.](?P<m>\d{{2}})(?:[:.](?P<s>\d{{2}}))?(?: ?(?P<ampm>{AMPM}))?"
_DAY_MONTH = rf"(?P<d>\d{{1,2}})(?P<dot>\.?) (?P<mon>{_WORD})"
_MONTH_DAY = rf"(?P<mon>{_WORD}) (?P<d>\d{{1,2}})(?P<dot>)"
_YEAR = r"(?:(?P<ysep>,? )(?P<y>\d{4}))?"
_CLOSE = r"(?P<close>\]?(?: -|:)?) (?P<rest>.*)$"
# the layouts a file's first message line is tried against, when no layout of numbers reads it
CANDIDATES = tuple(re.compile(pattern) for pattern in (
    rf"^(?P<open>\[?){_TIME}(?P<comma>,?) {_DAY_MONTH}{_YEAR}{_CLOSE}",
    rf"^(?P<open>\[?){_TIME}(?P<comma>,?) {_MONTH_DAY}{_YEAR}{_CLOSE}",
    rf"^(?P<open>\[?){_DAY_MONTH}{_YEAR}(?P<comma>,?) {_TIME}{_CLOSE}",
    rf"^(?P<open>\[?){_MONTH_DAY}{_YEAR}(?P<comma>,?) {_TIME}{_CLOSE}",
))
# what each of them starts with: one look at a line that is none of them (a refused file's, text before the first)
_START = re.compile(rf"\[?(?:\d{{1,2}}[:.]\d{{2}}|\d{{1,2}}\.? {_WORD} |{_WORD} \d)")
_BACK = 1  # days a date may go back from the one above it in the same year (a phone's clock set back)


def month(word: str) -> int | None:
    return MONTHS.get(word.rstrip(".").lower())


def first_line(line: str) -> re.Match[str] | None:
    """The match of a first message line whose month is a word (None: it is no such line)."""
    if _START.match(line) is None:
        return None
    for candidate in CANDIDATES:
        found = candidate.match(line)
        if found is not None and month(found["mon"]) is not None:
            return found
    return None


def layout(m: re.Match[str]) -> re.Pattern[str]:
    """The pattern of a file's message lines, from the first: the same order, brackets, separators, year or none,
    seconds or none and clock; only the numbers and the month vary."""
    opening, dot, ysep, comma, s, ampm, close = m.group("open", "dot", "ysep", "comma", "s", "ampm", "close")
    time = (r"(?P<h>\d{1,2})[:.](?P<m>\d{2})" + (r"[:.](?P<s>\d{2})" if s else "(?P<s>)")
            + (rf" ?(?P<ampm>{AMPM})" if ampm else "(?P<ampm>)"))
    day = rf"(?P<d>\d{{1,2}}){re.escape(dot)}"
    when = f"{day} (?P<mon>{_WORD})" if m.re in CANDIDATES[::2] else f"(?P<mon>{_WORD}) {day}"
    when += rf"{re.escape(ysep)}(?P<y>\d{{4}})" if ysep else "(?P<y>)"
    first, then = (time, when) if m.re in CANDIDATES[:2] else (when, time)
    return re.compile(rf"^{re.escape(opening)}{first}{re.escape(comma)} {then}{re.escape(close)} (?P<rest>.*)$")


def hour(h: int, ampm: str) -> int:
    """The hour of the day of a clock's hour and its half of the day as written ("" for none)."""
    ampm = ampm.replace(".", "").replace(" ", "").lower()
    if ampm in PM and h < 12:
        return h + 12
    if ampm in AM and h == 12:
        return 0
    if ampm == "atnight":  # 9 at night is 21:00, 1 at night 01:00
        return h + 12 if 6 <= h < 12 else 0 if h == 12 else h
    return h


class Clock:
    """Unix seconds of a message line's match in a layout of `layout`. Where the line writes no year, the year is
    `first_year`, one more each time the dates go back (`years` counts them, and `last` is the latest day of the
    year read, for the survey to tell the last message's year)."""

    def __init__(self, first_year: int = 2000) -> None:
        self.first_year = first_year
        self.years = 0  # the times the dates went back: the years after the first
        self.last: date | None = None  # the day of the last line without a year, in the leap year 2000

    def __call__(self, m: re.Match[str]) -> int | None:
        """The time, None for a date out of `YEARS` (or 29 February of an assumed year that has none); ValueError
        when it is no date at all."""
        number = month(m["mon"])
        if number is None:
            raise ValueError("not a month")
        h = hour(int(m["h"]), m["ampm"] or "")
        minute, second = int(m["m"]), int(m["s"] or 0)
        if h > 23 or minute > 59 or second > 59:
            raise ValueError("time out of range")
        day = int(m["d"])
        if m["y"]:
            year = int(m["y"])
            date(2000, number, day)  # ValueError for a day of no year
        else:
            today = date(2000, number, day)
            if self.last is not None and (self.last - today).days > _BACK:
                self.years += 1
            self.last = today
            year = self.first_year + self.years
        if year not in YEARS:
            return None
        try:
            return int(datetime(year, number, day, h, minute, second, tzinfo=UTC).timestamp())
        except ValueError:  # 29 February of a year that has none: the assumed year is wrong
            return None


def first_year(clock: Clock, written: date) -> tuple[int, str]:
    """The year of the first message of a file without years, read by `clock` to its end, and the note that says
    so: the last message is of the year the export was written, or of the year before when its day comes later in
    the year than the export's."""
    later = clock.last is not None and clock.last > date(2000, written.month, written.day)
    year = written.year - later
    first = year - clock.years
    years = f"{first}" if first == year else f"{first} to {year}"
    why = "the year before the export's" if later else "the year the export was written"
    back = (f"; the dates go back {clock.years:,} time{'s' * (clock.years != 1)}, each a new year" if clock.years
            else "")
    return first, (f"not written: {years} assumed, the last message taken to be of {year}, {why} "
                   f"({written.isoformat()}){back}")
