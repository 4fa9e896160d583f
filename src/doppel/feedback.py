"""The owner's corrections of the twin: RUN/feedback.jsonl, one `FeedbackPair` a line, for the preference step.

Every front end writes here what the owner did with a reply of the run it serves:

    bot-edit   `doppel bot --business`: the owner tapped Edit and wrote the reply themself
    bot-skip   the owner tapped Skip, then wrote to that contact by hand (their whole turn, up to the contact's answer)
    bot-send   the owner tapped Send: the draft was fine as it was
    chat       `doppel chat`'s /rewrite: the persona's last reply, as the owner would have written it
    page       the web page's "rewrite" on the persona's last reply (`doppel serve`, POST /doppel/feedback)

A pair is (chosen: what the owner wrote, rejected: what the model wrote), both lists of messages, after `context`,
the turns before the reply as the conversation had them. A Send is `chosen` = the draft and `rejected` = (): a reply
the owner approved, with nothing to prefer it over: the preference step (tuning/preferences.py) skips it; it is
kept as a desirable example for a later step (KTO, or a pair whose rejected turn is sampled). An edit that
changes nothing is recorded as a Send; a rewrite that changes nothing is not recorded.

The file holds conversations' text, as the bot's state does: it is created readable by its owner only (0600), lines
are appended and never rewritten. A line is written whole by one `write` under an exclusive lock, so concurrent
writers (a bot and a server on the same run) never interleave; a crash in the middle of a write can leave only the
last line cut off, which `read` skips (with a warning) and the next `record` removes before it appends.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Literal

import msgspec

from doppel.errors import RunError
from doppel.records import Turn

FEEDBACK_FILE = "feedback.jsonl"  # in the run's folder
Source = Literal["bot-edit", "bot-skip", "bot-send", "chat", "page"]
log = logging.getLogger(__name__)


class FeedbackPair(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the owner preferred to one reply of the persona `speaker` (see the module's docstring)."""

    context: tuple[Turn, ...]  # the turns before the reply, as the conversation had them
    speaker: str  # the persona who replied
    chosen: tuple[str, ...]  # the owner's messages (a Send: the draft's)
    rejected: tuple[str, ...]  # the model's messages; () for a Send
    source: Source
    time: int  # unix seconds

    def __post_init__(self) -> None:
        if not self.chosen or not all(m.strip() for m in self.chosen):
            raise ValueError("chosen must be one or more messages with text")
        if not all(m.strip() for m in self.rejected):
            raise ValueError("rejected holds a message without text")
        if not self.rejected and self.source != "bot-send":
            raise ValueError(f"rejected is empty, which only a bot-send may be (this is a {self.source})")


def record(path: Path, pair: FeedbackPair) -> None:
    """Append `pair` to the feedback file `path` (created 0600), a cut-off last line left by a crash removed first."""
    line = msgspec.json.encode(pair) + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed
        _drop_torn_line(fd, path)
        os.write(fd, line)  # one write, appended at the end whatever another writer did
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_torn_line(fd: int, path: Path) -> None:
    """Cut the file back to its last newline: what follows it is a line a crash left half written."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        found = os.pread(fd, end - start, start).rfind(b"\n")
        if found >= 0:
            end = start + found + 1
            break
        end = start
    log.warning("%s: its last line was cut off (%d bytes, a crash while writing it); removed", path, size - end)
    os.ftruncate(fd, end)


def read(path: Path) -> list[FeedbackPair]:
    """The pairs in the feedback file `path` (none when there is no file). A cut-off last line is skipped with a
    warning; any other line that is not a pair is a `RunError` naming the file and the line."""
    pairs, torn = read_counting(path)
    if torn:
        log.warning("%s: %d cut-off last line skipped (a crash while writing it)", path, torn)
    return pairs


def read_counting(path: Path) -> tuple[list[FeedbackPair], int]:
    """(pairs, cut-off last lines skipped: 0 or 1), as `read` reads them, without the warning."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise RunError(f"cannot read {path} ({exc.strerror or exc})") from None
    decoder = msgspec.json.Decoder(FeedbackPair)
    lines = raw.split(b"\n")
    pairs: list[FeedbackPair] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            pairs.append(decoder.decode(line))
        except msgspec.DecodeError as exc:
            if number == len(lines) and not raw.endswith(b"\n"):  # the last line, and no newline after it
                return pairs, 1
            raise RunError(f"{path}, line {number}: not a feedback pair ({exc}); delete that line to go on") from None
    return pairs, 0
