"""Talking with a persona: conversation state, prompt rendering, streamed multi-message replies.

The prompt is the history rendered exactly as in training, then `<|im_start|>{persona}\\n`: the caller
always writes the header, so the model only ever speaks as the persona, and generation stops at
`<|im_end|>`. A reply body is one or more `>>> ` messages. With a memory (memory/recall.py), the prompt
opens with the memory block recalled for this reply, rendered as in training.
"""

from __future__ import annotations

import difflib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppel.config import Sampling
from doppel.engines import as_engine
from doppel.errors import ChatError, ContextTooLong, GenerationFailed
from doppel.records import MemoryEntry, Turn, spoken
from doppel.render import (
    IM_END,
    IM_START,
    PREFIX,
    header,
    header_name,
    memory_segments,
    segment_ids,
    turn_ids,
    turn_segments,
)

if TYPE_CHECKING:
    from doppel.memory.recall import Recall
    from doppel.run import Run


def open_memory(run: Run | str | Path | None, setting: str = "auto", remember: bool = False) -> Recall | None:
    """The memory a chat with `run` (a finished run or its path) recalls from: its dataset's memory index, with the
    run's memory budget.

    `setting` "auto" uses it when the run trained with memory, "on" always, "off" never. `remember` keeps the
    conversations in RUN/memory/remembered.jsonl. `MemoryIndexError` when the index is needed and missing or damaged.
    """
    from doppel.errors import MemoryIndexError
    from doppel.memory.index import REMEMBERED, Memory
    from doppel.memory.recall import Recall
    from doppel.run import MEMORY_DIR, Run

    if isinstance(run, str | Path):
        run = Run.open(run)
    if setting == "off":
        if remember:
            raise ChatError("remember needs the memory; leave out --memory off")
        return None
    if run is None:
        if setting == "on" or remember:
            raise ChatError("memory needs a trained run, whose dataset has the memory index")
        return None
    info = run.info
    if setting == "auto" and info.memory_tokens is None and not remember:
        return None  # trained without memory: chats as it was trained
    folder = Path(info.dataset) / MEMORY_DIR
    if not folder.is_dir():
        raise MemoryIndexError(f"{folder}: no memory index (the run's dataset was moved, or prepared without memory); "
                               "prepare it again, or chat with --memory off")
    memory = Memory.open(folder, run.path / MEMORY_DIR / REMEMBERED)
    return Recall(memory, info.memory_tokens or run.config.memory_budget, remember)


def pick_people(known: list[str], owner: str | None, persona: str | None = None,
                user: str | None = None) -> tuple[str, str]:
    """(who the model plays, who writes): the names given, checked against `known` (empty: any name goes); by
    default the owner plays, or the most active speaker, and the most active other speaker writes."""
    persona = check_name(persona or owner or (known[0] if known else "Me"), known, "persona")
    others = [k for k in known if k != persona]
    return persona, check_name(user or (others[0] if others else "Friend"), known, "speaker")


def check_name(name: str, known: list[str], role: str) -> str:
    """`name` if the run knows it (or knows nobody); otherwise a `ChatError` with close matches."""
    if not known or name in known:
        return name
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(known[:10])}"
    raise ChatError(f"unknown {role} {name!r}{hint}")


def split_messages(body: str) -> list[str]:
    """A generated turn body (`>>> a\\n>>> b`) → its messages; a line without `>>> ` continues one."""
    messages: list[str] = []
    for line in body.split("\n"):
        if line.startswith(PREFIX) or line == PREFIX.rstrip() or not messages:  # ">>>": a message begun, no text yet
            messages.append(line.removeprefix(PREFIX.rstrip()).removeprefix(" "))
        else:
            messages[-1] += "\n" + line
    return [m.strip() for m in messages if m.strip()]


