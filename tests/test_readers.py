"""WhatsApp and JSONL exports, read into the same dataset as Telegram's, in several of WhatsApp's locales."""

import json
import zipfile

import pytest
from click.testing import CliRunner

from doppel.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


NNBSP, LRM = "\u202f", "\u200e"

ANDROID_US = f"""12/30/23, 9:58{NNBSP}PM - Messages and calls are end-to-end encrypted.
12/30/23, 9:59{NNBSP}PM - Max Orlov: yo
12/30/23, 9:59{NNBSP}PM - Max Orlov: gym later?
the one near the station
12/30/23, 10:01{NNBSP}PM - Lena Volkova: го))
12/30/23, 10:02{NNBSP}PM - Lena Volkova: <Media omitted>
12/30/23, 10:03{NNBSP}PM - Max Orlov: This message was deleted
12/31/23, 11:59{NNBSP}AM - Max Orlov: happy new year lol
12/31/23, 12:01{NNBSP}PM - Lena Volkova: и тебя))
"""

ANDROID_EU = """30.12.2023, 21:59 - Max Orlov: yo
30.12.2023, 21:59 - Max Orlov: gym later?
the one near the station
30.12.2023, 22:01 - Lena Volkova: го))
30.12.2023, 22:02 - Lena Volkova: <Медиа отсутствуют>
31.12.2023, 11:59 - Max Orlov: happy new year lol
31.12.2023, 12:01 - Lena Volkova: и тебя))
"""

IOS = f"""[30.12.23, 21:58:10] Max Orlov: {LRM}Messages and calls are end-to-end encrypted.
[30.12.23, 21:59:01] Max Orlov: yo
[30.12.23, 21:59:30] Max Orlov: gym later?
the one near the station
[30.12.23, 22:01:00] Lena Volkova: го))
[30.12.23, 22:02:00] Lena Volkova: {LRM}image omitted
[31.12.23, 11:59:00] Max Orlov: happy new year lol
[31.12.23, 12:01:00] Lena Volkova: и тебя))
"""

IOS_US = f"""[12/30/23, 9:59:01{NNBSP}PM] Max Orlov: yo
[12/30/23, 9:59:30{NNBSP}PM] Max Orlov: gym later?
the one near the station
[12/30/23, 10:01:00{NNBSP}PM] Lena Volkova: го))
[12/31/23, 11:59:00{NNBSP}AM] Max Orlov: happy new year lol
[12/31/23, 12:01:00{NNBSP}PM] Lena Volkova: и тебя))
"""

EXPECTED = [
    {"start": 1703973541, "turns": [("Max Orlov", ["yo", "gym later?\nthe one near the station"]),
                                     ("Lena Volkova", ["го))"])]},
    {"start": 1704023940, "turns": [("Max Orlov", ["happy new year lol"]), ("Lena Volkova", ["и тебя))"])]},
]


def _sessions(folder):
    rows = read_jsonl(folder / "sessions.train.jsonl") + read_jsonl(folder / "sessions.eval.jsonl")
    return [{"start": r["start"], "turns": [(t["speaker"], t["messages"]) for t in r["turns"]]} for r in rows]


