"""Issue 28: a placeholder is never a training target. Every reader runs over exports holding what its app writes
where nobody wrote a text (media placeholders, deleted-message, call, reaction, poll and group notices); no kept
message of the prepared dataset (train and eval) matches any placeholder of any supported app and locale."""

import json
import re

import pytest
from conftest import MAX, ME, dialogue, full_export, msg, personal
from test_imessage import LONG, chat_db
from test_line import ENGLISH as LINE_ENGLISH
from test_line import JAPANESE as LINE_JAPANESE
from test_readers import _discord, _mojibake, _sessions, run
from test_signal import CHAT_MD
from test_signal import _write as signal_export
from test_wechat import memotrace, pywxdump

from doppel.readers.notices import is_location, meta_notice, subjects

LRM, NNBSP = "\u200e", "\u202f"

# what each app writes in place of a message, in the locales doppel reads: none of it may ever be kept
PLACEHOLDERS = {
    "whatsapp": [
        r"<Media omitted>|<Медиа отсутствуют>|<Medien ausgeschlossen>|<Multimedia omitido>|<Médias omis>",
        r"(?:image|video|audio|sticker|GIF|document|Contact card) omitted$|Dokument weggelassen|Bild weggelassen"
        r"|document manquant|документ отсутствует|изображение отсутствует",
        r"<attached: [^>]*>|<‎?attached>|< attached: .* >|<adjunto: [^>]*>|<Anhang: [^>]*>",
        r"\((?:file attached|Datei angehängt|fichier joint|archivo adjunto|ファイル添付)\)",
        r"^null$", r"^(?:Missed voice call|Missed video call|Zmeškaný hovor|Пропущенный аудиозвонок)",
        r"^(?:This message was deleted|You deleted this message|This message has been deleted"
        r"|Waiting for this message|Данное сообщение удалено|Tato zpráva byla odstraněna)\.?",
        r"^(?:location|Standort): https?://|^live location shared$",
        r"Messages and calls are end-to-end encrypted",
    ],
    "telegram": [r"^\((?:File|Photo) (?:not included|exceeds maximum size)\. Change data exporting settings",
                 r"^\[(?:photo|sticker|voice_message|video_file|video_message|animation|audio_file|file|poll"
                 r"|location|contact|phone_call|[a-z_]+_information)\]$"],
    "meta": [
        r"(?:^|\s)sent (?:an attachment|a photo|a video|a voice message|a GIF|a sticker|a link)\.$",
        r"hat einen Anhang gesendet\.$|a envoyé une pièce jointe\.$|envió un archivo adjunto\.$",
        r"(?:^|\s)shared a link\.$", r"[Rr]eacted .{1,16}? to your message ?$", r"^Liked a message$",
        r"created a poll: |voted for \".*\" in the poll\.$",
        r"started a video chat\.?$|^The video chat ended\.$|missed your call\.$",
        r"changed the group photo\.$|named the group |set the nickname for |unsent a message\.$",
        r"Ã|Ð|â\x80",  # mojibake left unrepaired
    ],
    "line": [r"^\[(?:Sticker|Photo|Video|Voice message|File|スタンプ|写真|動画|ボイスメッセージ)\]$", r"^☎",
             r"unsent a message|メッセージの送信を取り消し"],
    "signal": [r"!?\[[^\]]*\]\(\./media/", r"\((?:media|attachment) not exported\)", r"^\(This message was deleted\)$",
               r"^\(- .* -\)$", r"^\(\( .* \)\)$", r"^(?:Missed|Incoming|Outgoing) (?:voice |video )?call"],
    "wechat": [r"^(?:图片|语音|视频|\[动画表情\]|你撤回了一条消息|通话时长)", r"<msg>|<appmsg"],
    "imessage": [r"\ufffc", r"^(?:Liked|Loved|Disliked|Laughed at|Emphasized|Questioned|Removed a like from) “"],
    "discord": [r"^(?:Started a call that lasted \d+ minutes|Pinned a message|Joined the server|Added a recipient"
                r"|Removed a recipient|Changed the channel (?:name|icon))\.$"],  # DiscordChatExporter writes them
    "location": [r"^https?://(?:maps\.app\.goo\.gl|maps\.google\.com|www\.google\.com/maps)\S*$"],
}
PLACEHOLDER = re.compile("|".join(f"(?:{p})" for patterns in PLACEHOLDERS.values() for p in patterns))


