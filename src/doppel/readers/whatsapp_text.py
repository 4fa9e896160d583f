"""The text of a WhatsApp chat export, a `.txt` or the `.txt` inside a `.zip`, read as lines (never whole), and
the chat's name, told by the file's name in the phone's language.

In a zip the chat's text is `_chat.txt` (iOS) or "WhatsApp Chat with NAME.txt" (Android), else its only `.txt`;
several candidates, an encrypted member, a compression Python's zipfile cannot inflate (Deflate64), damaged data
or a central directory of more than 8 MiB (some 100,000 members) are one line. Members are read from the zip by
name, never extracted, so a member named `../x.txt` is only a name.
"""

from __future__ import annotations

import contextlib
import functools
import io
import lzma
import re
import zipfile
import zlib
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO

from doppel.errors import ExportError
from doppel.readers.files import regular_file

_INVISIBLE = str.maketrans({"\u200e": None, "\u200f": None, "\u202a": None, "\u202c": None, "\ufeff": None,
                            "\u202f": " ", "\u00a0": " "})
_MARKS = re.compile("[" + "".join(map(chr, _INVISIBLE)) + "]")  # a line holding none needs no cleaning
# "WhatsApp Chat with NAME" in the phone's language (Turkish and Japanese put the name first)
_NAME = re.compile(
    r"^(?:(?:WhatsApp[- ](?:Chat|chat|Konversation)|Chat (?:de )?WhatsApp|Чат WhatsApp|Conversa do WhatsApp|"
    r"Discussion WhatsApp|Czat WhatsApp|Konverzace WhatsApp|Chat WhatsApp|WhatsApp Sohbeti|WhatsApp) "
    r"(?:with|-|с|mit|met|avec|con|com|s|z|med|ile) (?P<name>.+?)|(?P<first>.+?) ile WhatsApp Sohbeti)"
    r"(?: \(\d+\))?$", re.I)
MESSAGE_CAP = 65_536  # characters of one message, WhatsApp's own limit; a longer message is dropped
# a line is read this far at most: a header (date, time, a name of at most 80 characters) is shorter than 256,
# so a line cut here holds a message over the cap, which is dropped whatever the rest of the line says
_LINE_CAP = MESSAGE_CAP + 256
_DIRECTORY = 8 << 20  # bytes of a zip's central directory, which zipfile holds in memory (~550 bytes a member)
_DAMAGED = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError)  # what reading a zip member raises


def chat_name(path: Path) -> str | None:
    match = _NAME.match(path.stem)
    return (match.group("name") or match.group("first")) if match else None


def _directory_size(path: Path) -> int:
    """The size of a zip's central directory by its end record, found as zipfile finds it (0 without one: zipfile
    then says what is wrong); read before zipfile, which reads the whole directory into memory."""
    with path.open("rb") as handle:
        end = handle.seek(0, io.SEEK_END)
        handle.seek(max(0, end - 22 - 65_535))
        tail = handle.read()
    at = len(tail) - 22
    # a record without a comment ends the file; one with a comment is the last signature
    if not (at >= 0 and tail[at:at + 4] == b"PK\x05\x06" and tail[-2:] == b"\0\0"):
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return 0
    size = int.from_bytes(tail[at + 12:at + 16], "little")
    # zip64: the sizes are in a record right before its locator, right before the end record
    if at >= 76 and tail[at - 20:at - 16] == b"PK\x06\x07" and tail[at - 76:at - 72] == b"PK\x06\x06":
        size = int.from_bytes(tail[at - 36:at - 28], "little")
    return size