@pytest.mark.parametrize(("text", "dropped"), [
    (ANDROID_US, {"service": 1, "media": 1, "empty": 1}),  # the encryption notice, a photo, a deleted message
    (ANDROID_EU, {"media": 1}), (IOS, {"service": 1, "media": 1}), (IOS_US, {}),
], ids=["android-us", "android-eu", "ios", "ios-us"])
def test_whatsapp_locales_give_the_same_sessions(tmp_path, text, dropped):
    path = tmp_path / "WhatsApp Chat with Max Orlov.txt"
    path.write_text(text, encoding="utf-8")
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.exit_code == 0, result.output
    got = _sessions(tmp_path / "data")
    seconds = 0 if text in (ANDROID_US, ANDROID_EU) else None
    if seconds is None:  # iOS writes seconds; Android does not
        assert [[turn for turn in s["turns"]] for s in got] == [s["turns"] for s in EXPECTED]
    else:
        assert got[0]["turns"] == EXPECTED[0]["turns"] and got[1]["turns"] == EXPECTED[1]["turns"]
        assert [s["start"] // 60 for s in got] == [s["start"] // 60 for s in EXPECTED]
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"] == {"id": "name:Lena Volkova", "name": "Lena Volkova"}  # Max is the chat: Lena is you
    assert stats["dropped"] == dropped


def test_a_whatsapp_zip_with_media_is_read_from_its_chat_text(tmp_path):
    path = tmp_path / "WhatsApp Chat - Max Orlov.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("_chat.txt", "\ufeff" + IOS)
        archive.writestr("00000012-PHOTO-2023-12-30-22-02-00.jpg", b"\xff\xd8")
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.exit_code == 0, result.output
    assert [s["turns"] for s in _sessions(tmp_path / "data")] == [s["turns"] for s in EXPECTED]


def test_a_whatsapp_chat_without_a_name_asks_who_you_are(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_text(ANDROID_EU, encoding="utf-8")
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.exit_code == 2 and result.output == (
        "doppel: error: cannot tell which of the people of this personal chat is you; set me to your id or name, "
        "one of: name:Max Orlov Max Orlov (3 messages); name:Lena Volkova Lena Volkova (2 messages)\n")
    assert run("prepare", path, "-o", tmp_path / "data", "--me", "Lena Volkova").exit_code == 0


def test_a_whatsapp_group_needs_include_groups(tmp_path):
    path = tmp_path / "WhatsApp Chat with Crew.txt"
    path.write_text(ANDROID_EU + "31.12.2023, 12:05 - Ann Lee: me too\n", encoding="utf-8")
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.output == "doppel: error: this export is the group 'Crew'; groups are used only with " \
                            "--include-groups\n"


@pytest.mark.parametrize(("content", "expected"), [
    ("hello there\n", "has no WhatsApp message lines"),
    (b"\xff\xfe\x00bad", "is not UTF-8 text (byte 0 of a block)"),
])
def test_bad_whatsapp_input_is_one_line(tmp_path, content, expected):
    path = tmp_path / "WhatsApp Chat with Max.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.exit_code == 2 and expected in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "data").exists()


def test_jsonl_in_any_order_with_the_owner_marked(tmp_path):
    rows = [
        {"chat": "Max Orlov", "sender": "Lena Volkova", "time": "2023-12-30T22:01:00", "text": "го))", "me": True},
        {"chat": "Max Orlov", "sender": "Max Orlov", "time": 1703973541, "text": "yo"},
        {"chat": "Max Orlov", "sender": "Max Orlov", "time": "2023-12-30T21:59:30Z", "text": "gym later?"},
    ]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1703973541, "turns": [("Max Orlov", ["yo", "gym later?"]),
                                                                             ("Lena Volkova", ["го))"])]}]
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["owner"]["id"] == "name:Lena Volkova"


def test_a_bad_jsonl_line_says_where(tmp_path):
    path = tmp_path / "messages.jsonl"
    path.write_text('{"chat": "a", "sender": "b", "time": 1, "text": "x"}\n{"chat": "a", "time": 2, "text": "y"}\n',
                    encoding="utf-8")
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.exit_code == 2 and result.output == (
        f"doppel: error: {path}, line 2: not a message (no 'sender'); each line is "
        '{"chat": …, "sender": …, "time": …, "text": …}\n')


def _export(kind: str, folder):
    """An export of each format, the same conversation (Max writes first, Lena answers)."""
    if kind == "whatsapp":
        path = folder / "WhatsApp Chat with Max Orlov.txt"
        path.write_text(ANDROID_US, encoding="utf-8")
    elif kind == "discord":
        path = folder / "dm.json"
        path.write_text(json.dumps(_discord(name="Max Orlov")), encoding="utf-8")
    elif kind == "meta":
        path = folder / "inbox" / "maxorlov_1" / "message_1.json"
        path.parent.mkdir(parents=True)
        messages = [{"sender_name": "Lena Volkova", "timestamp_ms": 1703973600000, "content": _mojibake("го))")},
                    {"sender_name": "Max Orlov", "timestamp_ms": 1703973541000, "content": "yo"}]
        path.write_text(json.dumps({"participants": [{"name": "Max Orlov"}, {"name": "Lena Volkova"}],
                                    "messages": messages, "title": "Max Orlov"}), encoding="utf-8")
        path = path.parent
    else:
        path = folder / "messages.jsonl"
        path.write_text(json.dumps({"chat": "Max Orlov", "sender": "Max Orlov", "time": 1703973541, "text": "yo"})
                        + "\n" + json.dumps({"chat": "Max Orlov", "sender": "Lena Volkova", "time": 1703973600,
                                             "text": "го))", "me": True}) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["whatsapp", "discord", "meta", "jsonl"])
