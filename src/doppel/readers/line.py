"""LINE's "Export chat history" (*the chat › ≡ › Other settings › Export chat history*): one chat, as a `.txt`.

    [LINE] Chat history with Max Orlov                   the title: the chat's name ("[LINE] Max Orlovとのトーク履歴")
    Saved on: 2024/03/06 10:00                           ("保存日時：2024/03/06 10:00")

    2024/03/05(Tue)                                      a date line: "2024/03/05(火)", "2024.03.05 Tuesday",
    21:05\tMax Orlov\tyo                                 "Tue, 03/05/2024"; then messages, time TAB name TAB text
    PM 09:06\tLena Volkova\t"two lines,                  (12-hour clocks: "PM 09:06", "09:06 PM", "午後9:06");
    in quotes"                                           a message of several lines is in double quotes
    21:07\tMax Orlov\t[Sticker]                          placeholders: stickers, photos, calls, …
    21:08\tMax Orlov joined the group.                   no name column: a notice of the chat

A date is year first, except the English `Tue, 03/05/2024`, whose order is the phone's: told by its weekday when
that is English, else by a number above 12, else month first. Placeholders (`[Sticker]`, `[Photo]`, `[スタンプ]`,
`[写真]`, … in English and Japanese, and those of Chinese, Korean and Thai phones as far as known) are media,
calls (`☎ Missed call`, `☎ 通話時間 0:05`) and notices service messages, unsent messages dropped: none of them is
ever text. There are no ids: a person is their name, and in a
personal chat the title names the other person, so the owner is the one it does not name (`--me` otherwise).
Times are the phone's, read as UTC, to the minute. The file is read twice, a line at a time: memory stays flat.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from doppel.errors import ExportError
from doppel.readers import text as textfile
from doppel.readers.files import name_id, regular_file
from doppel.readers.records import Chat, Header, Message, OnRead, chat_type

_TITLE = re.compile(r"^\[LINE\] (?:Chat history (?:with|in) (?P<en>.+)|(?P<ja>.+?)(?:との|の)トーク履歴"
                    r"|ประวัติการ(?:แชท|สนทนา)กับ (?P<th>.+)|與(?P<zh>.+)的聊天記錄)$")
_DATE = re.compile(r"^(?P<y>\d{4})[/.-](?P<m>\d{1,2})[/.-](?P<d>\d{1,2})(?:\s*[(（][^()（）]{1,12}[)）]|\s+\S{1,12})?$")
_WEEKDAY_DATE = re.compile(r"^(?P<wd>[^\W\d]{2,12})\.?, (?P<a>\d{1,2})/(?P<b>\d{1,2})/(?P<y>\d{4})$")
_MERIDIEM = r"AM|PM|am|pm|a\.m\.|p\.m\.|午前|午後|오전|오후|上午|下午"
_MESSAGE = re.compile(rf"^(?:(?P<pre>{_MERIDIEM}) ?)?(?P<h>\d{{1,2}}):(?P<min>\d{{2}})(?: ?(?P<post>{_MERIDIEM}))?\t"
                      r"(?P<rest>.*)$")
_PM = {"PM", "pm", "p.m.", "午後", "오후", "下午"}
_WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
_MEDIA = {  # LINE's placeholders in the phone's language (English, Japanese; Chinese, Korean, Thai as far as known)
    "sticker": ("Sticker", "スタンプ", "貼圖", "스티커", "สติกเกอร์"),
    "photo": ("Photo", "Photos", "Image", "写真", "画像", "照片", "圖片", "사진", "รูป", "รูปภาพ"),
    "video": ("Video", "動画", "影片", "동영상", "วิดีโอ"),
    "voice_message": ("Voice message", "Audio", "ボイスメッセージ", "音声メッセージ", "語音訊息", "음성메시지",
                      "ข้อความเสียง"),
    "animation": ("GIF",), "file": ("File", "ファイル", "檔案", "파일", "ไฟล์"),
    "contact": ("Contact", "連絡先", "聯絡資訊", "연락처"),
    "location": ("Location", "位置情報", "位置資訊", "위치정보"),
    "album": ("Album", "アルバム", "相簿", "앨범"), "note": ("Note", "ノート", "記事本", "노트"),
    "poll": ("Poll", "投票", "투표"), "gift": ("Gift", "ギフト", "禮物", "선물"), "event": ("Event", "イベント"),
}
_PLACEHOLDER = {f"[{word}]": kind for kind, words in _MEDIA.items() for word in words}
_CALL = re.compile(r"^(?:☎|📞|\[(?:Call|Video call|通話|ビデオ通話)\]|(?:Missed call|No answer|Canceled call|"
                   r"Call time|不在着信|通話時間|キャンセル|応答なし)\b)")
_UNSENT = re.compile(r"^(?:.{0,80} )?unsent a message\.?$|^(?:.{0,80}が)?メッセージの送信を取り消しました。?$", re.I)


def is_history(sample: str) -> bool:
    """Whether the start of a `.txt` is LINE's chat history: its title, or a date line with message lines under it
    (a TAB right after the time, which no WhatsApp line has)."""
    lines = [line.strip("\ufeff\r") for line in sample.splitlines()]
    first = next((line for line in lines if line.strip()), "")
    if first.startswith("[LINE]"):
        return True
    dated = any(_DATE.match(line) or _WEEKDAY_DATE.match(line) for line in lines)
    return dated and sum(_MESSAGE.match(line) is not None for line in lines) >= 3


class _Survey:
    """What the first pass learns: the chat's name, its people, and the order of weekday-first dates."""

    def __init__(self, path: Path) -> None:
        self.name: str | None = None
        self.people: set[str] = set()
        self.day_first: bool | None = None
        votes = [0, 0]  # dates that read only month first, only day first
        dated = False
        for number, (line, _) in enumerate(textfile.lines(path, "a LINE chat history"), 1):
            if self.name is None and number <= 3 and (title := _TITLE.match(line.strip())):
                self.name = next(v for v in title.groupdict().values() if v)
                continue
            weekday = _WEEKDAY_DATE.match(line)
            if weekday is not None:
                dated = True
                votes[0] += _readable(weekday, False)
                votes[1] += _readable(weekday, True)
            elif _DATE.match(line):
                dated = True
            elif (message := _MESSAGE.match(line)) is not None:
                if not dated:
                    raise ExportError(f"{path}, line {number}: a message before any date line; is it a LINE chat "
                                      "history?")
                sender, tab, _ = message["rest"].partition("\t")
                if tab:
                    self.people.add(sender)
        self.day_first = votes[1] > votes[0]
        if not self.people:
            raise ExportError(f"{path} has no LINE message lines (like '2024/03/05(Tue)', then '21:05<TAB>Name<TAB>"
                              "text'); is it a LINE chat history?")