def _kept(folder):
    return [m for s in _sessions(folder) for _, messages in s["turns"] for m in messages]


def _prepare(path, folder, *args):
    result = run("prepare", path, "-o", folder, *args)
    assert result.exit_code == 0, result.output
    kept = _kept(folder)
    assert [m for m in kept if PLACEHOLDER.search(m)] == []
    return kept, json.loads((folder / "stats.json").read_text())["dropped"]


def test_the_table_matches_each_app_s_own_placeholders():
    written = [f"{LRM}<attached: 00000046-Some file.txt>", f"Some file.txt {LRM}document omitted", "null",
               "IMG-20231230-WA0001.jpg (file attached)", "Missed voice call", "Waiting for this message",
               "Max Orlov sent an attachment.", "Reacted ❤ to your message ", "[Sticker]", "☎ Missed call",
               "![a.jpg](./media/a.jpg)  ", "图片", "\ufffc", "Liked “yo”", "[photo]", "https://maps.app.goo.gl/x1",
               "Started a call that lasted 2 minutes."]
    assert [w for w in written if not PLACEHOLDER.search(w)] == []
    assert [w for w in ("yo", "i sent an attachment to your email", "go to maps.app please", "null and void")
            if PLACEHOLDER.search(w)] == []


# --- Messenger and Instagram -------------------------------------------------------------------------------------

def _meta_thread(tmp_path, messages, people=("Max Orlov", "Lena Volkova"), title="Max Orlov"):
    thread = tmp_path / "messages" / "inbox" / "maxorlov_123"
    thread.mkdir(parents=True)
    base = 1703973541000
    items = []
    for second, who, content, extra in messages:
        item = {"sender_name": _mojibake(who), "timestamp_ms": base + second * 1000, **extra}
        if content is not None:
            item["content"] = _mojibake(content)  # as Meta writes every string
        items.append(item)
    (thread / "message_1.json").write_text(json.dumps({
        "participants": [{"name": _mojibake(p)} for p in people], "messages": items[::-1], "title": title,
        "thread_path": "inbox/maxorlov_123"}))
    return thread


MAX_O, LENA = "Max Orlov", "Lena Volkova"
MESSENGER = [
    (0, MAX_O, "yo", {}), (10, MAX_O, "gym later? café", {}),
    (20, MAX_O, "Max Orlov sent an attachment.", {"files": [{"uri": "f.pdf"}]}),
    (21, LENA, "You sent an attachment.", {}),  # Instagram: the owner's own, as "You"
    (22, MAX_O, "Max Orlov sent a photo.", {}), (23, MAX_O, "Max Orlov sent a voice message.", {}),
    (24, MAX_O, "Max Orlov sent a video.", {}), (25, MAX_O, "Max sent a GIF.", {}),
    (26, MAX_O, "Max Orlov sent a sticker.", {}),
    (27, MAX_O, "Max Orlov shared a link.", {"share": {"link": "https://example.com/gym"}}),
    (28, MAX_O, "https://maps.app.goo.gl/x1", {"share": {"link": "https://maps.app.goo.gl/x1"}}),  # a location
    (30, LENA, "Lena Volkova reacted ❤ to your message", {}), (31, LENA, "Reacted 😂 to your message ", {}),
    (32, LENA, "Liked a message", {}),
    (33, MAX_O, "Max Orlov created a poll: Where do we go?", {}),
    (34, LENA, 'Lena Volkova voted for "Gym" in the poll.', {}),
    (35, MAX_O, "Max Orlov started a video chat.", {"call_duration": 0}), (36, MAX_O, "The video chat ended.", {}),
    (37, MAX_O, "Max Orlov missed your call.", {}),
    (38, LENA, "Lena Volkova changed the group photo.", {}), (39, LENA, "Lena Volkova named the group Gym.", {}),
    (40, LENA, "Lena Volkova set the nickname for Max Orlov to Maks.", {}),
    (41, MAX_O, "Max Orlov unsent a message.", {}),
    (42, MAX_O, None, {"type": "Subscribe", "users": [{"name": "Ann Lee"}]}),
    (50, LENA, "i sent an attachment to your email", {}),  # a message that merely says such words
    (55, LENA, "го)) ❤", {}), (56, LENA, "meet here https://maps.app.goo.gl/x1", {}),
]


