"""WeChat CSVs as PyWxDump (3.x and 2.x) and MemoTrace write them, read into the same sessions."""

import csv
import io
import json

import pytest
from conftest import refused
from test_readers import _sessions, run

from doppel.preparing.pipeline import detect

# (type_name, MemoTrace's Type, is_sender, time, text): the same conversation in every layout
ROWS = [
    ("文本", 1, 0, "2023-12-30 21:59:01", "yo"),
    ("文本", 1, 0, "2023-12-30 21:59:30", "gym later?\nthe one near the station"),
    ("图片", 3, 0, "2023-12-30 22:00:10", "图片"),
    ("动画表情", 47, 0, "2023-12-30 22:00:20", "[动画表情]"),
    ("文本", 1, 1, "2023-12-30 22:01:00", "го))"),
    ("语音", 34, 1, "2023-12-30 22:01:30", "语音"),
    ("系统通知", 10000, 0, "2023-12-30 22:02:00", "你撤回了一条消息"),
    ("语音通话", 50, 1, "2023-12-30 22:03:00", "通话时长 00:35"),
    ("引用回复", 49, 0, "2023-12-30 22:04:00", "<msg><appmsg><title>ok</title></appmsg></msg>"),
    ("文本", 1, 0, "2023-12-31 11:59:00", "happy new year lol [捂脸]"),
    ("文本", 1, 1, "2023-12-31 12:01:00", "и тебя))"),
]

EXPECTED = [
    {"start": 1703973541, "turns": [("Max Orlov", ["yo", "gym later?\nthe one near the station"]),
                                     ("Lena Volkova", ["го))"])]},
    {"start": 1704023940, "turns": [("Max Orlov", ["happy new year lol [捂脸]"]), ("Lena Volkova", ["и тебя))"])]},
]
# the photo, the sticker, the voice message; the recall notice, the call; the reply that quotes
DROPPED = {"media": 3, "service": 2, "unsupported": 1}


def _csv(header, rows):
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def pywxdump(folder, rows=ROWS, old=False):
    """PyWxDump's export/WXID/WXID_0_5000.csv and users.json (3.x; 2.x: the text in a JSON `content`)."""
    chat = folder / "export" / "wxid_max"
    chat.mkdir(parents=True)
    header = ["id", "MsgSvrID", "type_name", "is_sender", "talker", "room_name",
              *(["content"] if old else ["msg", "src"]), "CreateTime"]
    body = []
    for n, (name, _, mine, when, text) in enumerate(rows, 1):
        talker = ("我" if old else "wxid_lena") if mine else "wxid_max"
        content = [json.dumps({"src": "", "msg": text}, ensure_ascii=False)] if old else [text, ""]
        body.append([n, 7_000_000 + n, name, mine, talker, "wxid_max", *content, when])
    (chat / "wxid_max_0_5000.csv").write_text(_csv(header, body), encoding="utf-8")
    users = {"wxid_max": {"wxid": "wxid_max", "nickname": "max", "remark": "Max Orlov", "account": "maxo"},
             "wxid_lena": {"wxid": "wxid_lena", "nickname": "Lena Volkova", "remark": "", "account": ""}}
    if not old:
        (chat / "users.json").write_text(json.dumps(users, ensure_ascii=False), encoding="utf-8")
    return chat


def memotrace(folder, rows=ROWS):
    """MemoTrace's data/聊天记录/NAME/NAME_utf8.csv (UTF-8 with a BOM; CreateTime in unix seconds)."""
    from datetime import UTC, datetime

    chat = folder / "聊天记录" / "Max Orlov(wxid_max)"
    chat.mkdir(parents=True)
    header = ["localId", "TalkerId", "Type", "SubType", "IsSender", "CreateTime", "Status", "StrContent", "StrTime",
              "Remark", "NickName", "Sender"]
    body = []
    for n, (_, kind, mine, when, text) in enumerate(rows, 1):
        ts = int(datetime.fromisoformat(when).replace(tzinfo=UTC).timestamp())
        who = ["Lena Volkova", "lena", "wxid_lena"] if mine else ["Max Orlov", "max", "wxid_max"]
        body.append([n, 5, kind, 57 if kind == 49 else 0, mine, ts, 2, text, when, *who])
    path = chat / "Max Orlov_utf8.csv"
    path.write_text(_csv(header, body), encoding="utf-8-sig")
    return path


