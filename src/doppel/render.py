"""Session → ChatML text segments, each marked as a training target or not (the masking rule).

    <|im_start|>Max Orlov
    >>> yo
    >>> gym later?<|im_end|>

The header is never a target; a trained turn's body and its `<|im_end|>` are. A window may open with a memory
block (memory/): earlier conversations, oldest first, never a target; with memory, each trained turn is in a
window opened by the block chat would recall before that reply (`encode`'s `blocks`):

    <|im_start|>memory
    2024-03-02 · Max Orlov, Lena Volkova
    Max Orlov: my cat Persik is sick
    Lena Volkova: oh no((<|im_end|>
 Tokenization works
segment by segment, so labels follow token boundaries for any tokenizer.

Text is always text: the control tokens come only from the two ChatML segments, and every other segment
is tokenized with the tokenizer's special tokens split into plain pieces, so a message or a name that
contains `<|im_end|>` (or any other special token) can never end a turn or forge one. A speaker's name is
one line in its header: line breaks and other control characters in it become spaces.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace
from typing import Any

from doppel.records import MemoryEntry, Session, Turn

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
RUN_CONTEXT = 4  # with a block a reply, a window opens with at most max_length / 4 tokens of the turns before
PREFIX = ">>> "


def body(messages: Iterable[str]) -> str:
    return "\n".join(PREFIX + m for m in messages)


_NOT_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def header_name(name: str) -> str:
    """A speaker's name as it goes into a header: one line, whatever it held. The one rule for a name written
    anywhere (a file, the terminal): line breaks and control characters (ESC, NUL …) become spaces."""
    return " ".join(_NOT_IN_A_NAME.sub(" ", name).split()) or "?"


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Text as the terminal is to show it: a control character (ESC, a carriage return, a C1 code …), which would
    move the cursor, recolour or rewrite what is on the screen, is shown as its symbol (`␛`, `␍`, `\\x9b`); line
    breaks and tabs stay."""
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m[0])) if ord(m[0]) < 0x20 else "␡" if m[0] == "\x7f"
                        else f"\\x{ord(m[0]):02x}", text)


def markdown_name(name: str) -> str:
    """A name as Markdown text: its one line, with the characters that would start markup (code, emphasis, links,
    HTML, tables) backslash-escaped, so that it shows as written."""
    return re.sub(r"([\\`*_\[\]<>&|~])", r"\\\1", header_name(name))


def turn_segments(turn: Turn) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of one turn, in order."""
    # the special tokens are segments of their own, so that a SentencePiece tokenizer does not
    # treat the speaker's name as the start of a text
    return [(IM_START, False), (f"{header_name(turn.speaker)}\n", False), (body(turn.messages), turn.train),
            (IM_END, turn.train), ("\n", False)]


def escaped(marker: str) -> str:
    """How `doppel inspect` shows a ChatML marker that is text (typed in a message or a name): `<\\|im_end\\|>`,
    never the way doppel's own markers look."""
    return marker.replace("|", "\\|")


def header(speaker: str) -> str:
    """The opening of a turn that the model is to write."""
    return f"{IM_START}{header_name(speaker)}\n"


MEMORY = "memory"  # the memory block's header
FIRST_TIME, LAST_TIME = -62_135_596_800, 253_402_300_799  # 0001-01-01 and 9999-12-31 23:59:59 UTC


def is_time(value: object) -> bool:
    """Whether `value` is unix seconds of a date the memory block can show (the years 1 to 9999): what a session's
    and a memory entry's times must be. Past them `time.gmtime` fails, and past 2**63 numpy and torch cannot hold
    them."""
    return type(value) is int and FIRST_TIME <= value <= LAST_TIME


def memory_order(entry: MemoryEntry) -> tuple[int, str, int]:
    """Where an entry was said: its session's start, the session, its place in the session (`id` "SESSION#k")."""
    _, mark, place = entry.id.rpartition("#")
    return entry.start, entry.session, int(place) if mark and place.isdigit() else 0


def memory_heading(entry: MemoryEntry) -> str:
    """The line that opens a session in the memory block: its date and its people."""
    day = time.strftime("%Y-%m-%d", time.gmtime(entry.start))
    return f"{day} · {', '.join(header_name(s) for s in entry.speakers)}"


def memory_line(speaker: str, message: str) -> str:
    return f"{header_name(speaker)}: {' '.join(message.split())}"


