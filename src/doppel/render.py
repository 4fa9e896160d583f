"""Session → ChatML text segments, each marked as a training target or not (the masking rule).

    <|im_start|>Max Orlov
    >>> yo
    >>> gym later?<|im_end|>

The header is never a target; a trained turn's body and its `<|im_end|>` are. Tokenization works
segment by segment, so labels follow token boundaries for any tokenizer.

Text is always text: the control tokens come only from the two ChatML segments, and every other segment
is tokenized with the tokenizer's special tokens split into plain pieces, so a message or a name that
contains `<|im_end|>` (or any other special token) can never end a turn or forge one. A speaker's name is
one line in its header: line breaks and other control characters in it become spaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from doppel.records import Session, Turn

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PREFIX = ">>> "


def body(messages: Iterable[str]) -> str:
    return "\n".join(PREFIX + m for m in messages)


_NOT_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def header_name(name: str) -> str:
    """A speaker's name as it goes into a header: one line, whatever it held."""
    return " ".join(_NOT_IN_A_NAME.sub(" ", name).split()) or "?"


def turn_segments(turn: Turn) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of one turn, in order."""
    # the special tokens are segments of their own, so that a SentencePiece tokenizer does not
    # treat the speaker's name as the start of a text
    return [(IM_START, False), (f"{header_name(turn.speaker)}\n", False), (body(turn.messages), turn.train),
            (IM_END, turn.train), ("\n", False)]


def header(speaker: str) -> str:
    """The opening of a turn that the model is to write."""
    return f"{IM_START}{header_name(speaker)}\n"


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


def encode(session: Session, tokenizer: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Samples of at most `max_length` tokens, split at turn boundaries, never truncated mid-turn.

    Each window after the first starts with as many preceding turns as fit, as untrained context.
    A single turn longer than `max_length` is cut into pieces (it cannot fit any other way).
    """
    turns = [turn_ids(tokenizer, t) for t in session.turns]
    samples = []
    i = 0
    while i < len(turns):
        j, size = i, 0
        while j < len(turns) and size + len(turns[j][0]) <= max_length:
            size += len(turns[j][0])
            j += 1
        if j == i:  # one turn alone is too long
            ids, labels = turns[i]
            samples += [(ids[k:k + max_length], labels[k:k + max_length])
                        for k in range(0, len(ids), max_length)]
            i += 1
            continue
        k = i
        while k > 0 and size + len(turns[k - 1][0]) <= max_length:
            k -= 1
            size += len(turns[k][0])
        ids = [t for turn in turns[k:j] for t in turn[0]]
        labels = [IGNORE] * sum(len(turn[0]) for turn in turns[k:i])
        labels += [t for turn in turns[i:j] for t in turn[1]]
        samples.append((ids, labels))
        i = j
    return [s for s in samples if any(label != IGNORE for label in s[1])]