def test_every_format_trains_chats_and_evaluates(tmp_path, tiny, kind):
    path = _export(kind, tmp_path)
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"]["name"] == "Lena Volkova" and [s["name"] for s in stats["speakers"]][:2] in (
        ["Max Orlov", "Lena Volkova"], ["Lena Volkova", "Max Orlov"])
    result = run("train", tmp_path / "data", "-o", tmp_path / "run", "--model", tiny, "--max-steps", 1,
                 "--max-length", 128)
    assert result.exit_code == 0, result.output
    chat = CliRunner().invoke(main, ["chat", str(tmp_path / "run"), "--max-new-tokens", "2"], input="hey\n")
    assert chat.exit_code == 0 and chat.stdout.startswith("Lena Volkova: ")
    # eval on the same conversation, held out this time
    assert run("prepare", path, "-o", tmp_path / "held", "--eval-fraction", "0.5").exit_code == 0
    result = run("eval", tmp_path / "run", "--dataset", tmp_path / "held", "--max-new-tokens", "2",
                 "--probe-turns", "1", "--top-contacts", "1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["speakers"]


def _discord(channel_type: str = "DirectTextChat", name: str = "max") -> dict:
    def message(mid: int, second: int, who: tuple[str, str, str | None], content: str, kind: str = "Default",
                bot: bool = False, **extra) -> dict:
        ident, login, nickname = who
        return {"id": str(mid), "type": kind, "timestamp": f"2023-12-30T21:59:{second:02d}.123+00:00",
                "timestampEdited": None, "isPinned": False, "content": content,
                "author": {"id": ident, "name": login, "discriminator": "0000", "nickname": nickname, "isBot": bot,
                           "roles": []},
                "attachments": [], "embeds": [], "stickers": [], "reactions": [], "mentions": [], **extra}

    maxo, lena, bot = ("101", "max", "Max Orlov"), ("102", "lena", "Lena Volkova"), ("900", "dyno", None)
    return {"guild": {"id": "0", "name": "Direct Messages", "iconUrl": ""},
            "channel": {"id": "555", "type": channel_type, "categoryId": None, "category": None, "name": name,
                        "topic": None},
            "dateRange": {"after": None, "before": None}, "exportedAt": "2024-01-01T00:00:00+00:00",
            "messages": [
                message(1, 1, maxo, "yo"), message(2, 2, maxo, "gym later?"),
                message(3, 3, bot, "beep", bot=True),
                message(4, 4, lena, "", attachments=[{"id": "1", "url": "x.png", "fileName": "x.png",
                                                      "fileSizeBytes": 1}]),
                message(5, 5, lena, "го))", "Reply", reference={"messageId": "2", "channelId": "555"}),
                message(6, 6, maxo, "", "ChannelPinnedMessage")],
            "messageCount": 6}


def test_discord_direct_messages_with_bots_media_and_service_messages(tmp_path):
    path = tmp_path / "Direct Messages - max [555].json"
    path.write_text(json.dumps(_discord(name="Max Orlov"), indent=2), encoding="utf-8")
    result = run("prepare", path, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1703973541, "turns": [("Max Orlov", ["yo", "gym later?"]),
                                                                             ("Lena Volkova", ["го))"])]}]
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["owner"] == {"id": "discord102", "name": "Lena Volkova"}
    assert stats["dropped"] == {"bot": 1, "media": 1, "service": 1}


def test_a_discord_server_channel_is_a_group(tmp_path):
    path = tmp_path / "guild.json"
    path.write_text(json.dumps(_discord("GuildTextChat", "general")), encoding="utf-8")
    assert run("prepare", path, "-o", tmp_path / "data").output == (
        "doppel: error: this export is the group 'general'; groups are used only with --include-groups\n")
    result = run("prepare", path, "-o", tmp_path / "data", "--include-groups", "--me", "lena vOLKOVA",
                 "--eval-fraction", "0")
    assert result.exit_code == 0, result.output


def test_a_truncated_discord_export_is_one_line(tmp_path):
    path = tmp_path / "dm.json"
    path.write_text(json.dumps(_discord(), indent=2)[:-300], encoding="utf-8")
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.exit_code == 2 and result.output == f"doppel: error: {path} ends early; the export looks truncated\n"


def _mojibake(text: str) -> str:
    """As Meta writes text: each UTF-8 byte a character of its own."""
    return text.encode("utf-8").decode("latin-1")


