"""Recalling: which entries open a conversation, the same way in training, evaluation and chat.

A training (or held-out) session is given the entries that best answer its first turn, among the sessions that
ended before it started (for training: training sessions only), its own people preferred. In chat, before each
reply, the query is the newest two turns, among every entry but the conversation itself. For a conversation of one
turn the two queries are the same, and both go through `render.fit_memory`, so the block is the same, byte for
byte, as the model saw in training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from typing import Any

from doppel.memory.index import TOP, Memory
from doppel.memory.text import keywords
from doppel.records import MemoryEntry, Session, Turn
from doppel.render import fit_memory

QUERY_TURNS = 2  # chat: the newest turns that make the query
RARE_SHARE = 0.05  # eval: a word in at most this share of the entries is rare


def _messages(turns: Sequence[Turn]) -> str:
    return "\n".join(m for turn in turns for m in turn.messages)


def session_query(session: Session) -> str:
    return _messages(session.turns[:1])


def chat_query(history: Sequence[Turn]) -> str:
    return _messages(history[-QUERY_TURNS:])


def for_sessions(memory: Memory, sessions: Sequence[Session], tokenizer: Any, budget: int,
                 splits: Collection[str] | None, progress: Callable[[int], None] | None = None
                 ) -> list[tuple[list[int], list[MemoryEntry]]]:
    """Each session's memory block (ids, entries): recalled by its first turn from the sessions of `splits` (None:
    all) that ended before it started."""
    found = memory.search_many([session_query(s) for s in sessions], [s.start for s in sessions], splits,
                               [{t.speaker for t in s.turns} for s in sessions], progress=progress)
    return [fit_memory(tokenizer, ranked, budget) for ranked in found]


class Recall:
    """A conversation's memory: the block before each reply, and (`remember`) the conversation kept afterwards.

    `scope` is who is talking (the API's `user`): the conversations remembered in one scope are recalled in that
    scope only; None is `doppel chat`'s and that of API requests without a `user`.
    """

    def __init__(self, memory: Memory, budget: int, remember: bool = False, conversation: str | None = None,
                 before: int | None = None, scope: str | None = None) -> None:
        self.memory, self.budget, self.remember, self.before = memory, budget, remember, before  # before: eval
        self.conversation = conversation or self.new_conversation()
        self.scope = scope

    @staticmethod
    def new_conversation(seed: str | None = None) -> str:
        """An id for a remembered conversation: random, or derived from `seed` (the same opening, the same id)."""
        import uuid

        key = hashlib.sha1(seed.encode()).hexdigest()[:16] if seed is not None else uuid.uuid4().hex[:16]
        return f"remembered:{key}"

    def reset(self) -> None:
        self.conversation = self.new_conversation()

    def block(self, tokenizer: Any, history: Sequence[Turn], people: Collection[str],
              budget: int | None = None) -> tuple[list[int], list[MemoryEntry]]:
        """(ids, entries) of the memory block before the next reply, in `budget` tokens (default: the recall's)."""
        budget = self.budget if budget is None else budget
        if not history or budget <= 0:
            return [], []
        ranked = self.memory.search(chat_query(history), before=self.before, people=people,
                                    exclude={self.conversation}, top=TOP, scope=self.scope)
        return fit_memory(tokenizer, ranked, budget)

    def keep(self, history: Sequence[Turn]) -> None:
        """Remember the conversation so far: the turns not yet remembered are added (memory/remembered.py)."""
        if not self.remember or not history:
            return
        self.memory.remember(self.conversation, history, self.scope)


def recall_turns(memory: Memory, sessions: Sequence[Session], rare_share: float = RARE_SHARE) -> dict[str, set[int]]:
    """{session id: indexes of its trained turns that mention something told in an earlier session of its chat}: a
    keyword found in at most `rare_share` of all entries (and at least one) and in an entry of the same chat that
    ended before the session started."""
    seen: dict[str, list[tuple[int, int]]] = {}  # keyword → (chat, end) of the entries holding it
    for entry in memory.entries:
        for word in set(keywords(entry.text)):
            seen.setdefault(word, []).append((entry.chat, entry.end))
    limit = max(1, int(rare_share * len(memory.entries)))
    out: dict[str, set[int]] = {}
    for session in sessions:
        for i, turn in enumerate(session.turns):
            if not turn.train:
                continue
            words = set(keywords("\n".join(turn.messages)))
            if any(len(seen.get(w, ())) <= limit and any(chat == session.chat.id and end < session.start
                                                         for chat, end in seen.get(w, ())) for w in words):
                out.setdefault(session.id, set()).add(i)
    return out