def test_messenger_notices_and_placeholders_are_dropped_after_the_mojibake_is_repaired(tmp_path):
    _, dropped = _prepare(_meta_thread(tmp_path, MESSENGER).parent, tmp_path / "data", "--eval-fraction", "0")
    assert _sessions(tmp_path / "data") == [{"start": 1703973541, "turns": [
        (MAX_O, ["yo", "gym later? café"]),
        (LENA, ["i sent an attachment to your email", "го)) ❤", "meet here https://maps.app.goo.gl/x1"])]}]
    # media: 7 placeholders, the shared link, the location; service: 3 reactions, 2 polls, 3 calls, 3 group
    # notices, the unsent message, the join (an older export's Subscribe)
    assert dropped == {"media": 9, "service": 13}


@pytest.mark.parametrize(("notice", "kind"), [  # as seen in real exports and other readers
    ("Hans cleared his own nickname.", ("service", "group")), ("Hans cleared the nickname for Lena.",
                                                              ("service", "group")),
    ("Hans set their own nickname to Joe.", ("service", "group")), ("You set your nickname to John.",
                                                                   ("service", "group")),
    ("Hans changed the chat theme.", ("service", "group")), ("Hans set the emoji to 🍺.", ("service", "group")),
    ("Hans turned off member approval. Anyone with the link can join the group.", ("service", "group")),
    ("Hans started a plan.", ("service", "plan")), ("Hans named the plan Saturday Hangout.", ("service", "plan")),
    ("Hans joined the video chat.", ("service", "call")), ("Hans started a call.", ("service", "call")),
    ("The call ended.", ("service", "call")), ("Hans called you.", ("service", "call")),
    ("Hans missed a video chat with Lena.", ("service", "call")),
    ("You are now connected on Messenger.", ("service", "group")),
    ("Hans hat einen Anhang gesendet.", ("media", "attachment")),  # German, as Meta writes it for a shared link
    ("Du hast einen Anhang gesendet.", ("media", "attachment")),
    ("Hans a envoyé une pièce jointe.", ("media", "attachment")), ("Hans envió un archivo adjunto.",
                                                                    ("media", "attachment")),
    ("Hans hat einen Anhang gesendet. Schau mal", None), ("Peter sent an attachment.", None),  # Peter is no one here
])
def test_messenger_notice_wordings_in_each_language(notice, kind):
    assert meta_notice(notice, subjects(["Hans", "Lena Volkova"])) == kind


def test_a_messenger_notice_in_german_is_media_in_the_dataset(tmp_path):
    thread = _meta_thread(tmp_path, [(0, "Hans", "Na?", {}), (5, "Hans", "Hans hat einen Anhang gesendet.",
                                                               {"share": {"link": "url", "share_text": "x"}}),
                                     (9, LENA, "Nächste Woche!", {})], ("Hans", LENA), "Hans")
    kept, dropped = _prepare(thread, tmp_path / "data", "--eval-fraction", "0")
    assert kept == ["Na?", "Nächste Woche!"] and dropped == {"media": 1}


# --- Discord and Telegram: a shared location is media in every reader ---------------------------------------------

def test_a_location_is_media_in_discord_as_in_telegram(tmp_path, write):
    export = _discord(name="Max Orlov")
    location = dict(export["messages"][0], id="7", content="https://maps.app.goo.gl/x1",
                    timestamp="2023-12-30T21:59:07.123+00:00")
    pasted = dict(location, id="8", content="here: https://maps.app.goo.gl/x1",
                  timestamp="2023-12-30T21:59:08.123+00:00")
    system = [dict(location, id=str(9 + n), type=kind, content=content, timestamp=f"2023-12-30T21:59:1{n}.1+00:00")
              for n, (kind, content) in enumerate([("Call", "Started a call that lasted 2 minutes."),
                                                   ("ChannelPinnedMessage", "Pinned a message."),
                                                   ("RecipientAdd", "Added a recipient.")])]
    export["messages"] += [location, pasted, *system]
    path = tmp_path / "dm.json"
    path.write_text(json.dumps(export), encoding="utf-8")
    kept, dropped = _prepare(path, tmp_path / "discord", "--eval-fraction", "0")
    assert kept == ["yo", "gym later?", "го))", "here: https://maps.app.goo.gl/x1"]
    assert dropped == {"bot": 1, "media": 2, "service": 4}  # media: the attachment and the location
    telegram = write(full_export([personal(MAX, [*dialogue(), msg(4, 40, MAX, "", location_information={
        "latitude": 52.5, "longitude": 13.4})])]))
    kept, dropped = _prepare(telegram, tmp_path / "telegram", "--eval-fraction", "0")
    assert kept == ["yo", "gym later?", "го))"] and dropped == {"media": 1}
    assert is_location("https://www.google.com/maps/place/Gym") and not is_location("https://example.com/maps")


