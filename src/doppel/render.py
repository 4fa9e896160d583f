"""Session → ChatML text segments, each marked as a training target or not (the masking rule).

    <|im_start|>Max Orlov
    >>> yo
    >>> gym later?<|im_end|>

The header is never a target; a trained turn's body and its `<|im_end|>` are. Tokenization works
segment by segment, so labels follow token boundaries for any tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from doppel.sessions import Session, Turn

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PREFIX = ">>> "


def header(speaker: str) -> str:
    return f"{IM_START}{speaker}\n"


def body(messages: Iterable[str]) -> str:
    return "\n".join(PREFIX + m for m in messages)


def turn_segments(turn: Turn) -> list[tuple[str, bool]]:
    """(text, is_target) pieces of one turn, in order."""
    return [(header(turn.speaker), False), (body(turn.messages), turn.train),
            (IM_END, turn.train), ("\n", False)]


def segments(session: Session) -> list[tuple[str, bool]]:
    return [piece for turn in session.turns for piece in turn_segments(turn)]


def text(session: Session) -> str:
    return "".join(t for t, _ in segments(session))


def split_messages(body_text: str) -> list[str]:
    """Inverse of `body`: lines starting with `>>> ` begin a message, others continue one."""
    messages: list[str] = []
    for line in body_text.split("\n"):
        if line.startswith(PREFIX) or not messages:
            messages.append(line.removeprefix(PREFIX))
        else:
            messages[-1] += "\n" + line
    return [m for m in (m.strip() for m in messages) if m]
