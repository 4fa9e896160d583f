"""WeChat (PC) chats as the common decryptors write them, as CSV: the files WeClone reads.

WeChat has no export of its own; tools decrypt the PC client's database and write a chat as CSV:

    id,MsgSvrID,type_name,is_sender,talker,room_name,msg,src,CreateTime       PyWxDump 3.x: export/WXID/WXID_0_5000.csv
    1,8012…,文本,1,wxid_me,wxid_max,yo,,2023-12-30 21:59:01                     (and users.json: the names by wxid)
    id,MsgSvrID,type_name,is_sender,talker,room_name,content,CreateTime         PyWxDump 2.x: content is
    1,8012…,文本,0,wxid_max,wxid_max,"{""msg"": ""yo""}",…                     {"src": …, "msg": …}
    localId,TalkerId,Type,SubType,IsSender,CreateTime,Status,StrContent,StrTime,Remark,NickName,Sender
    1,5,1,0,0,1703973541,2,yo,2023-12-30 21:59:01,Max Orlov,max,wxid_max        MemoTrace (WeChatMsg): NAME_utf8.csv

Read: one such `.csv`, a chat's folder of them (PyWxDump splits a chat into files of 5,000 messages: read in the
order of their first index), or a folder of chat folders. Only text messages are kept (type 1, "文本"); images,
voice, video, stickers, files, links, locations and contact cards are media, system notices, pats, recalls,
calls and group notices service messages, and everything else (replies that quote, transfers, mini-programs) is
dropped as unsupported: their text is the app's XML or a summary, never what someone typed.

Your messages are those with is_sender 1, the owner (`wechat:me`, named as the export names you); everyone else
is their wxid (`wechat:wxid_…`), named by users.json (remark, else nickname) or the CSV's own names. A chat whose
id ends in `@chatroom` is a group. PyWxDump's times are the computer's local time, read as UTC; MemoTrace's are
unix seconds. Each file is streamed (Python's csv module, a row at a time): memory stays flat.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from doppel.errors import ExportError
from doppel.readers.files import name_id, regular_file, unix_time
from doppel.readers.records import GROUP, Chat, Header, Message, OnRead, chat_type

OWNER = "wechat:me"
# the columns each layout needs (a file has all of one of them), and which column holds what
_LAYOUTS = {
    "pywxdump": ("type_name", "is_sender", "talker", "room_name", "msg", "CreateTime"),
    "pywxdump2": ("type_name", "is_sender", "talker", "room_name", "content", "CreateTime"),
    "memotrace": ("Type", "IsSender", "CreateTime", "StrContent", "Sender"),
}
_TEXT = {"1", "文本", "text"}
_MEDIA = {"3": "photo", "图片": "photo", "image": "photo", "34": "voice_message", "语音": "voice_message",
          "voice": "voice_message", "43": "video_file", "视频": "video_file", "video": "video_file",
          "47": "sticker", "动画表情": "sticker", "sticker": "sticker", "用户上传的GIF表情": "animation",
          "文件": "file", "file": "file", "48": "location", "位置": "location", "地图信息": "location",
          "location": "location", "42": "contact", "名片": "contact", "推荐公众号": "contact",
          "卡片式链接": "link", "(分享)卡片式链接": "link", "合并转发的聊天记录": "forwarded_chat"}
_SERVICE = {"10000": "wechat_system", "10002": "wechat_system", "系统通知": "wechat_system", "拍一拍": "pat",
            "撤回消息": "recall", "50": "phone_call", "语音通话": "phone_call", "群公告": "group_notice",
            "37": "friend_request", "添加好友": "friend_request", "system": "wechat_system"}
_PAGE = re.compile(r"_(\d+)_\d+$")  # PyWxDump's WXID_START_END.csv


def is_export(path: Path) -> bool:
    """Whether a folder holds a decryptor's chat CSVs (itself, or its chat folders)."""
    return bool(_csvs(path)) or any(_csvs(p) for p in _folders(path))


def _folders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _csvs(folder: Path) -> list[Path]:
    try:
        files = [p for p in folder.iterdir() if p.suffix.lower() == ".csv" and p.is_file()]
    except OSError:
        return []
    return sorted(files, key=lambda p: (int(m[1]) if (m := _PAGE.search(p.stem)) else 0, p.name))


def read(path: Path, on_read: OnRead = None) -> tuple[Header, Iterator[Chat | Message]]:
    """The export's header (the owner: `wechat:me`) and its chats with their messages, in order."""
    if path.is_dir():
        chats = [files] if (files := _csvs(path)) else [f for f in map(_csvs, _folders(path)) if f]
        if not chats:
            raise ExportError(f"{path} holds no WeChat CSV (a .csv of PyWxDump's or MemoTrace's export)")
    else:
        regular_file(path, "point doppel at a chat's .csv or the folder of its .csv files")
        chats = [[path]]
    layouts = [[_layout(file) for file in files] for files in chats]
    return Header(OWNER, one_chat=len(chats) == 1), _items(chats, layouts, on_read)


def _open(file: Path) -> Iterator[tuple[int, list[str]]]:
    """The rows of a CSV file with their line numbers; `ExportError` for bytes that are not UTF-8 or a row csv
    cannot read (a field over 128 KiB, an unclosed quote at the end)."""
    with file.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, strict=True)  # strict: a file cut inside a quoted field is an error, not a row
        try:
            for row in rows:
                yield rows.line_num, row
        except UnicodeDecodeError as exc:
            raise ExportError(f"{file} is not UTF-8 text (byte {exc.start} of a block); is it a WeChat CSV?") from None
        except csv.Error as exc:
            raise ExportError(f"{file}, line {rows.line_num}: not a CSV row ({exc}); is the file truncated?") from None