def memory_text(entries: Sequence[MemoryEntry]) -> str:
    """The memory block's body: for each session, oldest first, its date and people once, then the lines of its
    entries in the order they were said."""
    parts: list[list[str]] = []
    session = None
    for entry in sorted(entries, key=memory_order):
        if entry.session != session:
            parts.append([memory_heading(entry)])
            session = entry.session
        parts[-1] += [memory_line(speaker, message) for speaker, message in entry.lines]
    return "\n\n".join("\n".join(lines) for lines in parts)


def memory_segments(entries: Sequence[MemoryEntry]) -> list[tuple[str, bool]]:
    """The memory block as (text, is_target) pieces; nothing at all when there are no entries."""
    if not entries:
        return []
    return [(IM_START, False), (f"{MEMORY}\n{memory_text(entries)}", False), (IM_END, False), ("\n", False)]


def segments(session: Session) -> list[tuple[str, bool]]:
    return [piece for turn in session.turns for piece in turn_segments(turn)]


def text(session: Session) -> str:
    return "".join(t for t, _ in segments(session))


# --- token ids and labels (needs a tokenizer; no torch import) ---------------------------------

IGNORE = -100


def ensure_chatml(tokenizer: Any) -> bool:
    """Add `<|im_start|>`/`<|im_end|>` as special tokens if missing; True when added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return bool(missing)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # split_special_tokens: "<|im_end|>" typed by a person is the characters, not the control token
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def segment_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as they are in the middle of a conversation; the ChatML markers alone are
    control tokens, any other text is plain text whatever it contains.

    SentencePiece-style tokenizers put a word-start marker at the start of every call; tokenizing
    after a fixed anchor and dropping the anchor's ids removes it. Byte-level BPE has no marker and
    merges the anchor away, so the plain ids are used.
    """
    if text in (IM_START, IM_END):
        return [tokenizer.convert_tokens_to_ids(text)]
    anchor = _ids(tokenizer, "\n")
    ids = _ids(tokenizer, "\n" + text)
    return ids[len(anchor):] if ids[:len(anchor)] == anchor else _ids(tokenizer, text)