@pytest.mark.parametrize("layout", ["pywxdump", "pywxdump-2", "memotrace"])
def test_wechat_csv_keeps_text_messages_only(tmp_path, layout):
    path = memotrace(tmp_path) if layout == "memotrace" else pywxdump(tmp_path, old=layout == "pywxdump-2")
    assert detect(path) == "wechat" and detect(path.parent) == "wechat"
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    got = _sessions(tmp_path / "data")
    if layout == "pywxdump-2":  # no users.json: the people are their wxids, you are 我
        got = [{"start": s["start"], "turns": [({"wxid_max": "Max Orlov", "我": "Lena Volkova"}[n], m)
                                                for n, m in s["turns"]]} for s in got]
    assert got == EXPECTED
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"]["id"] == "wechat:me"
    assert stats["dropped"] == DROPPED


def test_a_pywxdump_chat_split_into_pages_is_read_in_order(tmp_path):
    chat = pywxdump(tmp_path)
    whole = (chat / "wxid_max_0_5000.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (chat / "wxid_max_0_5000.csv").write_text("".join(whole[:6]), encoding="utf-8")
    (chat / "wxid_max_5000_10000.csv").write_text(whole[0] + "".join(whole[6:]), encoding="utf-8")
    result = run("prepare", chat.parent, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == EXPECTED


def test_a_wechat_group_needs_include_groups(tmp_path):
    chat = tmp_path / "crew@chatroom"
    chat.mkdir()
    header = ["id", "MsgSvrID", "type_name", "is_sender", "talker", "room_name", "msg", "src", "CreateTime"]
    rows = [[1, 1, "文本", 0, "wxid_ann", "crew@chatroom", "hi all", "", "2024-03-05 21:05:00"],
            [2, 2, "文本", 1, "wxid_lena", "crew@chatroom", "yo", "", "2024-03-05 21:06:00"]]
    (chat / "crew@chatroom_0_5000.csv").write_text(_csv(header, rows), encoding="utf-8")
    result = run("prepare", chat, "-o", tmp_path / "data")
    assert result.output == ("doppel: error: this export is the group 'crew@chatroom'; groups are used only with "
                             "--include-groups\n")
    result = run("prepare", chat, "-o", tmp_path / "data", "--include-groups", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1709672700, "turns": [("wxid_ann", ["hi all"]),
                                                                             ("wxid_lena", ["yo"])]}]


@pytest.mark.parametrize(("content", "expected"), [
    ("id,talker,msg\n1,wxid_max,yo\n", " lacks the columns type_name, is_sender, room_name, CreateTime; is it a "
                                       "WeChat CSV of PyWxDump or MemoTrace?"),
    ("", " is empty; is it a WeChat CSV?"),
    ("id,MsgSvrID,type_name,is_sender,talker,room_name,msg,src,CreateTime\n1,1,文本,0,wxid_max,wxid_max,yo,,"
     "yesterday\n", ", line 2: CreateTime 'yesterday' is not a date like 2023-12-30 21:59:01"),
    ("id,MsgSvrID,type_name,is_sender,talker,room_name,msg,src,CreateTime\n1,1,文本,2,wxid_max,wxid_max,yo,,"
     "2023-12-30 21:59:01\n", ", line 2: is_sender is '2', not 0 or 1; is it a WeChat CSV?"),
    ('id,MsgSvrID,type_name,is_sender,talker,room_name,msg,src,CreateTime\n1,1,文本,0,wxid_max,wxid_max,"yo\nthe',
     ", line 3: not a CSV row (unexpected end of data); is the file truncated?"),
    (b"id,MsgSvrID,type_name,is_sender,talker,room_name,msg,src,CreateTime\n1,1,\xff\n", " is not UTF-8 text (byte "
     "72 of a block); is it a WeChat CSV?"),
])
def test_bad_wechat_input_is_one_line(tmp_path, content, expected):
    path = tmp_path / "wxid_max_0_5000.csv"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    refused(path, tmp_path, f"{path}{expected}")
