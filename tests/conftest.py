"""Shared helpers: small exports written in Telegram Desktop's exact byte format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from doppel.synthetic import message, write_export

ME, MAX, ANN = 100, 201, 202
T0 = 1_700_000_000


def msg(mid: int, ts: int, who: int, text: Any = "hi", name: str | None = None, **extra: Any) -> dict:
    default = {ME: "Me Owner", MAX: "Max Orlov", ANN: "Ann Lee"}.get(who, f"User {who}")
    return message(mid, T0 + ts, who, name if name is not None else default, text, **extra)


def full_export(chats: list[dict], owner: int | None = ME, left: list[dict] | None = None) -> dict:
    out: dict[str, Any] = {"about": "Here is the data you requested."}
    if owner is not None:
        out["personal_information"] = {"user_id": owner, "first_name": "Me", "last_name": "Owner"}
    out["chats"] = {"about": "chats", "list": chats}
    if left is not None:
        out["left_chats"] = {"about": "left", "list": left}
    return out


def personal(peer: int, messages: list[dict], name: str | None = "Max") -> dict:
    return {"name": name, "type": "personal_chat", "id": peer, "messages": messages}


def dialogue(peer: int = MAX, start: int = 0, first_id: int = 1) -> list[dict]:
    """A two-turn exchange: peer says two messages, the owner answers."""
    return [msg(first_id, start, peer, "yo"), msg(first_id + 1, start + 10, peer, "gym later?"),
            msg(first_id + 2, start + 30, ME, "го))")]


@pytest.fixture
def write(tmp_path: Path):
    def _write(export: dict, name: str = "result.json") -> Path:
        return write_export(tmp_path / name, export)
    return _write


@pytest.fixture
def sample() -> Path:
    return Path(__file__).parent.parent / "examples" / "sample_export" / "result.json"
