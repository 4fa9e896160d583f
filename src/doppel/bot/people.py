"""Who is who in Telegram, and who may hear what: the owner, the people allowed, which of the run's speakers a
Telegram user is.

The consent rule lives here: the people whose messages trained the model did not agree to be imitated, so doppel
plays a contact only for the owner; everyone else, and every business chat, gets the owner's persona. And in a chat
with anyone but the owner, the memory recalls only conversations among the people of that chat, known by what no
one can set for themselves: the Telegram id Telegram gives with each message, as the export holds it. A name, or
`/as`, chooses whom a writer plays, never whose conversations they hear of; a writer whose id the export lacks
gets no recall.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from doppel.config import BotConfig
from doppel.errors import BotError
from doppel.memory.index import TOP
from doppel.memory.recall import Recall, chat_query
from doppel.readers import telegram_ids
from doppel.records import MemoryEntry, Turn
from doppel.render import fit_memory
from doppel.serving.chat import check_name, pick_people

if TYPE_CHECKING:
    from doppel.run import Run


@dataclass(frozen=True)
class People:
    owner_name: str  # the owner's persona
    persona: str  # who answers the owner (--persona, else the owner)
    owner_id: int | None  # the owner's Telegram account, when known
    owner_username: str | None
    ids: frozenset[int]  # --allow
    usernames: frozenset[str]  # --allow, lowercased, without @
    speakers: tuple[str, ...]  # the run's, most active first
    telegram: tuple[tuple[int, str], ...]  # (Telegram id, speaker) where the export had the id

    def is_owner(self, user_id: int, username: str | None = None) -> bool:
        return user_id == self.owner_id or (self.owner_username is not None
                                            and (username or "").lower() == self.owner_username)

    def allowed(self, user_id: int, username: str | None) -> bool:
        """The owner, or a user --allow names."""
        return self.is_owner(user_id, username) or user_id in self.ids or (username or "").lower() in self.usernames

    def speaker(self, user_id: int, name: str, persona: str) -> str:
        """The run's speaker a Telegram user is: by id where the export had it, else by full name, else the most
        active speaker other than `persona`."""
        others = [s for s in self.speakers if s != persona]
        by_id = dict(self.telegram).get(user_id)
        if by_id is not None and by_id in others:
            return by_id
        named = {s.lower(): s for s in others}.get(name.strip().lower())
        return named or pick_people(list(self.speakers), self.owner_name, persona)[1]

    def recalled(self, user_id: int) -> frozenset[str] | None:
        """Whose conversations a chat of the owner with Telegram user `user_id` may recall: the owner's and the
        speaker's whom the export knows by that id; None (no recall) when it does not know the id."""
        speaker = dict(self.telegram).get(user_id)
        return None if speaker is None else frozenset({self.owner_name, speaker})


def people_of(run: Run, cfg: BotConfig) -> People:
    """Who is who for `run` under `cfg`; `BotError` when a setting cannot be honoured."""
    stats = run.stats
    owner = run.owner
    if stats is None or owner is None:
        raise BotError(f"{run.path}: its dataset does not say which speaker is you; prepare it again with --me "
                       "(the bot plays you, and nobody else but for you)")
    owner_id, owner_username = _account(run, cfg)
    persona = owner
    if cfg.persona is not None:
        persona = check_name(cfg.persona, run.personas(), "persona")
        if persona != owner and owner_id is None and owner_username is None:
            raise BotError(f"--persona {persona} is played only for you, and the export does not say which Telegram "
                           "account is yours: give --owner YOUR_ID")
    if cfg.business and owner_id is None and owner_username is None:
        raise BotError("business mode answers only your own account, and the export does not say which it is: "
                       "give --owner YOUR_ID")
    if not cfg.business and not cfg.allow and owner_id is None and owner_username is None:
        raise BotError("nobody may talk with the bot: give --allow ID_OR_USERNAME (or --owner YOUR_ID)")
    ids = frozenset(int(a) for a in cfg.allow if a.isdigit())
    usernames = frozenset(a.lstrip("@").lower() for a in cfg.allow if not a.isdigit())
    telegram = tuple((n, s.name) for s in stats.speakers if (n := telegram_ids.user_id(s.id)) is not None)
    return People(owner, persona, owner_id, owner_username, ids, usernames, tuple(stats.speaker_names), telegram)


def _account(run: Run, cfg: BotConfig) -> tuple[int | None, str | None]:
    """(id, username) of the owner's Telegram account: --owner, else the export owner's id."""
    if cfg.owner is not None:
        return (int(cfg.owner), None) if cfg.owner.isdigit() else (None, cfg.owner.lstrip("@").lower())
    found = telegram_ids.user_id((run.stats.owner_id if run.stats else None) or "")
    return (found, None) if found is not None else (None, None)


class OwnRecall(Recall):
    """The memory of a chat with someone other than the owner: only past conversations among `people`, the
    speakers of the chat's Telegram ids (`People.recalled`), so that the bot never tells one contact what another
    wrote."""

    def __init__(self, recall: Recall, people: Collection[str]) -> None:
        """`recall`: the chat's own (`Recall.for_conversation`), narrowed to `people`."""
        super().__init__(recall.memory, recall.budget, recall.remember, recall.conversation, recall.before,
                         recall.scope)
        self.people = frozenset(people)

    def block(self, tokenizer: Any, history: Sequence[Turn], people: Collection[str],
              budget: int | None = None) -> tuple[list[int], list[MemoryEntry]]:
        """As `Recall.block`, among `self.people` whoever the conversation says talks (`people`: `/as` sets it)."""
        budget = self.budget if budget is None else budget
        if not history or budget <= 0:
            return [], []
        ranked = self.memory.search(chat_query(history), people=self.people, exclude={self.conversation},
                                    top=len(self.memory.entries))
        return fit_memory(tokenizer, [e for e in ranked if set(e.speakers) <= self.people][:TOP], budget)
