"""The records every stage shares: a session of turns in one chat, as the dataset stores it.

A leaf module: the readers produce these, training, chat, serving and evaluation consume them, and nothing
here imports another part of doppel. A session's records are msgspec structs: a dataset line is a `Session`
encoded as it is (fields in order), and `prepare` builds about a million of them per million messages, which a
frozen dataclass makes ten times slower.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec


class ChatRef(msgspec.Struct, frozen=True):
    """The chat a session comes from."""

    id: int
    name: str
    type: str | None = None  # the export's chat type, e.g. "personal_chat"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "type": self.type}


class Turn(msgspec.Struct, frozen=True):
    """Consecutive messages of one speaker; `train`: whether they are a training target."""

    speaker: str
    speaker_id: str
    messages: tuple[str, ...]
    train: bool


def spoken(speaker: str, messages: Iterable[str]) -> Turn:
    """A turn said in a conversation with the model (chat, serve, the bot, evaluation): no id, not a target."""
    return Turn(speaker, "", tuple(messages), False)


class Session(msgspec.Struct, frozen=True):
    """A conversation without a long silence: `start`/`end` in unix seconds, `id` "chat:first message"."""

    id: str
    chat: ChatRef
    start: int
    end: int
    turns: tuple[Turn, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "chat": self.chat.to_json(), "start": self.start, "end": self.end,
                "turns": [{"speaker": t.speaker, "speaker_id": t.speaker_id,
                           "messages": list(t.messages), "train": t.train} for t in self.turns]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Session:
        turns = tuple(Turn(t["speaker"], t["speaker_id"], tuple(t["messages"]), bool(t["train"]))
                      for t in data["turns"])
        chat = data["chat"]
        return cls(data["id"], ChatRef(chat["id"], chat["name"], chat.get("type")), data["start"], data["end"],
                   turns)


@dataclass(frozen=True, slots=True)
class MemoryEntry:
    """One remembered piece of conversation: a past session, or a window of a long one (memory/).

    `lines` are (speaker, message) pairs, each message on one line; `split` is where its session is: "train",
    "eval", or "remembered" (a conversation held with the model).
    """

    id: str
    session: str
    chat: int
    chat_name: str
    speakers: tuple[str, ...]
    start: int
    end: int
    split: str
    lines: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        """What is searched: the messages, one a line (names left out: they are in every entry of a chat)."""
        return "\n".join(message for _, message in self.lines)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "session": self.session, "chat": {"id": self.chat, "name": self.chat_name},
                "speakers": list(self.speakers), "start": self.start, "end": self.end, "split": self.split,
                "lines": [list(line) for line in self.lines]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemoryEntry:
        return cls(data["id"], data["session"], data["chat"]["id"], data["chat"]["name"], tuple(data["speakers"]),
                   data["start"], data["end"], data["split"], tuple((s, m) for s, m in data["lines"]))
