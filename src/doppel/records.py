"""The records every stage shares: a session of turns in one chat, as the dataset stores it.

A leaf module: the readers produce these, training, chat, serving and evaluation consume them, and nothing
here imports another part of doppel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ChatRef:
    """The chat a session comes from."""

    id: int
    name: str
    type: str | None  # the export's chat type, e.g. "personal_chat"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "type": self.type}


@dataclass(frozen=True, slots=True)
class Turn:
    """Consecutive messages of one speaker; `train`: whether they are a training target."""

    speaker: str
    speaker_id: str
    messages: tuple[str, ...]
    train: bool


@dataclass(frozen=True, slots=True)
class Session:
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
