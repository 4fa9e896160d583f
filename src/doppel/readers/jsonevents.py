"""ijson's `(prefix, event, value)` events for the general readers, in memory bounded however deep the nesting.

`ijson.parse` names each event by its full path, a string as long as the nesting is deep, and its C backend
builds the events of a whole read buffer at once: 64 KB of `[` nested 50,000 deep made gigabytes of prefixes,
and `ijson.items` then built the whole subtree. Here the events come from `ijson.basic_parse` (no prefixes),
the prefixes are kept as a stack, and everything nested more than `DEPTH` levels deep is skipped: its containers
are seen empty. Nothing doppel reads is deeper than 8 levels (a Telegram message's text entity), so no field it
reads changes; a skipped field only has less in it. `DEPTH` is small because the prefixes kept grow with it
(`DEPTH` keys of a megabyte each make prefixes of `DEPTH`²/2 megabytes).

Numbers are int or float (`use_float=True`: yajl converts them, in constant time; without it ijson makes Python
ints of any length, and one of more than 4300 digits leaves an exception pending that surfaces later as a
SystemError). A number beyond a 64-bit integer or a double is `OutOfRange`, not the `IncompleteJSONError` yajl
raises, which would read as a truncated file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import ijson

DEPTH = 16  # levels of nesting kept; deeper containers are skipped
Event = tuple[str, str, Any]
_START = frozenset({"start_map", "start_array"})
_END = frozenset({"end_map", "end_array"})


class OutOfRange(ijson.JSONError):
    """A number that neither a 64-bit integer nor a double holds."""


class Readable(Protocol):
    """A binary file, or anything with its `read`."""

    def read(self, size: int = -1, /) -> bytes: ...


def parse(stream: Readable) -> Iterator[Event]:
    """The events `ijson.parse(stream, use_float=True)` gives, less those nested more than `DEPTH` levels deep.
    Raises ijson's errors for bytes that are not JSON."""
    here = ""  # the prefix of the next value (a scalar's, or a container's start and end)
    inside = ""  # the prefix of the container it is in (its keys')
    outer: list[tuple[str, str]] = []  # (inside, here) of each container kept that is open around this one
    level = 0  # containers open, the skipped ones included
    try:
        for event, value in ijson.basic_parse(stream, use_float=True):
            if event == "map_key":
                if level <= DEPTH:
                    yield inside, event, value
                    here = f"{inside}.{value}" if inside else value
            elif event == "start_map" or event == "start_array":
                level += 1
                if level <= DEPTH:
                    yield here, event, value
                    outer.append((inside, here))
                    inside = here
                    if event == "start_array":
                        here = f"{here}.item" if here else "item"
            elif event == "end_map" or event == "end_array":
                level -= 1
                if level < DEPTH:
                    inside, here = outer.pop()
                    yield here, event, value
            elif level <= DEPTH:
                yield here, event, value
    except ijson.IncompleteJSONError as exc:
        if "overflow" not in str(exc).partition("\n")[0]:
            raise
        raise OutOfRange("a number beyond a 64-bit integer or a double") from None


def build(events: Iterator[Event], event: str, value: Any) -> Any:
    """The value that starts with `(event, value)`, its remaining events taken from `events`: a scalar as it is,
    a container built whole (less what `parse` skipped)."""
    if event not in _START:
        return value
    builder = ijson.ObjectBuilder()
    builder.event(event, value)
    open_ = 1
    for _, event, value in events:
        builder.event(event, value)
        if event in _START:
            open_ += 1
        elif event in _END:
            open_ -= 1
            if open_ == 0:
                break
    return builder.value
