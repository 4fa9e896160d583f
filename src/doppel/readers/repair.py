"""Streaming repair of the invalid bytes Telegram Desktop writes into its JSON exports.

Telegram Desktop's serializer writes control characters as ``\\xNN`` (not a JSON escape) and, for
U+2028/U+2029, writes ``\\u2028`` but leaves the last two UTF-8 bytes of the character (0x80 0xA8 or
0x80 0xA9) in the output. Both break every strict JSON parser. This module fixes them chunk by chunk,
so the whole file never has to be in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import BinaryIO

# An escaped backslash is consumed as a pair first, so `\\x41` (a literal backslash then "x41")
# is left alone; only an unescaped `\x` is rewritten.
_BAD = re.compile(rb"\\\\|\\x([0-9A-Fa-f]{2})|(\\u202[89])\x80[\xa8\xa9]")


def _fix(match: re.Match[bytes]) -> bytes:
    if match.group(1) is not None:
        return b"\\u00" + match.group(1)
    if match.group(2) is not None:
        return match.group(2)
    return match.group(0)


def repair(data: bytes) -> bytes:
    """Repair one complete buffer."""
    return _BAD.sub(_fix, data) if b"\\" in data else data


def _safe_cut(buf: bytes) -> int:
    """Index up to which `buf` can be repaired without seeing the next chunk.

    A match is at most 8 bytes and starts with a backslash, so holding back from the start of the
    last backslash run that begins in the final 8 bytes keeps every possible match whole.
    """
    pos = buf.rfind(b"\\", max(0, len(buf) - 8))
    if pos < 0:
        return len(buf)
    while pos > 0 and buf[pos - 1] == 0x5C:  # walk back to the start of the backslash run
        pos -= 1
    return pos


class RepairingReader:
    """A binary file wrapper whose `read` returns repaired bytes; counts raw bytes consumed."""

    def __init__(self, raw: BinaryIO, chunk_size: int = 1 << 20,
                 on_read: Callable[[int], None] | None = None) -> None:
        self._raw = raw
        self._on_read = on_read
        self._chunk_size = chunk_size
        self._held = b""
        self._eof = False
        self._out = b""
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        # ijson's C backend expects at most `size` bytes back, so surplus output waits in `_out`.
        while not self._out and not self._eof:
            chunk = self._raw.read(self._chunk_size)
            self.consumed += len(chunk)
            if self._on_read is not None:
                self._on_read(self.consumed)
            if not chunk:
                self._eof = True
                self._out, self._held = repair(self._held), b""
                break
            buf = self._held + chunk
            cut = _safe_cut(buf)
            self._held = buf[cut:]
            self._out = repair(buf[:cut])
        if size < 0 or size >= len(self._out):
            out, self._out = self._out, b""
        else:
            out, self._out = self._out[:size], self._out[size:]
        return out