def add_messages(turns: list[Turn], speaker: str, messages: Sequence[str]) -> None:
    """Add `speaker`'s messages to `turns`: consecutive messages of one writer are one turn, like a burst in a
    messenger, so they join the last turn when it is theirs."""
    if not messages:
        return
    if turns and turns[-1].speaker == speaker:
        turns[-1] = spoken(speaker, (*turns[-1].messages, *messages))
    else:
        turns.append(spoken(speaker, messages))


class TurnIds:
    """Each turn's prompt token ids, tokenized once: a turn is text, so the same turn has the same ids whoever asks.

    Bounded (the least recently used go first) and safe to share between threads: the server hands one to the
    conversation of every request, so a conversation that comes back one turn longer tokenizes that turn alone.
    """

    def __init__(self, tokenizer: Any, size: int = 4096) -> None:
        self.tokenizer, self.size = tokenizer, size
        self._ids: OrderedDict[Turn, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, turn: Turn) -> list[int]:
        with self._lock:
            ids = self._ids.get(turn)
            if ids is not None:
                self._ids.move_to_end(turn)
                return ids
        ids = turn_ids(self.tokenizer, turn)[0]
        with self._lock:
            self._ids[turn] = ids
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)
        return ids


class Conversation:
    """One chat: who the model plays, who writes, the turns so far.

    The history changes through the conversation's own methods: `add` (the writer's turn), `said` (a turn of the
    persona's that it did not generate), `load` (a whole history, as the server and the bot rebuild one per reply),
    `rewrite`, `reset`, and the replies of `reply` and `answer`. Each turn is tokenized once (`TurnIds`), so a reply
    costs the new turns' tokenization, however long the chat. `history` is the turns (assigning it is `load`).

    `model` is what generates: an engine (`open_model`'s `Loaded.engine`), or a transformers model (`Run.load`'s),
    wrapped in a `TransformersEngine` here. Conversations on one model take turns on it (engines.Turns).

    `max_context` is the model's window (prompt and reply); `max_prompt` caps the prompt alone. Older turns
    are left out to fit; the newest turn is always in, or `ContextTooLong` says why it cannot be. `memory`
    recalls earlier conversations before each reply (within its budget and the room the newest turn leaves);
    `recalled` is what the last prompt held.
    """

    def __init__(self, model: Any, tokenizer: Any, persona: str, user: str, sampling: Sampling | None = None,
                 max_context: int | None = None, max_prompt: int | None = None, memory: Recall | None = None,
                 turn_cache: TurnIds | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.engine = as_engine(model)
        self.persona, self.user, self.sampling = persona, user, sampling or Sampling()
        limit = self.engine.context
        self.max_context = min(max_context or limit, limit)
        self.max_prompt = max_prompt
        self._turns: list[Turn] = []
        self._ids = turn_cache if turn_cache is not None else TurnIds(tokenizer)
        self._heads: dict[str, list[int]] = {}
        self.last: Reply | None = None  # the newest reply
        self.memory = memory
        self.recalled: list[MemoryEntry] = []
        ends = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, IM_START)]
        self.stops = ends + [t for t in [tokenizer.eos_token_id] if t is not None and t not in ends]

    @property
    def history(self) -> list[Turn]:
        """The turns so far, oldest first (change them through the methods)."""
        return self._turns

    @history.setter
    def history(self, turns: Iterable[Turn]) -> None:
        self.load(turns)

    def load(self, turns: Iterable[Turn]) -> None:
        """Make `turns` the history (the turns tokenized before are not tokenized again)."""
        self._turns = list(turns)

    def _head(self) -> list[int]:
        name = header_name(self.persona)
        head = self._heads.get(name)
        if head is None:
            head = self._heads[name] = segment_ids(self.tokenizer, IM_START) + segment_ids(self.tokenizer, f"{name}\n")
        return head

    def _budget(self, head: list[int]) -> int:
        """Prompt tokens left for the turns once the reply and the persona's header have their room."""
        budget = self.max_context - self.sampling.max_new_tokens
        if self.max_prompt is not None:
            budget = min(budget, self.max_prompt)
        return budget - len(head)

    def _check_fits(self, turn_size: int, budget: int) -> None:
        if turn_size > budget:
            raise ContextTooLong(self._too_long(turn_size, budget))

    def reset(self) -> None:
        """Start a new conversation (a remembered one stays remembered)."""
        self._turns = []
        self.recalled = []
        if self.memory is not None:
            self.memory.reset()

    def _fit(self) -> tuple[list[int], list[list[int]], list[int]]:
        """(the memory block's ids, the ids of the newest turns that fit, oldest first, the persona's header ids)."""
        head = self._head()
        budget = self._budget(head)
        block: list[int] = []
        self.recalled = []
        turns = self._turns
        if self.memory is not None and turns:
            newest = len(self._ids(turns[-1]))
            block, self.recalled = self.memory.block(self.tokenizer, turns, {self.persona, self.user},
                                                     min(self.memory.budget, budget - newest))
            budget -= len(block)
        kept: list[list[int]] = []
        for n, turn in enumerate(reversed(turns)):
            ids = self._ids(turn)
            if n == 0:
                self._check_fits(len(ids), budget)
            elif len(ids) > budget:
                break
            kept.append(ids)
            budget -= len(ids)
        kept.reverse()
        return block, kept, head

    def _too_long(self, size: int, budget: int) -> str:
        room = f"{self.max_context} tokens of context, {self.sampling.max_new_tokens} kept for the reply"
        if self.max_prompt is not None and self.max_prompt < self.max_context - self.sampling.max_new_tokens:
            room = f"prompts of at most {self.max_prompt} tokens"
        if budget <= 0:
            return f"no room for a prompt: {room}"
        return f"the newest turn is {size} tokens, more than fit ({room})"

    def prompt(self) -> str:
        """History (trimmed by whole turns to fit) + the persona's header, as text: what `prompt_ids` holds."""
        _, kept, _ = self._fit()
        turns = self._turns[len(self._turns) - len(kept):]
        return "".join(piece for piece, _ in [*memory_segments(self.recalled),
                                              *(p for turn in turns for p in turn_segments(turn))]) + \
            header(self.persona)

    def prompt_ids(self) -> list[int]:
        """The prompt's token ids: text is text, only the ChatML markers are control tokens."""
        block, kept, head = self._fit()
        return block + [i for ids in kept for i in ids] + head

    def add(self, messages: Sequence[str]) -> None:
        """Add the user's messages as one turn; `ContextTooLong` (and no turn added) if it cannot fit."""
        turn = spoken(self.user, messages)
        self._check_fits(len(self._ids(turn)), self._budget(self._head()))  # the rest: `_fit`
        self._turns.append(turn)

    def said(self, messages: Sequence[str]) -> None:
        """Add the persona's messages as one turn, as if it had generated them (evaluation's probes, a bot's owner
        who wrote in the chat)."""
        self._turns.append(spoken(self.persona, messages))

    def rewrite(self, messages: Sequence[str]) -> Turn:
        """Put `messages` in place of the persona's last reply, as if the persona had written them (the owner's "that
        is not how I'd say it"); the reply replaced. `ChatError` when the last turn is not the persona's."""
        if not self._turns or self._turns[-1].speaker != self.persona:
            raise ChatError(f"nothing to rewrite: {header_name(self.persona)} has not answered the last turn")
        replaced = self._turns[-1]
        self._turns[-1] = spoken(self.persona, messages)
        if self.memory is not None:
            self.memory.keep(self._turns)
        return replaced

    def answer(self, cancel: threading.Event | None = None) -> Reply:
        """Generate the persona's turn after the history: a `Reply` that streams its messages as each is complete.

        Generation waits for the others on the same engine (one at a time), and stops when `cancel` is set or when
        the caller stops iterating; cancelled before its first token, it adds no turn. If the model fails,
        `GenerationFailed` is raised and no turn is added.
        """
        ids = self.prompt_ids()
        reply = self.last = Reply(len(ids))
        reply._source = self._turn(reply, ids, cancel or threading.Event())
        return reply

    def reply(self, messages: Sequence[str], cancel: threading.Event | None = None) -> Reply:
        """`add` the user's messages, then `answer`; a failed turn leaves the history as it was."""
        self.add(messages)
        reply = self.answer(cancel)
        reply._source = self._undo_on_failure(reply._source)
        return reply

    def _undo_on_failure(self, messages: Iterator[str]) -> Iterator[str]:
        try:
            yield from messages
        except GenerationFailed:
            self._turns.pop()
            raise

    def _turn(self, reply: Reply, ids: list[int], cancel: threading.Event) -> Iterator[str]:
        yield from self._stream(reply, ids, cancel)
        if reply.finish_reason is None:  # cancelled while it waited for the model: no turn, nothing remembered
            return
        self._turns.append(spoken(self.persona, reply.messages))  # tokenized when a prompt needs it
        if self.memory is not None:
            self.memory.keep(self._turns)

    def _stream(self, reply: Reply, ids: list[int], cancel: threading.Event) -> Iterator[str]:
        """Generate one turn body; yield each message once the next one starts (or the turn ends)."""
        text = _Text(self.tokenizer)
        done = 0
        finish = "length"
        for token in self.engine.tokens(ids, self.sampling, self.stops, cancel):  # waits for the model's turn
            reply.completion_tokens += 1
            if token in self.stops:
                finish = "stop"
                break
            text.add(token)
            complete = text.value.rfind("\n" + PREFIX)
            if complete > done:
                yield from split_messages(text.value[done:complete])
                done = complete + 1
        if not reply.completion_tokens and cancel.is_set():
            return  # it never had the model (`finish_reason` stays None)
        yield from split_messages(text.finish()[done:])
        reply.finish_reason = finish


