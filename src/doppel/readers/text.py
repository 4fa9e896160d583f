"""Reading a text export (Signal's Markdown, LINE's chat history) a line at a time, as often as a reader needs.

A line is read `LINE_CAP` characters at most and the rest of a longer one read past, so memory stays flat whatever
the file holds; a line that was cut is marked, and its message is dropped by the reader as too long. Bytes that are
not UTF-8 are one line of error (the file is no export these readers know), never a traceback.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from pathlib import Path

from doppel.errors import ExportError

MESSAGE_CAP = 65_536  # characters of one message; a longer one is dropped as "unsupported"
LINE_CAP = MESSAGE_CAP + 256  # a line is read this far at most (a header is far shorter than 256 characters)


def lines(path: Path, what: str, on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, bool]]:
    """(the line without its line break, whether it was cut at `LINE_CAP`), from the first to the last; a BOM at the
    start is left out. `what` names the format in the error for bytes that are not UTF-8 ("a Signal export")."""
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)
        read = functools.partial(text.readline, LINE_CAP)
        try:
            for n, line in enumerate(iter(read, "")):
                if on_read is not None and n % 4096 == 0:
                    on_read(raw.tell())
                cut = len(line) == LINE_CAP and line[-1] != "\n"
                if cut:
                    for rest in iter(read, ""):
                        if rest[-1] == "\n":
                            break
                yield line.rstrip("\r\n"), cut
        except UnicodeDecodeError as exc:
            raise ExportError(f"{path} is not UTF-8 text (byte {exc.start} of a block); is it {what}?") from None
    if on_read is not None:
        on_read(path.stat().st_size)
