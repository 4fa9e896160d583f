"""Recalling: the memory block before a reply, the same way in training, evaluation and chat.

Before each reply, the query is the newest two turns (`chat_query`). In chat it searches every entry but the
conversation itself; in training (and evaluation), each trained turn of a session gets the block chat would have
built before it (the two turns before it as the query) from the sessions that ended before the session started
(for training: training sessions only), its own people preferred; a session's first turn, which answers nothing,
gets none. Both go through `render.fit_memory`, so the block is the same, byte for byte, as the model saw in
training, before every reply (`render.encode` with `for_turns`'s blocks).
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


def chat_query(history: Sequence[Turn]) -> str:
    return _messages(history[-QUERY_TURNS:])


def for_turns(memory: Memory, sessions: Sequence[Session], tokenizer: Any, budget: int,
              splits: Collection[str] | None, progress: Callable[[int], None] | None = None
              ) -> list[list[tuple[list[int], list[MemoryEntry]]]]:
    """Each session's memory block (ids, entries) before each of its turns: for a trained turn after the first,
    the block chat builds before that reply (`chat_query` of the turns before it), from the sessions of `splits`
    (None: all) that ended before the session started; ([], []) for the other turns. `progress` is given the
    searches done, as `Memory.search_many` counts them."""
    queries: list[str] = []
    starts: list[int | None] = []
    people: list[set[str]] = []
    where: list[tuple[int, int]] = []
    for k, session in enumerate(sessions):
        speakers = {t.speaker for t in session.turns}
        for i, turn in enumerate(session.turns):
            if i and turn.train:
                queries.append(chat_query(session.turns[:i]))
                starts.append(session.start)
                people.append(speakers)
                where.append((k, i))
    found = memory.search_many(queries, starts, splits, people, progress=progress) if queries else []
    out: list[list[tuple[list[int], list[MemoryEntry]]]] = [[([], []) for _ in s.turns] for s in sessions]
    counts: dict[str, int] = {}
    for (k, i), ranked in zip(where, found, strict=True):
        out[k][i] = fit_memory(tokenizer, ranked, budget, counts)
    return out


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

    def for_conversation(self, conversation: str, *, scope: str | None = None, before: int | None = None) -> Recall:
        """This recall for another conversation (the server's requests, the bot's chats, evaluation's sessions): the
        same memory, budget and `remember`; `scope` (who talks) and `before` (evaluation: only what ended before it)
        are the new conversation's. Always a plain `Recall`, whatever recall it is copied from."""
        return Recall(self.memory, self.budget, self.remember, conversation, before, scope)

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