def test_messenger_threads_newest_first_across_files_with_mojibake_repaired(tmp_path):
    from doppel.readers.meta import repair

    inbox = tmp_path / "messages" / "inbox"
    thread = inbox / "maxorlov_123"
    thread.mkdir(parents=True)
    people = [{"name": "Max Orlov"}, {"name": "Lena Volkova"}]
    base = 1703973541000

    def message(second: int, who: str, content: str | None = None, **extra) -> dict:
        out = {"sender_name": who, "timestamp_ms": base + second * 1000, **extra}
        if content is not None:
            out["content"] = _mojibake(content)
        return out

    newest = [message(60, "Lena Volkova", "го))", reactions=[{"reaction": _mojibake("❤"), "actor": "Max Orlov"}]),
              message(40, "Lena Volkova", photos=[{"uri": "p.jpg"}]), message(30, "Max Orlov", "gym later? café")]
    oldest = [message(0, "Max Orlov", "yo")]
    (thread / "message_1.json").write_text(json.dumps({"participants": people, "messages": newest,
                                                       "title": "Max Orlov", "thread_path": "inbox/maxorlov_123"}))
    (thread / "message_2.json").write_text(json.dumps({"participants": people, "messages": oldest,
                                                       "title": "Max Orlov"}))
    result = run("prepare", inbox, "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert _sessions(tmp_path / "data") == [{"start": 1703973541, "turns": [
        ("Max Orlov", ["yo", "gym later? café"]), ("Lena Volkova", ["го))"])]}]
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["owner"]["id"] == "name:Lena Volkova"
    # text that is already right is left alone
    assert repair("café") == "café" and repair("привет") == "привет" and repair(_mojibake("привет")) == "привет"
    assert run("prepare", thread / "message_2.json", "-o", tmp_path / "one", "--eval-fraction", "0").exit_code == 0


def test_several_exports_make_one_dataset_with_people_matched_by_name(tmp_path, write):
    from conftest import MAX, ME, dialogue, full_export, personal

    telegram = write(full_export([personal(MAX, dialogue())]))
    whatsapp = tmp_path / "WhatsApp Chat with Max O..txt"
    whatsapp.write_text(ANDROID_EU.replace("Max Orlov", "Max O.").replace("Lena Volkova", "Me Owner"),
                        encoding="utf-8")
    out = tmp_path / "data"
    refused = run("prepare", telegram, whatsapp, "-o", out, "--same-person", "Max Orlov=Maks")
    assert refused.exit_code == 2 and refused.output.startswith(
        "doppel: error: same_person 'Maks' is not a speaker in any export; one of: ")
    result = run("prepare", telegram, whatsapp, "-o", out, "--same-person", "Max Orlov=Max O.",
                 "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["chats"] == 2 and stats["owner"] == {"id": f"user{ME}", "name": "Me Owner"}
    assert [(s["id"], s["name"], s["messages"]) for s in stats["speakers"]] == [
        (f"user{MAX}", "Max Orlov", 5), (f"user{ME}", "Me Owner", 3)]  # 2 + 3 of Max's, 1 + 2 of yours
    assert {t["speaker_id"] for s in read_jsonl(out / "sessions.train.jsonl") for t in s["turns"]} == {
        f"user{MAX}", f"user{ME}"}
    # the same chat exported twice: its sessions once
    twice = run("prepare", telegram, telegram, "-o", tmp_path / "twice", "--eval-fraction", "0")
    assert twice.exit_code == 0, twice.output
    assert len(read_jsonl(tmp_path / "twice" / "sessions.train.jsonl")) == 1


def test_every_format_has_one_reader_of_one_shape_and_a_config_name():
    import inspect
    from typing import get_args, get_type_hints

    from doppel.config import PrepareConfig
    from doppel.preparing.pipeline import DETECTION, READERS
    from doppel.readers.records import chat_type

    assert set(READERS) == set(get_args(get_type_hints(PrepareConfig)["format"])) - {"auto"}
    assert {kind for kind, _ in DETECTION} <= set(READERS)
    assert {str(inspect.signature(read)) for read in READERS.values()} == {
        "(path: 'Path', on_read: 'OnRead' = None) -> 'tuple[Header, Iterator[Chat | Message]]'"}
    assert [chat_type(n) for n in (1, 2, 3)] == ["personal_chat", "personal_chat", "private_group"]