class Reply:
    """The persona's turn as it is generated: iterate it (once) for its messages, each as soon as it is complete.
    `messages`, the token counts and `finish_reason` are final when the iteration ends."""

    def __init__(self, prompt_tokens: int) -> None:
        self.messages: list[str] = []
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0  # generated, the end-of-turn token included
        self.finish_reason: str | None = None  # "stop": the turn ended (or a stop string cut it); "length": the budget
        self._source: Iterator[str] = iter(())

    def __iter__(self) -> Iterator[str]:
        try:
            for message in self._source:
                self.messages.append(message)
                yield message
        finally:
            self.close()  # a caller that stops reading stops the generation, at once

    def wait(self) -> list[str]:
        """Generate the whole turn; its messages."""
        for _ in self:
            pass
        return self.messages

    def close(self) -> None:
        """Stop generating (a client that left)."""
        close = getattr(self._source, "close", None)
        if close is not None:
            close()

    @property
    def usage(self) -> tuple[int, int]:
        return self.prompt_tokens, self.completion_tokens

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


class _Text:
    """Incremental decoding that never cuts a character: the bytes of an unfinished one wait for the rest.

    The ids since the last line break are decoded together (as transformers' TextStreamer does), so a
    SentencePiece tokenizer's word-start spaces come out right.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.line: list[int] = []
        self.shown = 0
        self.value = ""

    def add(self, token: int) -> None:
        self.line.append(token)
        piece = self.tokenizer.decode(self.line, skip_special_tokens=False)
        if piece.endswith("\ufffd"):  # a character whose bytes are not all here yet
            return
        self.value += piece[self.shown:]
        self.line, self.shown = ([], 0) if piece.endswith("\n") else (self.line, len(piece))

    def finish(self) -> str:
        """The whole text; a character cut off by the token limit is left out."""
        if self.line:
            piece = self.tokenizer.decode(self.line, skip_special_tokens=False)
            self.value += piece[self.shown:].rstrip("\ufffd")
            self.line, self.shown = [], 0
        return self.value