def test_telegram_placeholders_are_dropped(write, tmp_path):
    missing = "(File not included. Change data exporting settings to download.)"
    messages = [*dialogue(), msg(4, 40, MAX, "", photo=missing, width=1, height=1),
                msg(5, 41, MAX, "", file=missing, media_type="voice_message", mime_type="audio/ogg"),
                msg(6, 42, MAX, "", file=missing, media_type="sticker"),
                dict(msg(7, 43, MAX, ""), type="service", actor="Max Orlov", actor_id=f"user{MAX}",
                     action="phone_call", discard_reason="missed"),
                msg(8, 44, ME, "ok")]
    kept, dropped = _prepare(write(full_export([personal(MAX, messages)])), tmp_path / "data")
    assert kept == ["yo", "gym later?", "го))", "ok"] and dropped == {"media": 3, "service": 1}


@pytest.mark.parametrize("general", [False, True], ids=["fast", "general"])
def test_telegram_messages_without_ids_give_the_same_sessions_in_both_readers(tmp_path, general):
    """Converted files write no `id`: both readers read 0, which preparing gives a content id, so no message after
    the first is taken for a copy of it. The general reader is reached by a key order the fast one does not know."""
    messages = [{k: v for k, v in m.items() if k != "id"} for m in dialogue() + dialogue(start=90000)]
    chat = personal(MAX, messages)
    if general:
        chat = {"messages": chat.pop("messages"), **chat}
    from doppel.readers.synthetic import write_export
    from doppel.readers.telegram import UnusualLayout, iter_export

    path = write_export(tmp_path / "result.json", full_export([chat]))
    if general:
        with pytest.raises(UnusualLayout):
            list(iter_export(path))
    assert [m.id for m in iter_export(path, general=general)][1:] == [0] * 6
    _prepare(path, tmp_path / "data", "--eval-fraction", "0")
    assert _sessions(tmp_path / "data") == [
        {"start": 1_700_000_000, "turns": [("Max Orlov", ["yo", "gym later?"]), ("Me Owner", ["го))"])]},
        {"start": 1_700_090_000, "turns": [("Max Orlov", ["yo", "gym later?"]), ("Me Owner", ["го))"])]}]


# --- the other readers, over the fixtures of their own tests -------------------------------------------------------

DIALOGUE = ["yo", "gym later?\nthe one near the station", "го))"]
LATER = ["happy new year lol", "и тебя))"]


@pytest.mark.parametrize(("kind", "texts", "dropped"), [
    ("signal", [*DIALOGUE[:2], "look [here](https://example.com/gym)", "го))", "the one with the pool", "👍", *LATER],
     {"media": 2, "service": 1, "empty": 1}),  # 👍: a sticker's emoji, as Telegram's
    ("line-en", [*DIALOGUE, 'say "hi"\nto Ann', *LATER], {"media": 2, "service": 2, "empty": 1}),
    ("line-ja", [*DIALOGUE, 'say "hi"\nto Ann', *LATER], {"media": 2, "service": 2, "empty": 1}),
    ("wechat-pywxdump", [*DIALOGUE, "happy new year lol [捂脸]", "и тебя))"],
     {"media": 3, "service": 2, "unsupported": 1}),
    ("wechat-memotrace", [*DIALOGUE, "happy new year lol [捂脸]", "и тебя))"],
     {"media": 3, "service": 2, "unsupported": 1}),
    ("imessage", [*DIALOGUE, "see you at 8", "the gym", LONG, "и тебя))"], {"media": 5, "service": 3, "empty": 1}),
])
def test_no_placeholder_of_signal_line_wechat_or_imessage_is_kept(tmp_path, kind, texts, dropped):
    if kind == "signal":
        path = signal_export(tmp_path, text=CHAT_MD).parent.parent
    elif kind.startswith("line"):
        path = tmp_path / "[LINE] Chat with Max Orlov.txt"
        path.write_text(LINE_ENGLISH if kind == "line-en" else LINE_JAPANESE, encoding="utf-8")
    elif kind.startswith("wechat"):
        path = (pywxdump if kind == "wechat-pywxdump" else memotrace)(tmp_path).parent
    else:
        path = chat_db(tmp_path)
    assert _prepare(path, tmp_path / "data", "--eval-fraction", "0") == (texts, dropped)


