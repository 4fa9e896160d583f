"""Synthetic exports in Telegram Desktop's exact byte format (for the sample, tests and benchmarks).

`tdesktop_bytes` reproduces the writer's quirks: one-space indentation, control characters as the
invalid escape `\\xNN`, and U+2028/U+2029 as `\\u2028` followed by two stray bytes.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

_CONTROL = re.compile(rb"\\\\|\\u00([01][0-9a-f])")


def _quirk(match: re.Match[bytes]) -> bytes:
    if match.group(1) is None:
        return match.group(0)
    return b"\\x" + match.group(1).upper()


def tdesktop_bytes(obj: Any) -> bytes:
    """Serialize like Telegram Desktop, invalid bytes included."""
    data = json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")
    data = _CONTROL.sub(_quirk, data)
    return data.replace("\u2028".encode(), b"\\u2028\x80\xa8").replace(
        "\u2029".encode(), b"\\u2029\x80\xa9")


def write_export(path: Path, export: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tdesktop_bytes(export) + b"\n")
    return path


def message(mid: int, ts: int, sender_id: int, name: str | None, text: Any, **extra: Any) -> dict:
    """A message object with Telegram Desktop's key order."""
    from datetime import UTC, datetime

    out: dict[str, Any] = {"id": mid, "type": "message",
                           "date": datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                           "date_unixtime": str(ts), "from": name, "from_id": f"user{sender_id}"}
    out.update(extra)
    out["text"] = text
    plain = [{"type": "plain", "text": p} if isinstance(p, str) else p
             for p in (text if isinstance(text, list) else [text] if text else [])]
    out["text_entities"] = plain
    return out


# --- a large export for the prepare benchmark -------------------------------------------------

_WORDS = ("hey ok lol what are you doing tonight гулять пойдём))) да нет может быть 😂 good idea "
          "see you at the station tomorrow? sure thing sounds great не знаю").split()


def _large_messages(rng: random.Random, chat: int, count: int, owner: int, peer: int,
                    start_id: int, ts: int) -> Iterator[tuple[dict[str, Any], int]]:
    for i in range(count):
        ts += rng.choice((5, 20, 40, 90, 300, 900, 4000, 40000))
        mine = rng.random() < 0.5
        text = " ".join(rng.choices(_WORDS, k=rng.randint(1, 9)))
        sender, name = (owner, "Me Owner") if mine else (peer, f"Friend {chat}")
        yield message(start_id + i, ts, sender, name, text), ts


def write_large_export(handle: BinaryIO, messages: int, chats: int = 500, seed: int = 0) -> None:
    """Stream a full export of `messages` personal-chat messages spread over `chats` chats, laid out as Telegram
    Desktop writes it (a key a line, one space a level)."""
    rng = random.Random(seed)
    owner = 5000000001
    handle.write(b'{\n "about": "synthetic",\n "personal_information": {\n  "user_id": '
                 + str(owner).encode() + b',\n  "first_name": "Me",\n  "last_name": "Owner"\n },\n'
                 b' "chats": {\n  "about": "synthetic",\n  "list": [\n')
    per_chat = messages // chats
    ts = 1600000000
    for c in range(chats):
        count = per_chat + (1 if c < messages % chats else 0)
        peer = 6000000000 + c
        head = {"name": f"Friend {c}", "type": "personal_chat", "id": peer}
        handle.write((b",\n" if c else b"") + b"   " + tdesktop_bytes(head)[:-2].replace(
            b"\n", b"\n   ") + b',\n    "messages": [\n')
        for i, (msg, last) in enumerate(_large_messages(rng, c, count, owner, peer, c * 10**6, ts)):
            handle.write((b",\n" if i else b"") + b"     " + tdesktop_bytes(msg).replace(b"\n", b"\n     "))
            ts = last
        handle.write(b"\n    ]\n   }")
    handle.write(b"\n  ]\n }\n}\n")


def write_large_whatsapp(handle: BinaryIO, messages: int, seed: int = 0) -> None:
    """A WhatsApp chat export (Android, 24-hour clock, day first) of `messages` messages between two people."""
    from datetime import UTC, datetime

    rng = random.Random(seed)
    ts = 1600000000
    for _ in range(messages):
        ts += rng.choice((5, 20, 40, 90, 300, 900, 4000, 40000))
        who = "Me Owner" if rng.random() < 0.5 else "Friend 1"
        stamp = datetime.fromtimestamp(ts, UTC).strftime("%d.%m.%Y, %H:%M")
        handle.write(f"{stamp} - {who}: {' '.join(rng.choices(_WORDS, k=rng.randint(1, 9)))}\n".encode())


def write_large_discord(handle: BinaryIO, messages: int, seed: int = 0) -> None:
    """A DiscordChatExporter JSON export of a direct-message channel with `messages` messages, indented as
    DiscordChatExporter writes it (two spaces a level)."""
    from datetime import UTC, datetime

    rng = random.Random(seed)
    people = ({"id": "5000000001", "name": "me", "discriminator": "0000", "nickname": "Me Owner", "isBot": False},
              {"id": "6000000001", "name": "friend", "discriminator": "0000", "nickname": "Friend 1",
               "isBot": False})
    head = {"guild": {"id": "0", "name": "Direct Messages", "iconUrl": ""},
            "channel": {"id": "7000000001", "type": "DirectTextChat", "categoryId": None, "category": None,
                        "name": "Friend 1", "topic": None},
            "dateRange": {"after": None, "before": None}, "exportedAt": "2024-01-01T00:00:00+00:00"}
    handle.write(json.dumps(head, indent=2)[:-2].encode() + b',\n  "messages": [\n')
    ts = 1600000000
    for i in range(messages):
        ts += rng.choice((5, 20, 40, 90, 300, 900, 4000, 40000))
        item: dict[str, Any] = {"id": str(10**17 + i), "type": "Default",
                "timestamp": datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds"),
                "timestampEdited": None, "callEndedTimestamp": None, "isPinned": False,
                "content": " ".join(rng.choices(_WORDS, k=rng.randint(1, 9))),
                "author": people[rng.random() < 0.5], "attachments": [], "embeds": [], "stickers": [],
                "reactions": [], "mentions": []}
        handle.write((b",\n" if i else b"") + b"    "
                     + json.dumps(item, ensure_ascii=False, indent=2).replace("\n", "\n    ").encode())
    handle.write(f'\n  ],\n  "messageCount": {messages}\n}}\n'.encode())
