"""What the bot must not forget across a restart: RUN/bot/bot<ID>.json, one file per bot, rewritten whole and
atomically (a temporary file renamed over it) after every change.

An update is acknowledged to Telegram (the next getUpdates offset) only once what it brought is in this file: a
message to answer in its chat's inbox, a command's effect, a reply in an outbox. An outbox is emptied one Bot API
call at a time, each call removed once Telegram accepted it, so a restart sends what is left and nothing twice; only
the one call in flight at the moment of a crash may go again (the outboxes' calls go out one at a time across all
chats, api.py). A generated reply is in the file, whole, before its first message goes out.

The file holds the conversations' text (as `doppel chat` holds them in memory): it is written readable by its owner
only. Reading it checks every field's type (msgspec, against the types below) and that what it names is in it: a
damaged file is one line, and is left as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NotRequired, Required, TypedDict

import msgspec

from doppel.errors import BotError
from doppel.records import Turn, spoken

KEEP_TURNS = 200  # turns of history kept per chat; far more than a prompt holds


class Inbox(TypedDict, total=False):
    """What arrived in a chat: a message (`text`, `owner`: written by the owner) or a /reset (`reset`)."""

    text: str
    owner: bool
    reset: bool


class Op(TypedDict, total=False):
    """A Bot API call an outbox holds: send a message, edit one (a draft's), or answer a tap."""

    op: Required[Literal["send", "edit", "answer"]]
    chat_id: int
    text: str | None
    business: str | None  # the business connection a message goes through
    paced: bool  # typed for as long as a person would type it first
    draft: str  # the draft this message offers
    buttons: list[list[str]]  # [label, callback data] per button
    force_reply: bool
    message_id: int | None
    id: str  # the tap's


class Contact(TypedDict, total=False):
    """Who writes in a chat, as Telegram says (`owner`: bot mode, the owner)."""

    id: int
    username: str | None
    name: str | None
    owner: bool


class Draft(TypedDict):
    """A reply suggested to the owner: for which chat, in which chat it was offered, and what became of it.

    With feedback on (feedback.py), `context` is the chat's turns before the draft, (speaker, messages) each,
    kept until what the owner did with it is recorded; `answer` is what the owner wrote by hand in that chat after a
    Skip, recorded when the contact writes next (the owner's turn is whole then).
    """

    chat: str
    control: str
    name: str
    messages: list[str]
    text: str
    status: Literal["open", "sent", "skipped"]
    message_id: int | None
    context: NotRequired[list[tuple[str, list[str]]]]
    answer: NotRequired[list[str]]


class Connection(TypedDict):
    """A Telegram Business connection: its account, that account's chat with the bot, and whether it is the owner's."""

    user: int
    chat: int
    owner: bool


@dataclass
class Chat:
    """One chat: where its messages go, who plays and who writes, and its work not yet done.

    `inbox` holds what arrived and is not yet in the history (owner: written by the owner, in business mode by hand
    or sent from a draft); `outbox` holds the Bot API calls to make, in order.
    """

    chat_id: int
    business: str | None = None  # the business connection its messages go through
    persona: str | None = None  # None: the owner's own chat with the bot in business mode, where no persona talks
    user: str | None = None
    contact: Contact = field(default_factory=lambda: Contact())
    owner_at: float = 0.0  # business: when the owner last wrote here by hand (unix seconds)
    history: list[tuple[str, list[str]]] = field(default_factory=list)  # (speaker, messages) per turn
    inbox: list[Inbox] = field(default_factory=list)
    outbox: list[Op] = field(default_factory=list)

    def turns(self) -> list[Turn]:
        return [spoken(speaker, messages) for speaker, messages in self.history]

    def keep(self, turns: list[Turn]) -> None:
        self.history = [(t.speaker, list(t.messages)) for t in turns if t.messages][-KEEP_TURNS:]


@dataclass
class State:
    """The bot's memory across restarts (see the module's docstring)."""

    path: Path
    offset: int = 0  # every update below it is in this file
    refused: set[int] = field(default_factory=set)  # users already told that the bot is not for them
    chats: dict[str, Chat] = field(default_factory=dict)
    drafts: dict[str, Draft] = field(default_factory=dict)  # business: suggested replies by number
    next_draft: int = 1
    editing: str | None = None  # the draft whose corrected text the owner's next message is
    connections: dict[str, Connection] = field(default_factory=dict)  # business connections by id

    @classmethod
    def load(cls, path: Path) -> State:
        """The state in `path`, or a new one; `BotError` for a file that is not one (the file left as it is)."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise BotError(f"cannot read {path} ({exc.strerror or exc})") from None
        try:
            stored = msgspec.json.decode(raw, type=_Stored)
            state = cls(path, stored.offset, set(stored.refused), stored.chats, stored.drafts, stored.next_draft,
                        stored.editing, stored.connections)
            state._check()
        except (msgspec.DecodeError, ValueError) as exc:
            raise BotError(f"{path} is damaged ({exc}); move it away to start over (replies not yet sent are lost "
                           "then)") from None
        return state

    def _check(self) -> None:
        """`ValueError` for a name the file does not hold: a draft's chat, the draft being edited, a connection."""
        for number, draft in self.drafts.items():
            for key in (draft["chat"], draft["control"]):
                if key not in self.chats:
                    raise ValueError(f"draft {number} names chat {key!r}, which is not in the file")
        if self.editing is not None and self.editing not in self.drafts:
            raise ValueError(f"the draft being edited, {self.editing!r}, is not in the file")
        for key, chat in self.chats.items():
            if chat.business is not None and chat.business not in self.connections:
                raise ValueError(f"chat {key!r} names business connection {chat.business!r}, which is not in the file")

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


class _Stored(msgspec.Struct, forbid_unknown_fields=False):
    """The file, as `State.to_json` writes it: what `load` checks the types against."""

    offset: int
    refused: list[int]
    chats: dict[str, Chat]
    drafts: dict[str, Draft]
    next_draft: int
    editing: str | None
    connections: dict[str, Connection]