def _chat_member(path: Path) -> zipfile.ZipInfo:
    """The member of a zip that holds the chat's text; `ExportError` for anything doppel cannot read from it."""
    listed = _directory_size(path)
    if listed > _DIRECTORY:
        raise ExportError(f"{path} lists too many members ({listed:,} bytes of zip directory, more than "
                          f"{_DIRECTORY:,}); extract the chat's .txt and give doppel that")
    try:
        with zipfile.ZipFile(path) as archive:
            texts = [i for i in archive.infolist() if i.filename.lower().endswith(".txt")]
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:  # ValueError: a name that is not its UTF-8
        raise ExportError(f"{path} is not a readable zip ({exc})") from None
    if not texts:
        raise ExportError(f"{path} holds no chat text (.txt); is it a WhatsApp export?")
    base = [i.filename.rsplit("/", 1)[-1] for i in texts]
    chats = [i for i, name in zip(texts, base, strict=True) if name == "_chat.txt" or _NAME.match(name[:-4])]
    if len(chats) == 1 or (not chats and len(texts) == 1):
        info = (chats or texts)[0]
    else:
        shown = ", ".join(repr(i.filename) for i in (chats or texts)[:3]) + (", …" if len(chats or texts) > 3 else "")
        what = "the texts of several chats" if chats else "several .txt files, none named like a chat's text " \
            "(_chat.txt, 'WhatsApp Chat with NAME.txt')"
        raise ExportError(f"{path} holds {what}: {shown}; extract the chat's .txt and give doppel that")
    if info.flag_bits & 0x1:
        raise ExportError(f"{path}: {info.filename!r} is encrypted; extract it with its password and give doppel the "
                          ".txt")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        method = "Deflate64" if info.compress_type == 9 else f"compression method {info.compress_type}"
        raise ExportError(f"{path}: {info.filename!r} is compressed with {method}, which Python's zipfile cannot "
                          "read; extract it with another tool (7-Zip, unzip) and give doppel the .txt")
    return info


class ChatText:
    """The chat's text, a `.txt` or the `.txt` inside a `.zip`, read as lines as often as needed (never whole)."""

    def __init__(self, path: Path) -> None:
        regular_file(path, "point doppel at the chat's .txt or .zip")
        self.path, self.inner, self.name = path, None, chat_name(path)
        self.position = 0  # bytes of the file read so far (inside a zip: in proportion to the text read)
        self._scale = 1.0
        # the day the export was written: a zip member's own date, else the file's modification time
        self.written = datetime.fromtimestamp(path.stat().st_mtime, UTC).date()
        if path.suffix.lower() == ".zip":
            info = _chat_member(path)
            self.inner = info.filename
            self._scale = path.stat().st_size / max(1, info.file_size)
            self.name = self.name or chat_name(Path(self.inner))
            if info.date_time[0] >= 2009:  # else no date (1980, zip's first day): the file's own
                with contextlib.suppress(ValueError):
                    self.written = date(*info.date_time[:3])

    def lines(self) -> Iterator[tuple[str, bool]]:
        """(the line without invisible marks, whether its text after "Name: " began with U+200E, which iOS puts
        before system lines and placeholders). A line is read `_LINE_CAP` characters at most; the rest of a longer
        one is read past and left out."""
        with contextlib.ExitStack() as stack:
            if self.inner is None:
                raw: IO[bytes] = stack.enter_context(self.path.open("rb"))
            else:
                archive = stack.enter_context(zipfile.ZipFile(self.path))
                try:
                    raw = stack.enter_context(archive.open(self.inner))
                except (*_DAMAGED, RuntimeError, NotImplementedError) as exc:
                    raise ExportError(f"{self.path}: {self.inner!r} cannot be read ({exc})") from None
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)
            read = functools.partial(text.readline, _LINE_CAP)
            try:
                for n, line in enumerate(iter(read, "")):
                    if n % 4096 == 0:
                        self.position = int(raw.tell() * self._scale)
                    if len(line) == _LINE_CAP and line[-1] != "\n":
                        for rest in iter(read, ""):
                            if rest[-1] == "\n":
                                break
                    line = line.rstrip("\r\n")
                    if line.isascii() or _MARKS.search(line) is None:  # most lines: nothing to clean
                        yield line, False
                    else:
                        yield line.translate(_INVISIBLE), ": \u200e" in line
            except UnicodeDecodeError as exc:
                raise ExportError(f"{self.path} is not UTF-8 text (byte {exc.start} of a block); is it a WhatsApp "
                                  "export?") from None
            except _DAMAGED as exc:
                raise ExportError(f"{self.path} is damaged: {self.inner!r} cannot be read ({exc}); export the "
                                  "chat again") from None
