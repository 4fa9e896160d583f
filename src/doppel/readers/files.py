"""What every reader of a file checks first, and the ids of chats that have only a name."""

from __future__ import annotations

import stat
import zlib
from pathlib import Path

from doppel.errors import ExportError


def regular_file(path: Path, hint: str = "") -> None:
    """`ExportError` unless `path` is a regular file: a FIFO without a writer would block, a folder is not one.
    `hint` ends the message (what to give doppel instead)."""
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if not stat.S_ISREG(path.stat().st_mode):
        raise ExportError(f"{path} is not a regular file{'; ' + hint if hint else ''}")


def name_id(name: str) -> int:
    """A stable chat id for a chat known by its name alone."""
    return zlib.crc32(name.encode("utf-8"))