def _layout(file: Path) -> tuple[str, dict[str, int]]:
    """The file's layout and its columns' positions, from its first row."""
    header = next((row for _, row in _open(file)), None)
    if header is None:
        raise ExportError(f"{file} is empty; is it a WeChat CSV?")
    columns = {name.strip(): at for at, name in reversed(list(enumerate(header)))}
    for layout, needed in _LAYOUTS.items():
        if all(name in columns for name in needed):
            return layout, columns
    nearest = min(_LAYOUTS.values(), key=lambda needed: sum(name not in columns for name in needed))
    missing = ", ".join(name for name in nearest if name not in columns)
    raise ExportError(f"{file} lacks the columns {missing}; is it a WeChat CSV of PyWxDump or MemoTrace?")


def _names(folder: Path) -> dict[str, str]:
    """PyWxDump's users.json beside the CSVs: display names by wxid (remark, else nickname, else account)."""
    try:
        users = json.loads((folder / "users.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(users, dict):
        return {}
    return {wxid: str(u.get("remark") or u.get("nickname") or u.get("account") or wxid)
            for wxid, u in users.items() if isinstance(u, dict)}


def _items(chats: list[list[Path]], layouts: list[list[tuple[str, dict[str, int]]]],
           on_read: Callable[[int], None] | None) -> Iterator[Chat | Message]:
    done = 0
    for files, kinds in zip(chats, layouts, strict=True):
        names = _names(files[0].parent)

        def rows(files: list[Path] = files, kinds: list[tuple[str, dict[str, int]]] = kinds,
                 names: dict[str, str] = names) -> Iterator[tuple[str, Message]]:
            for file, kind in zip(files, kinds, strict=True):
                for number, row in _body(file):
                    yield _row(file, number, row, *kind, names)

        room, people, peer = "", set(), None  # the first pass: the chat's id, its people, a name for it
        for found, message in rows():
            room = room or found
            if message.sender_id != "system":
                people.add(message.sender_id)
            if peer is None and message.sender_id not in ("system", OWNER):
                peer = message.sender_name
        if not room:
            continue  # a header without rows
        kind = GROUP if room.endswith("@chatroom") else chat_type(len(people))
        memo = files[0].stem.removesuffix("_utf8") if files[0].stem.endswith("_utf8") else None  # MemoTrace's name
        name = names.get(room) or memo or (room if kind == GROUP else peer or room)
        yield Chat(name_id(f"wechat:{room}"), kind, name)
        for _, message in rows():
            yield message
        done += sum(file.stat().st_size for file in files)
        if on_read is not None:
            on_read(done)


def _body(file: Path) -> Iterator[tuple[int, list[str]]]:
    rows = _open(file)
    next(rows, None)  # the header
    yield from rows


def _row(file: Path, number: int, row: list[str], layout: str, columns: dict[str, int], names: dict[str, str]
         ) -> tuple[str, Message]:
    """(the chat's wxid, the message) of one row."""
    def get(name: str) -> str:
        at = columns.get(name)
        return row[at].strip() if at is not None and at < len(row) else ""

    where = f"{file}, line {number}"
    if layout == "memotrace":
        kind, mine, text = get("Type"), get("IsSender"), get("StrContent")
        wxid, room = get("Sender"), file.stem.removesuffix("_utf8")  # TalkerId is a number of the database's
        name = get("Remark") or get("NickName") or wxid
        ts = _unix(get("CreateTime"), where)
    else:
        kind, mine, wxid, room = get("type_name"), get("is_sender"), get("talker"), get("room_name")
        text = get("msg") if layout == "pywxdump" else _content(get("content"), where)
        name = names.get(wxid) or wxid
        ts = _local(get("CreateTime"), where)
    if mine not in ("0", "1"):
        raise ExportError(f"{where}: is_sender is {mine!r}, not 0 or 1; is it a WeChat CSV?")
    if mine == "1":
        sid = OWNER
        name = "我" if wxid in ("", "我", room) else name  # PyWxDump writes 我, or the chat's id, for you
    else:
        sid = f"wechat:{wxid or room}"
    ident = get("id") or get("localId")
    return room or file.parent.name, _message(int(ident) if ident.isdigit() else number, ts, sid, name, kind, text)


def _message(mid: int, ts: int, sid: str, name: str, kind: str, text: str) -> Message:
    if kind in _TEXT:
        return Message(mid, ts, sid, name, text, "text" if text else "empty")
    if kind in _MEDIA:
        return Message(mid, ts, sid, name, "", "media", _MEDIA[kind])
    if kind in _SERVICE:
        return Message(mid, ts, "system", None, "", "service", _SERVICE[kind])
    return Message(mid, ts, sid, name, "", "unsupported", kind or "unknown")


def _content(value: str, where: str) -> str:
    """PyWxDump 2.x's content: a JSON object {"src": …, "msg": …}."""
    try:
        content: Any = json.loads(value)
    except (ValueError, RecursionError):
        content = None
    if not isinstance(content, dict) or not isinstance(content.get("msg", ""), str):
        raise ExportError(f'{where}: content is not {{"src": …, "msg": …}}; is it a WeChat CSV of PyWxDump?')
    return str(content.get("msg", "")).strip()


def _unix(value: str, where: str) -> int:
    try:
        return unix_time(int(value))
    except ValueError:
        raise ExportError(f"{where}: CreateTime {value!r} is not unix seconds") from None


def _local(value: str, where: str) -> int:
    for layout in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M"):
        try:
            return int(datetime.strptime(value, layout).replace(tzinfo=UTC).timestamp())
        except ValueError:
            continue
    if value.isdigit():
        return _unix(value, where)
    raise ExportError(f"{where}: CreateTime {value!r} is not a date like 2023-12-30 21:59:01")