def test_jsonl_drops_empty_texts(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [("Max Orlov", "yo"), ("Max Orlov", ""), ("Max Orlov", "gym later?"), ("Lena Volkova", "  "),
            ("Lena Volkova", "го))")]
    path.write_text("".join(json.dumps({"chat": "Max Orlov", "sender": who, "time": 1703973541 + n, "text": text,
                                        "me": who == "Lena Volkova"}) + "\n" for n, (who, text) in enumerate(rows)),
                    encoding="utf-8")
    kept, dropped = _prepare(path, tmp_path / "data", "--eval-fraction", "0")
    assert kept == ["yo", "gym later?", "го))"] and dropped == {"empty": 2}


# --- WhatsApp: one placeholder at a time, in the layout that writes it ---------------------------------------------

def _android(line):
    return (f"12/30/23, 9:59{NNBSP}PM - Max Orlov: yo\n12/30/23, 9:59{NNBSP}PM - Max Orlov: gym later?\n"
            f"12/30/23, 10:00{NNBSP}PM - Max Orlov: {line}\n12/30/23, 10:01{NNBSP}PM - Lena Volkova: го))\n")


def _ios(line):
    return (f"[30.12.23, 21:59:01] Max Orlov: yo\n[30.12.23, 21:59:30] Max Orlov: gym later?\n"
            f"[30.12.23, 22:00:00] Max Orlov: {line}\n[30.12.23, 22:01:00] Lena Volkova: го))\n")


WHATSAPP = [  # (id, chat text, kept besides the dialogue, dropped)
    ("android-media-omitted", _android("<Media omitted>"), [], {"media": 1}),
    ("android-media-omitted-ru", _android("<Медиа отсутствуют>"), [], {"media": 1}),
    ("ios-image-omitted", _ios(f"{LRM}image omitted"), [], {"media": 1}),
    ("ios-document-omitted", _ios(f"Some file.txt {LRM}document omitted"), [], {"media": 1}),
    ("ios-dokument-weggelassen", _ios(f"Some file.txt {LRM}Dokument weggelassen"), [], {"media": 1}),
    ("ios-attached", _ios(f"{LRM}<attached: 00000046-Some file.txt>"), [], {"media": 1}),
    ("android-file-attached", _android("IMG-20231230-WA0001.jpg (file attached)"), [], {"media": 1}),
    ("android-caption", _android("IMG-20231230-WA0001.jpg (file attached)\nat the gym"), ["at the gym"],
     {}),
    ("android-media-omitted-caption", _android("<Media omitted>\nat the gym"), ["at the gym"], {}),
    ("android-datei-angehaengt", _android("IMG-20231230-WA0001.jpg (Datei angehängt)"), [], {"media": 1}),
    ("android-null", _android("null"), [], {"media": 1}),
    ("android-missed-voice-call", _android("Missed voice call"), [], {"service": 1}),
    ("ios-missed-voice-call", _ios(f"{LRM}Missed voice call"), [], {"service": 1}),
    ("android-deleted", _android("This message was deleted"), [], {"empty": 1}),
    ("android-you-deleted", _android("You deleted this message"), [], {"empty": 1}),
    ("ios-deleted", _ios(f"{LRM}This message was deleted."), [], {"empty": 1}),
    ("android-waiting", _android("Waiting for this message"), [], {"empty": 1}),
    ("android-location", _android("location: https://maps.google.com/?q=52.5,13.4"), [], {"media": 1}),
    ("android-live-location", _android("live location shared"), [], {"media": 1}),
]

@pytest.mark.parametrize(("text", "caption", "dropped"), [
    pytest.param(text, caption, dropped, id=case) for case, text, caption, dropped in WHATSAPP])
def test_no_whatsapp_placeholder_is_kept(tmp_path, text, caption, dropped):
    path = tmp_path / "WhatsApp Chat with Max Orlov.txt"
    path.write_text(text, encoding="utf-8")
    kept, got = _prepare(path, tmp_path / "data", "--eval-fraction", "0")
    assert kept == ["yo", "gym later?", *caption, "го))"] and got == dropped
