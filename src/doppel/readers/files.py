"""What every reader checks: that a file is a regular file and that a time is a date; and the ids of chats that
have only a name."""

from __future__ import annotations

import json
import stat
import zlib
from pathlib import Path
from typing import Any

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


_FIRST, _END = -62135596800, 253402300800  # 0001-01-01 and 10000-01-01 00:00:00 UTC: Python's dates lie between


def unix_time(value: Any, unit: int = 1) -> int:
    """Whole unix seconds from a number of seconds (or of 1/`unit` seconds). `ValueError` for a value that is no
    date: not an int or float, infinite, NaN, before the year 1 or after 9999 (a time a later stage could not
    turn into a day). Called for every message: the common case is tested first."""
    if value.__class__ is int or value.__class__ is float:
        if unit == 1:
            if _FIRST <= value < _END:
                return int(value)
        elif _FIRST * unit <= value < _END * unit:
            return int(value) // unit
    raise ValueError(f"{shown(value)} is not a time between the years 1 and 9999")


def shown(value: Any, limit: int = 60) -> str:
    """A value as JSON writes it (`null`, `Infinity`, `"text"`), cut to `limit` characters, for an error line."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit - 1] + "…"
