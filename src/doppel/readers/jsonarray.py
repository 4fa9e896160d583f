"""The items of a large JSON array, decoded in batches by msgspec from a stream of bytes, in constant memory.

Exporters write one item after another with the same whitespace between them: Telegram Desktop
`},\\n  {\\n   "id":`, DiscordChatExporter `},\\n    {\\n      "id":`, a compact file `},{"id":`. The bytes that
separate the first two items (found by decoding the first item with the standard `json`: its closing brace, the
comma and whitespace, the second item's opening brace and first key) are looked for with `bytes.rfind`, and
everything up to the last one is decoded as one list by msgspec's typed decoder, which skips the fields doppel
does not read. A raw newline
never occurs inside a JSON string, so in an indented file the separator is met only between items; in a
compact one a nested object with the same first key could match too, and the batch then fails to decode:
`Unusual` says so, and the caller reads the file with its general reader. Nothing is ever guessed.
"""

from __future__ import annotations

import json
import re
from typing import Generic, TypeVar

import ijson
import msgspec

T = TypeVar("T")
JSON_STRING = rb'"(?:[^"\\]|\\.)*"'  # a JSON string's bytes, escapes included
_NEXT = re.compile(r'\s*,\s*\{\s*"(?:[^"\\]|\\.)*"\s*:')  # the comma, the next item's brace and first key


class Unusual(Exception):
    """The bytes are not shaped as expected (or are not valid JSON); read them again another way."""


class Skeleton:
    """Checks, as a stream, that the bytes around the arrays (each array emptied) make one valid JSON document:
    a truncated or damaged file is `Unusual`. Memory stays constant: ijson parses the bytes as they come."""

    def __init__(self) -> None:
        self._events = ijson.sendable_list()
        self._parser = ijson.basic_parse_coro(self._events, use_float=True)  # yajl's numbers: see jsonevents

    def feed(self, data: bytes) -> None:
        try:
            self._parser.send(data)
        except ijson.JSONError as exc:
            raise Unusual(_first_line(exc)) from None
        self._events.clear()

    def end_array(self, array: ArrayItems[T]) -> list[T]:
        """The array's last items; what follows the array goes on here, after the emptied array's `]`."""
        last, rest = array.finish()
        self.feed(b"]")
        self.feed(rest)
        return last

    def close(self) -> None:
        try:
            self._parser.close()
        except ijson.JSONError as exc:
            raise Unusual(_first_line(exc)) from None


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ArrayItems(Generic[T]):
    """Feed the bytes that follow an array's `[`; `feed` returns the items completed so far, `finish` the last
    ones and the bytes after the array's `]`. Raises `Unusual` for anything unexpected."""

    def __init__(self, item: type[T], limit: int = 64 << 20) -> None:
        self._batch = msgspec.json.Decoder(list[item])  # type: ignore[valid-type]
        self._one = msgspec.json.Decoder(item)
        self._limit = limit  # bytes held without meeting a separator: a shape not understood
        self._buf = b""
        self._sep: bytes | None = None  # None until the first two items are seen
        self._gap = 0  # bytes of the separator before the next item's brace
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[T]:
        buf = self._buf + data
        if self._sep is None:
            start = self._first(buf)
            if start < 0:  # not yet two items: or an empty array, or not an array of objects: `finish` decides
                self._buf = buf
                self._check()
                return []
            buf = buf[start:]
        assert self._sep is not None  # found by `_first`, now or before
        cut = buf.rfind(self._sep)
        if cut <= 0:
            self._buf = buf
            self._check()
            return []
        self._buf = buf[cut + self._gap:]
        try:
            return self._batch.decode(b"[" + buf[:cut + 1] + b"]")
        except (msgspec.DecodeError, RecursionError) as exc:  # deep nesting: the general reader copes
            raise Unusual(str(exc)) from None

    def finish(self) -> tuple[list[T], bytes]:
        """The items left (the last ones, whatever the whitespace between them) and what follows the `]`."""
        try:
            text = self._buf.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Unusual(str(exc)) from None
        items: list[T] = []
        decoder = self._decoder
        at = _skip(text, 0)
        while at < len(text) and text[at] != "]":
            if items:
                if text[at] != ",":
                    raise Unusual("expected ',' or ']' between items")
                at = _skip(text, at + 1)
            try:
                end = decoder.raw_decode(text, at)[1]
                items.append(self._one.decode(text[at:end].encode("utf-8")))
            except (ValueError, msgspec.DecodeError, RecursionError) as exc:
                raise Unusual(str(exc)) from None
            at = _skip(text, end)
        if at >= len(text):
            raise Unusual("the array does not end")
        self._buf, self._sep = b"", None
        return items, text[at + 1:].encode("utf-8")

    def _first(self, buf: bytes) -> int:
        """Where the first item starts, once the separator after it is known from the bytes (-1 until then)."""
        for window in (buf[:1 << 16], buf):
            # surrogateescape: one character per undecodable byte, so offsets map back to bytes exactly
            text = window.decode("utf-8", "surrogateescape")
            start = _skip(text, 0)
            if text[start:start + 1] != "{":
                return -1
            try:
                end = self._decoder.raw_decode(text, start)[1]
            except RecursionError as exc:
                raise Unusual(str(exc)) from None
            except ValueError:
                continue
            after = _NEXT.match(text, end)
            if after is None:
                continue
            self._sep = text[end - 1:after.end()].encode("utf-8", "surrogateescape")
            self._gap = self._sep.index(b"{")
            return len(text[:start].encode("utf-8", "surrogateescape"))
        return -1

    def _check(self) -> None:
        if len(self._buf) > self._limit:
            raise Unusual(f"no separator between items in {self._limit} bytes")


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at
