"""Writes examples/sample_export/result.json: a small full-account export with clearly different styles.

Lena (the owner) writes lowercase with bracket smileys "))"; Max writes English lowercase bursts with
"lol"; Sophie writes one tidy, punctuated message with 🙂; Dmitry writes long Russian messages
with questions. Each contact tells facts (a cat, a trip, a project's deadline) that are asked about in later
sessions, the newest included. Around them: a group with two different "Alex", a bot, a channel, Saved Messages,
Telegram's 777000 chat, a deleted account, stickers, media, forwards, service messages, contact
details, and the invalid bytes Telegram Desktop really writes. Run: python examples/make_sample.py
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from doppel.readers.synthetic import message, write_export

OWNER, MAX, SOPHIE, DMITRY, ALEX_R, ALEX_2, GONE, BOT = (
    700100200, 700100301, 700100302, 700100303, 700100304, 700100305, 700100306, 700100400)
NAMES = {OWNER: "Lena Volkova", MAX: "Max Orlov", SOPHIE: "Sophie Martin", DMITRY: "Dmitry Sokolov",
         ALEX_R: "Alex Romero", ALEX_2: "Alex", GONE: None, BOT: "WeatherBot"}

STYLE: dict[int, dict[str, list[str]]] = {
    OWNER: {
        "open": ["привет))", "ты где?", "hey)) u free tonight?", "слушай", "ну что там"],
        "reply": ["ага))", "да, давай))", "ок)", "ахах))", "не, я занята(", "го))", "ща буду",
                  "yes)) 7?", "ок ок))", "понял(а))", "хм, ну можно))", "круто))", "lol ok))"],
        "close": ["до завтра))", "пока)", "ок, до связи))", "bye))"],
    },
    MAX: {
        "open": ["yo", "gym later?", "bro you up", "yo yo", "ok hear me out"],
        "reply": ["lol", "nah", "bet", "ok", "wait what", "omg", "yeah", "lol same", "cant today",
                  "7 works", "u bringing the rope", "im starving", "dont be late lol", "true"],
        "close": ["cya", "later", "k bye lol"],
    },
    SOPHIE: {
        "open": ["Hi Lena! Are you around this weekend? 🙂", "Good morning! Quick question.",
                 "Hello! I found the book you mentioned."],
        "reply": ["That sounds lovely, thank you!", "Yes, Saturday works for me. 🙂",
                  "Of course. I will send you the address.", "I think so, but let me check.",
                  "Perfect, see you then!", "No worries at all.", "How was the trip? 🙂",
                  "Great idea. I will bring some snacks."],
        "close": ["Have a nice evening! 🙂", "Talk soon!", "Take care!"],
    },
    DMITRY: {
        "open": ["Привет! Как дела, что нового?", "Слушай, ты видела новости про поездку?",
                 "Добрый вечер! Есть минутка?"],
        "reply": ["Отлично, тогда договорились на субботу!", "А во сколько ты освободишься?",
                  "Я думаю, лучше поехать утром, пока не жарко.", "Ты уже купила билеты?",
                  "Хорошо, я всё организую и напишу тебе позже.", "Согласен, так будет удобнее!",
                  "Интересно, а сколько это будет стоить?"],
        "close": ["Ладно, до встречи!", "Спокойной ночи!", "Созвонимся завтра?"],
    },
}
BURST = {OWNER: (1, 2), MAX: (2, 4), SOPHIE: (1, 1), DMITRY: (1, 2)}

# Facts told once and asked about later, the newest sessions (held out) included: what memory is for. Per chat:
# session index → the turns that open that session (speaker, messages).
FACTS: dict[int, dict[int, list[tuple[int, list[str]]]]] = {
    MAX: {
        4: [(MAX, ["my cat persik is sick", "taking persik to the vet tomorrow"]), (OWNER, ["ой(( бедный"])],
        9: [(MAX, ["booked the climbing trip to kalymnos", "we fly june 14"]), (OWNER, ["ура))"])],
        15: [(OWNER, ["how's persik?))"]), (MAX, ["persik is fine now", "vet said its just a cold"])],
        24: [(OWNER, ["when do we fly to kalymnos?"]), (MAX, ["june 14", "dont forget the rope lol"])],
        39: [(OWNER, ["how's persik?"]), (MAX, ["persik is great", "he ate my sandwich lol"]),
             (OWNER, ["and kalymnos?))"]), (MAX, ["still june 14", "cant wait lol"])],
    },
    SOPHIE: {
        3: [(SOPHIE, ["I am flying to Porto on the 3rd of May for my sister's wedding. 🙂"]), (OWNER, ["wow)) congrats"])],
        14: [(OWNER, ["when r u flying to porto?))"]), (SOPHIE, ["On the 3rd of May! The wedding is on the 5th. 🙂"])],
        29: [(OWNER, ["how was porto?))"]), (SOPHIE, ["Porto was lovely, and the wedding was beautiful! 🙂"])],
    },
    DMITRY: {
        2: [(DMITRY, ["Мы сдаём проект «Северный мост» пятнадцатого марта, я весь в работе."]), (OWNER, ["удачи))"])],
        13: [(OWNER, ["как там Северный мост?)"]), (DMITRY, ["Дедлайн по «Северному мосту» всё ещё пятнадцатого марта!"])],
        29: [(OWNER, ["ну что, сдали мост?))"]), (DMITRY, ["Да! «Северный мост» сдали пятнадцатого марта, все довольны!"])],
    },
}


def _turn(rng: random.Random, who: int, part: str) -> list[str]:
    low, high = BURST[who]
    pool = STYLE[who][part] if part != "reply" else STYLE[who]["reply"]
    first = [rng.choice(pool)]
    return first + rng.sample(STYLE[who]["reply"], rng.randint(low, high) - 1)


def _chat(rng: random.Random, peer: int, sessions: int, first_id: int, ts: int) -> list[dict]:
    out: list[dict[str, Any]] = []
    mid = first_id
    for s in range(sessions):
        ts += rng.randint(3, 40) * 3600 + (86400 + 120 if s % 7 == 3 else 0)
        speakers = [OWNER, peer] if rng.random() < 0.5 else [peer, OWNER]
        n_turns = rng.randint(3, 7)
        told = FACTS.get(peer, {}).get(s, [])
        for who, texts in told:
            for text in texts:
                ts += rng.randint(4, 150)
                out.append(message(mid, ts, who, NAMES[who], text))
                mid += 1
        if told:  # the session goes on from there as any other
            speakers = [OWNER, peer] if told[-1][0] == peer else [peer, OWNER]
            n_turns = max(2, n_turns - len(told))
        for t in range(n_turns):
            who = speakers[t % 2]
            part = "open" if t == 0 and not told else "close" if t == n_turns - 1 else "reply"
            for text in _turn(rng, who, part):
                ts += rng.randint(4, 150)
                out.append(message(mid, ts, who, NAMES[who], text))
                mid += 1
    return out


def _quirks(rng: random.Random, ts: int) -> list[dict]:
    """A session with Max showing every filter: sticker, media, forward, service, PII, bad bytes."""
    m = message
    return [
        m(9001, ts, MAX, NAMES[MAX], "yo check this"),
        m(9002, ts + 5, MAX, NAMES[MAX], "", forwarded_from="Climbing News PT"),
        m(9003, ts + 9, OWNER, NAMES[OWNER], "", file="(File not included.)", media_type="sticker",
          sticker_emoji="😂"),
        m(9004, ts + 20, OWNER, NAMES[OWNER], "", photo="(File not included.)", width=1, height=1),
        m(9005, ts + 30, OWNER, NAMES[OWNER], "море))", photo="photos/p.jpg", width=1, height=1),
        {"id": 9006, "type": "service", "date": "2024-05-01T10:00:00",
         "date_unixtime": str(ts + 40), "actor": NAMES[MAX], "actor_id": f"user{MAX}",
         "action": "phone_call", "duration_seconds": 60, "text": "", "text_entities": []},
        m(9007, ts + 50, MAX, NAMES[MAX], ["call me ", {"type": "phone", "text": "+44 7700 900123"},
                                          " or ", {"type": "email", "text": "max@example.org"}]),
        m(9008, ts + 60, OWNER, NAMES[OWNER], "line one\u2028line two\x0bend"),
        {"id": 9009, "type": "unsupported"},
    ]


def build(seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    start = 1704067200  # 2024-01-01
    chats = [
        {"type": "saved_messages", "id": OWNER,
         "messages": [message(1, start, OWNER, NAMES[OWNER], "wifi: crimp-2024!")]},
        {"name": "Max", "type": "personal_chat", "id": MAX,
         "messages": _chat(rng, MAX, 40, 10000, start) + _quirks(rng, start + 400 * 86400)},
        {"name": "Sophie", "type": "personal_chat", "id": SOPHIE,
         "messages": _chat(rng, SOPHIE, 30, 20000, start)},
        {"name": "Dmitry", "type": "personal_chat", "id": DMITRY,
         "messages": _chat(rng, DMITRY, 30, 30000, start)},
        {"name": None, "type": "personal_chat", "id": GONE,
         "messages": [message(40001, start, GONE, None, "hi, is this Lena?"),
                      message(40002, start + 60, OWNER, NAMES[OWNER], "да, а кто это?))")]},
        {"name": "Climbing Crew 🧗", "type": "private_supergroup", "id": 1876543210,
         "messages": [message(1, start + 100, ALEX_R, NAMES[ALEX_R], "who's in for Sintra?"),
                      message(2, start + 130, ALEX_2, NAMES[ALEX_2], "me!"),
                      message(3, start + 150, OWNER, NAMES[OWNER], "я)) и Макс"),
                      message(4, start + 170, ALEX_R, NAMES[ALEX_R], "great, 8:30 at the station")]},
        {"name": "WeatherBot", "type": "bot_chat", "id": BOT,
         "messages": [message(50001, start, OWNER, NAMES[OWNER], "/start"),
                      message(50002, start + 1, BOT, NAMES[BOT], "Lisbon: 21°C, sunny")]},
        {"name": "Telegram", "type": "personal_chat", "id": 777000,
         "messages": [message(60001, start, 777000, "Telegram", "Login code: 12345. Do not give it")]},
    ]
    left = [{"name": "Climbing News PT", "type": "public_channel", "id": 1500000001,
             "messages": [message(70001, start, OWNER, NAMES[OWNER], "great route!")]}]
    return {"about": "Here is the data you requested.",
            "personal_information": {"user_id": OWNER, "first_name": "Lena", "last_name": "Volkova",
                                     "phone_number": "+44 7700 900999"},
            "chats": {"about": "This page lists all chats from this export.", "list": chats},
            "left_chats": {"about": "This page lists all chats you left.", "list": left}}


if __name__ == "__main__":
    path = write_export(Path(__file__).parent / "sample_export" / "result.json", build())
    print(f"wrote {path}")