def _readable(match: re.Match[str], day_first: bool) -> bool:
    """Whether a weekday-first date is a date in that order and, when the weekday is English, that day's."""
    a, b = int(match["a"]), int(match["b"])
    try:
        day = datetime(int(match["y"]), b if day_first else a, a if day_first else b)
    except ValueError:
        return False
    weekday = _WEEKDAYS.get(match["wd"][:3].lower())
    return weekday is None or day.weekday() == weekday


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The export's header (one chat, no owner id) and its chat and messages, in order."""
    regular_file(path, "point doppel at the chat history's .txt")
    survey = _Survey(path)
    name = survey.name or path.stem.removeprefix("[LINE] ").removeprefix("Chat with ")
    chat = Chat(name_id(f"line:{name}"), chat_type(len(survey.people)), name)
    return Header(one_chat=True), _messages(path, chat, bool(survey.day_first), on_read)


def _messages(path: Path, chat: Chat, day_first: bool, on_read: Callable[[int], None] | None
              ) -> Iterator[Chat | Message]:
    yield chat
    day: datetime | None = None
    head: tuple[int, int, str | None, str] | None = None  # line, time, sender (None: a notice), first line's text
    rest: list[str] = []
    length = 0
    for number, (line, cut) in enumerate(textfile.lines(path, "a LINE chat history", on_read), 1):
        tab = "\t" in line  # a message line has one, a date line none: one pattern to try per line
        date = None if tab else _day(line, day_first)
        message = _MESSAGE.match(line) if tab and day is not None else None
        if message is not None and (int(message["h"]) > 23 or int(message["min"]) > 59):
            message = None  # not a time after all: text of the message it is in
        if date is None and message is None:
            length += len(line) + 1 + (textfile.LINE_CAP if cut else 0)
            if head is not None and length <= textfile.MESSAGE_CAP:
                rest.append(line)
            continue
        if head is not None:
            yield _message(*head, rest, length)
            head, rest = None, []
        if date is not None:
            day = date
            continue
        assert message is not None and day is not None
        hour = int(message["h"]) % 12 + 12 * ((message["pre"] or message["post"]) in _PM) \
            if message["pre"] or message["post"] else int(message["h"])
        ts = int(day.timestamp()) + hour * 3600 + int(message["min"]) * 60
        sender, named, text = message["rest"].partition("\t")
        head = (number, ts, sender if named else None, text if named else sender)
        length = len(head[3]) + (textfile.LINE_CAP if cut else 0)
    if head is not None:
        yield _message(*head, rest, length)


def _day(line: str, day_first: bool) -> datetime | None:
    found = _DATE.match(line)
    if found is not None:
        y, m, d = int(found["y"]), int(found["m"]), int(found["d"])
    elif (found := _WEEKDAY_DATE.match(line)) is not None:
        a, b, y = int(found["a"]), int(found["b"]), int(found["y"])
        d, m = (a, b) if day_first else (b, a)
    else:
        return None
    try:
        return datetime(y, m, d, tzinfo=UTC)
    except ValueError:
        return None  # not a date after all: text of the message it is in


def _message(number: int, ts: int, sender: str | None, first: str, rest: list[str], length: int) -> Message:
    if sender is None:
        return Message(number, ts, "system", None, "", "service", "line_system")
    sid = f"name:{sender}"
    if length > textfile.MESSAGE_CAP:
        return Message(number, ts, sid, sender, "", "unsupported", "too long")
    while rest and not rest[-1].strip():
        rest.pop()  # the blank line before the next date line
    text = "\n".join([first, *rest]).strip()
    if rest and len(text) >= 2 and text[0] == text[-1] == '"':  # several lines: quoted, inner quotes doubled
        text = text[1:-1].replace('""', '"').strip()
    if text in _PLACEHOLDER:
        return Message(number, ts, sid, sender, "", "media", _PLACEHOLDER[text])
    if _CALL.match(text):
        return Message(number, ts, sid, sender, "", "service", "phone_call")
    if _UNSENT.match(text):
        return Message(number, ts, sid, sender, "", "empty")
    return Message(number, ts, sid, sender, text, "text")
