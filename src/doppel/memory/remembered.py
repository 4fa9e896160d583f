"""Remembered conversations (`--remember`): RUN/memory/remembered.jsonl, each turn written once.

    {"conversation": "remembered:…", "scope": null, "turn": 0, "time": 1733300000, "speaker": "Max Orlov",
     "messages": ["my door code is 4711"], "vectors": {"<text hash>": "<512 float32 numbers, base64>"}}

A line is one turn of a conversation at its place (`turn`); a line for a place already held replaces that turn and
every one after it (a client that edited a message or regenerated a reply). A conversation is remembered as the index
remembers a session (memory/index.py `windows_of`: entries of a turn or a few, in windows of a few entries);
`vectors` are those of the windows that changed with this turn, found again by the hash of their text, so a reply
embeds one or two windows, never the whole conversation. `scope` is who may recall it: the API's `user`, or null for
`doppel chat` and requests without one (docs/security.md).

Older versions wrote entry lines (a window and its `vector`), every window again after each reply: they are read
too, the latest line of an entry winning, and a conversation that goes on replaces them.

A line is at most `LINE_BYTES`: a turn keeps its first `TURN_MESSAGES` messages, each cut as in the index, and a name
of `NAME_CHARS`, so what doppel writes it reads back; a longer line is damage, and is not read whole.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doppel.memory.index import DIMENSIONS, checked_entry, clip, problem, window_hash, window_text, windows_of
from doppel.records import ChatRef, MemoryEntry, Session, Turn, spoken
from doppel.render import is_time

LINE_BYTES = 1 << 20
TURN_MESSAGES = 200  # a turn's messages kept; with the vectors of their windows a line stays under LINE_BYTES
NAME_CHARS = 100
CHAT = ChatRef(0, "doppel chat", "doppel")  # the chat every remembered conversation is in


@dataclass
class Held:
    """A remembered conversation: who may recall it, and its turns with the time each was written."""

    scope: str | None
    turns: list[tuple[int, Turn]] = field(default_factory=list)

    def session(self, conversation: str) -> Session:
        return Session(conversation, CHAT, self.turns[0][0], self.turns[-1][0], tuple(t for _, t in self.turns))


def kept(turn: Turn) -> Turn:
    """A turn as it is remembered: its first `TURN_MESSAGES` messages that hold text, each cut as in the index."""
    messages = tuple(clip(m) for m in turn.messages if m.strip())[:TURN_MESSAGES]
    return spoken(clip(turn.speaker, NAME_CHARS), messages)


def change(held: Held | None, turns: Sequence[Turn], scope: str | None, now: int) -> tuple[Held, int] | None:
    """(the conversation as it is to be held, the first turn to write) after `turns`; None when nothing is new."""
    turns = [kept(t) for t in turns]
    old = held.turns if held is not None else []
    same = 0
    while same < min(len(old), len(turns)) and old[same][1] == turns[same]:
        same += 1
    if same == len(turns):  # the same history, or a shorter one: what is held stays
        return None
    return Held(scope, old[:same] + [(now, t) for t in turns[same:]]), same


def append(path: Path, conversation: str, held: Held, first: int, windows: Sequence[Sequence[MemoryEntry]],
           vectors: dict[str, Any]) -> None:
    """Write the turns from `first` on, each with the vectors (window text hash → vector) of the windows whose last
    line it holds; a changed window that ends in an earlier turn goes with the last."""
    ends = [n for n, (_, turn) in enumerate(held.turns) for _ in turn.messages]  # the turn of each line
    given: dict[int, dict[str, str]] = {}
    line = -1
    for window in windows:
        line += sum(len(entry.lines) for entry in window)
        key = window_hash(window_text(window))
        if key in vectors:
            holder = ends[line] if ends[line] >= first else len(held.turns) - 1
            given.setdefault(holder, {})[key] = base64.b64encode(vectors[key].tobytes()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for n in range(first, len(held.turns)):
            moment, turn = held.turns[n]
            handle.write(json.dumps({"conversation": conversation, "scope": held.scope, "turn": n, "time": moment,
                                     "speaker": turn.speaker, "messages": list(turn.messages),
                                     "vectors": given.get(n, {})}, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class Read:
    """What a remembered file holds: its conversations' entries (with vectors where the file has them) and turns."""

    windows: list[tuple[list[MemoryEntry], Any]]  # a window's entries and its vector, or None: to embed
    held: dict[str, Held]
    scopes: dict[str, str | None]  # every remembered session's scope, old entries' too


def read(path: Path) -> Read:
    """The file's conversations; `ValueError` for a line doppel could not have written."""
    old: dict[str, tuple[MemoryEntry, Any]] = {}
    held: dict[str, Held] = {}
    vectors: dict[str, dict[str, Any]] = {}
    with path.open("rb") as handle:
        number = 0
        while line := handle.readline(LINE_BYTES + 1):
            number += 1
            if len(line) > LINE_BYTES:
                raise ValueError(f"line {number} is longer than {LINE_BYTES} bytes")
            if not line.endswith(b"\n"):
                break  # the last line of a process that was killed while writing it
            try:
                data = json.loads(line)
                if "conversation" not in data:  # an older version's entry line
                    vector = _vector(data.pop("vector"))
                    entry = checked_entry(data)
                    old[entry.id] = (entry, vector)
                    continue
                conversation, scope, n, moment = data["conversation"], data["scope"], data["turn"], data["time"]
                speaker, messages = data["speaker"], tuple(data["messages"])
                if not is_time(moment):
                    raise ValueError(f"time {moment!r} is not a time in seconds")
                if not (isinstance(conversation, str) and (scope is None or isinstance(scope, str)) and type(n) is int
                        and isinstance(speaker, str) and all(isinstance(m, str) for m in messages)):
                    raise ValueError("not a remembered turn")
                turn = kept(spoken(speaker, messages))
                if conversation not in held or n == 0:
                    held[conversation] = Held(scope)
                so_far = held[conversation]
                if not 0 <= n <= len(so_far.turns) or so_far.scope != scope:
                    raise ValueError(f"turn {n} of a conversation of {len(so_far.turns)} turns")
                so_far.turns[n:] = [(moment, turn)]
                vectors.setdefault(conversation, {}).update({k: _vector(v) for k, v in data["vectors"].items()})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"line {number}: {problem(exc)}") from None
    windows = [([entry], vector) for entry, vector in old.values() if entry.session not in held]
    for conversation, conversation_held in held.items():
        known = vectors.get(conversation, {})
        windows += [(w, known.get(window_hash(window_text(w))))
                    for w in windows_of(conversation_held.session(conversation), "remembered")]
    scopes = {w[0].session: None for w, _ in windows} | {c: h.scope for c, h in held.items()}
    return Read(windows, held, scopes)


def _vector(text: Any) -> Any:
    import numpy as np

    vector = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.float32)
    if vector.shape != (DIMENSIONS,):
        raise ValueError(f"a vector of {vector.shape[0]} numbers")
    return vector
