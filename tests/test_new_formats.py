"""Signal, LINE, WeChat and iMessage exports, each through prepare → train → chat → eval, as every other format."""

import json
import re

import pytest
from click.testing import CliRunner
from test_imessage import chat_db
from test_line import ENGLISH as LINE_HISTORY
from test_readers import _sessions, run
from test_signal import CHAT_MD
from test_signal import _write as signal_export
from test_wechat import pywxdump

from doppel.cli import main

OWNER = {"signal": "Me", "line": "Lena Volkova", "wechat": "Lena Volkova", "imessage": "Me"}
PEER = {"imessage": "+15551234567"}  # chat.db knows people by their handle


def _export(kind, folder):
    if kind == "signal":
        return signal_export(folder, text=CHAT_MD).parent.parent
    if kind == "line":
        path = folder / "[LINE] Chat with Max Orlov.txt"
        path.write_text(LINE_HISTORY, encoding="utf-8")
        return path
    if kind == "wechat":
        return pywxdump(folder).parent
    if kind == "imessage":
        return chat_db(folder)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", list(OWNER))
def test_every_new_format_trains_chats_and_evaluates(tmp_path, tiny, kind):
    path = _export(kind, tmp_path)
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"]["name"] == OWNER[kind]
    assert sorted(s["name"] for s in stats["speakers"]) == sorted([OWNER[kind], PEER.get(kind, "Max Orlov")])
    result = run("train", tmp_path / "data", "-o", tmp_path / "run", "--model", tiny, "--max-steps", 1,
                 "--max-length", 128)
    assert result.exit_code == 0, result.output
    chat = CliRunner().invoke(main, ["chat", str(tmp_path / "run"), "--max-new-tokens", "2"], input="hey\n")
    assert chat.exit_code == 0 and chat.stdout.startswith(f"{OWNER[kind]}: ")
    assert run("prepare", path, "-o", tmp_path / "held", "--eval-fraction", "0.5").exit_code == 0
    result = run("eval", tmp_path / "run", "--dataset", tmp_path / "held", "--max-new-tokens", "2",
                 "--probe-turns", "1", "--top-contacts", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["speakers"]


# what the new formats write where there was no text: none of it may ever be a training target
PLACEHOLDER = re.compile(
    r"^\[(?:Sticker|Photo|Video|Voice message|File|スタンプ|写真|動画)\]$|^☎|unsent a message"
    r"|メッセージの送信を取り消し|!?\[[^\]]*\]\(\./media/|\((?:media|attachment) not exported\)"
    r"|^\(This message was deleted\)$|^\(- .* -\)$"
    r"|^(?:Missed|Incoming|Outgoing) (?:voice |video )?call|^(?:图片|语音|\[动画表情\]|你撤回了一条消息|通话时长)"
    r"|<msg>|\ufffc|^(?:Liked|Loved|Removed a like from) “")


@pytest.mark.parametrize("kind", list(OWNER))
def test_no_placeholder_of_any_new_format_is_kept(tmp_path, kind):
    result = run("prepare", _export(kind, tmp_path), "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert all(PLACEHOLDER.search(p) for p in ("[Sticker]", "☎ Missed call", "![a.jpg](./media/a.jpg)  ", "图片",
                                                "\ufffc", "Liked “yo”", "(This message was deleted)"))
    kept = [m for s in _sessions(tmp_path / "data") for _, messages in s["turns"] for m in messages]
    assert len(kept) >= 4 and [m for m in kept if PLACEHOLDER.search(m)] == []
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["dropped"]
