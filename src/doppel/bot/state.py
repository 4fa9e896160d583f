"""What the bot must not forget across a restart: RUN/bot/bot<ID>.json, one file per bot, rewritten whole and
atomically (a temporary file renamed over it) after every change.

An update is acknowledged to Telegram (the next getUpdates offset) only once what it brought is in this file: a
message to answer in its chat's inbox, a command's effect, a reply in an outbox. An outbox is emptied one Bot API
call at a time, each call removed once Telegram accepted it, so a restart sends what is left and nothing twice; only
the one call in flight at the moment of a crash may go again. A generated reply is in the file, whole, before its
first message goes out.

The file holds the conversations' text (as `doppel chat` holds them in memory): it is written readable by its owner
only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppel.errors import BotError
from doppel.records import Turn

KEEP_TURNS = 200  # turns of history kept per chat; far more than a prompt holds


@dataclass
class Chat:
    """One chat: where its messages go, who plays and who writes, and its work not yet done.

    `inbox` holds what arrived and is not yet in the history: {"text", "owner"} (owner: written by the owner, in
    business mode by hand or sent from a draft) or {"reset": true}. `outbox` holds Bot API calls to make, in order:
    {"op": "send" | "edit" | "answer", …}.
    """

    chat_id: int
    business: str | None = None  # the business connection its messages go through
    persona: str | None = None  # None: the owner's own chat with the bot in business mode, where no persona talks
    user: str | None = None
    contact: dict[str, Any] = field(default_factory=dict)  # business: the contact's id, username and name
    owner_at: float = 0.0  # business: when the owner last wrote here by hand (unix seconds)
    history: list[list[Any]] = field(default_factory=list)  # [speaker, [messages]] per turn
    inbox: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)

    def turns(self) -> list[Turn]:
        return [Turn(speaker, "", tuple(messages), False) for speaker, messages in self.history]

    def keep(self, turns: list[Turn]) -> None:
        self.history = [[t.speaker, list(t.messages)] for t in turns if t.messages][-KEEP_TURNS:]


@dataclass
class State:
    """The bot's memory across restarts (see the module's docstring)."""

    path: Path
    offset: int = 0  # every update below it is in this file
    refused: set[int] = field(default_factory=set)  # users already told that the bot is not for them
    chats: dict[str, Chat] = field(default_factory=dict)
    drafts: dict[str, dict[str, Any]] = field(default_factory=dict)  # business: suggested replies by number
    next_draft: int = 1
    editing: str | None = None  # the draft whose corrected text the owner's next message is
    connections: dict[str, dict[str, Any]] = field(default_factory=dict)  # business connections by id

    @classmethod
    def load(cls, path: Path) -> State:
        """The state in `path`, or a new one; `BotError` for a file that is not one."""
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, data["offset"], set(data["refused"]),
                       {key: Chat(**chat) for key, chat in data["chats"].items()}, data["drafts"],
                       data["next_draft"], data["editing"], data["connections"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BotError(f"{path} is damaged ({type(exc).__name__}: {exc}); move it away to start over (replies "
                           "not yet sent are lost then)") from None

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "refused": sorted(self.refused),
                "chats": {key: vars(chat) for key, chat in self.chats.items()}, "drafts": self.drafts,
                "next_draft": self.next_draft, "editing": self.editing, "connections": self.connections}

    def save(self) -> None:
        """Replace the file at once: a crash leaves the old state or the new, never half of one."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