def turn_ids(tokenizer: Any, turn: Turn) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one turn; labels are IGNORE outside trained bodies and their end."""
    ids: list[int] = []
    labels: list[int] = []
    for piece, target in turn_segments(turn):
        piece_ids = segment_ids(tokenizer, piece)
        ids += piece_ids
        labels += piece_ids if target else [IGNORE] * len(piece_ids)
    return ids, labels


def memory_ids(tokenizer: Any, entries: Sequence[MemoryEntry]) -> list[int]:
    return [i for piece, _ in memory_segments(entries) for i in segment_ids(tokenizer, piece)]


def fit_memory(tokenizer: Any, ranked: Sequence[MemoryEntry], budget: int, counts: dict[str, int] | None = None
               ) -> tuple[list[int], list[MemoryEntry]]:
    """(the block's ids, the entries in it): the best-ranked entries whose block fits in `budget` tokens, an entry
    that does not fit whole with its first lines that do, one that cannot keep a line left out.

    What fits is counted line by line (each line's tokens and its line break, a session's heading once, two line
    breaks between sessions), in one tokenizer call; the block chosen is then tokenized whole, and while it is
    longer than the count (a merge across lines), the last entry taken goes, a line at a time. `counts` ({line:
    its tokens and line break}) is kept across calls by a caller that fits many blocks (training: one a turn)."""
    if budget <= 0 or not ranked:
        return [], []
    frame = len(memory_ids(tokenizer, [replace(ranked[0], lines=())])) - len(segment_ids(
        tokenizer, memory_heading(ranked[0])))  # the markers, the header and its line break
    headings = {e.session: memory_heading(e) for e in ranked}
    texts = list(headings.values()) + [memory_line(s, m) for e in ranked for s, m in e.lines]
    counts = {} if counts is None else counts
    todo = list(dict.fromkeys(t for t in texts if t not in counts))
    if todo:
        counts.update(zip(todo, (len(ids) + 1 for ids in tokenizer(
            todo, add_special_tokens=False, split_special_tokens=True)["input_ids"]), strict=True))
    heading_cost = {session: counts[text] for session, text in headings.items()}
    line_costs = iter([counts[t] for t in texts[len(headings):]])
    used = frame - 1  # the first heading needs no blank line before it, the last line no break after it
    taken: list[MemoryEntry] = []
    sessions: set[str] = set()
    for entry in ranked:
        costs = [next(line_costs) for _ in entry.lines]
        opening = 0 if entry.session in sessions else heading_cost[entry.session] + (1 if sessions else 0)
        keep = 0
        while keep < len(costs) and used + opening + sum(costs[:keep + 1]) <= budget:
            keep += 1
        if keep:
            used += opening + sum(costs[:keep])
            taken.append(replace(entry, lines=entry.lines[:keep]))
            sessions.add(entry.session)
    ids = memory_ids(tokenizer, taken)
    while len(ids) > budget and taken:
        last = taken[-1]
        taken[-1:] = [replace(last, lines=last.lines[:-1])] if len(last.lines) > 1 else []
        ids = memory_ids(tokenizer, taken)
    return ids, sorted(taken, key=memory_order)


def encode(session: Session, tokenizer: Any, max_length: int, memory: list[int] | None = None,
           blocks: Sequence[list[int]] | None = None, targets: Collection[int] | None = None
           ) -> list[tuple[list[int], list[int]]]:
    """Samples of at most `max_length` tokens, split at turn boundaries, never truncated mid-turn.

    Each window after the first starts with as many preceding turns as fit, as untrained context.
    A single turn longer than `max_length` is cut into pieces (it cannot fit any other way).
    `memory`, a memory block's ids, opens every window, never a target. `blocks` (one per turn, what chat would
    recall before it: memory/recall.py `for_turns`) instead gives each trained turn its own: the trained turns are
    taken in runs of the same block, and each run's windows open with its block, then as many turns before the run
    as fit in a quarter of `max_length` (`RUN_CONTEXT`: a window a reply, each with all the turns before it,
    would cost the square of a session's length), untrained, then the run's turns: every trained turn is predicted
    after the block chat would have shown before it, and the newest turns before it.

    `targets` (turn indexes) keeps the labels of those trained turns only, the windows the same: what one turn, or
    one speaker's turns, is trained on, in the windows training gives them (the preference step, eval).
    """
    turns = [turn_ids(tokenizer, t) for t in session.turns]
    if targets is not None:
        turns = [(ids, labels if i in targets else [IGNORE] * len(ids)) for i, (ids, labels) in enumerate(turns)]
    samples = []
    context = None if blocks is None else max_length // RUN_CONTEXT
    for block, first, stop in _runs(session, memory or [], blocks):
        samples += [(block + ids, [IGNORE] * len(block) + labels)
                    for ids, labels in _windows(turns, max_length - len(block), first, stop, context)]
    return samples


def _runs(session: Session, memory: list[int], blocks: Sequence[list[int]] | None
          ) -> list[tuple[list[int], int, int]]:
    """(block, first turn, end) of the runs of turns that share a block: one, the whole session with `memory`,
    without `blocks`; else a new run at each trained turn whose block differs from the run's."""
    if blocks is None:
        return [(memory, 0, len(session.turns))]
    runs: list[tuple[list[int], int, int]] = []
    block: list[int] | None = None
    first = 0
    for i, turn in enumerate(session.turns):
        if turn.train and blocks[i] != block:
            if block is not None:
                runs.append((block, first, i))
            block, first = blocks[i], i
    if block is not None:
        runs.append((block, first, len(session.turns)))
    return runs


def _windows(turns: list[tuple[list[int], list[int]]], max_length: int, first: int = 0,
             stop: int | None = None, context: int | None = None) -> list[tuple[list[int], list[int]]]:
    """The windows of turns `first`…`stop`, each opened by as many earlier turns as fit (in `context` tokens, when
    given), untrained."""
    stop = len(turns) if stop is None else stop
    context = max_length if context is None else context
    samples = []
    i = first
    while i < stop:
        j, size = i, 0
        while j < stop and size + len(turns[j][0]) <= max_length:
            size += len(turns[j][0])
            j += 1
        if j == i:  # one turn alone is too long
            ids, labels = turns[i]
            samples += [(ids[k:k + max_length], labels[k:k + max_length])
                        for k in range(0, len(ids), max_length)]
            i += 1
            continue
        k, before = i, 0
        while k > 0 and size + len(turns[k - 1][0]) <= max_length and before + len(turns[k - 1][0]) <= context:
            k -= 1
            size += len(turns[k][0])
            before += len(turns[k][0])
        ids = [t for turn in turns[k:j] for t in turn[0]]
        labels = [IGNORE] * sum(len(turn[0]) for turn in turns[k:i])
        labels += [t for turn in turns[i:j] for t in turn[1]]
        samples.append((ids, labels))
        i = j
    return [s for s in samples if any(label != IGNORE for label in s[1])]
