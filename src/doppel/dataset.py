"""A dataset directory: its files, its typed stats, and its sessions. `preparing/` writes it; training,
evaluation and chat read it through `Dataset.open`.

    DIR/sessions.train.jsonl   one session per line (records.Session)
    DIR/sessions.eval.jsonl
    DIR/stats.json             owner, chats, sessions, speakers, dropped messages
    DIR/config.yaml            the resolved prepare options
    DIR/.doppel-dataset        marks a directory that doppel wrote
    DIR/memory/                the memory index of the sessions (memory/index.py), unless prepared without
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from doppel.errors import DatasetError
from doppel.records import Session
from doppel.render import header_name, is_time

TRAIN_FILE, EVAL_FILE, STATS_FILE, CONFIG_FILE = "sessions.train.jsonl", "sessions.eval.jsonl", "stats.json", \
    "config.yaml"
MARKER_FILE, MARKER = ".doppel-dataset", "doppel-dataset/1\n"  # written into every dataset, by doppel only
DATASET_FILES = frozenset({TRAIN_FILE, EVAL_FILE, STATS_FILE, CONFIG_FILE, MARKER_FILE})
MEMORY_DIR = "memory"
Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Speaker:
    id: str
    name: str
    messages: int
    turns: int


@dataclass(frozen=True)
class DatasetStats:
    """What stats.json says: who is who, and how much of the export went where."""

    owner_id: str | None
    owner_name: str | None
    chats: int
    train_sessions: int
    eval_sessions: int
    turns_per_session: float
    messages_per_session: float
    messages: int
    speakers: tuple[Speaker, ...]  # most active first
    dropped: dict[str, int] = field(default_factory=dict)  # messages left out, by reason
    excluded_chats: dict[str, int] = field(default_factory=dict)  # chats left out, by reason
    warnings: tuple[str, ...] = ()
    memory: dict[str, Any] = field(default_factory=dict)  # the memory index: entries, embedded, reused
    reading: dict[str, dict[str, str]] = field(default_factory=dict)  # per export file: how it was read (dates)

    @property
    def speaker_names(self) -> list[str]:
        return [s.name for s in self.speakers]

    def to_json(self) -> dict[str, Any]:
        return {"owner": {"id": self.owner_id, "name": self.owner_name}, "chats": self.chats,
                "sessions": {"train": self.train_sessions, "eval": self.eval_sessions},
                "turns_per_session": self.turns_per_session, "messages_per_session": self.messages_per_session,
                "messages": self.messages,
                "speakers": [{"id": s.id, "name": s.name, "messages": s.messages, "turns": s.turns}
                             for s in self.speakers],
                "dropped": self.dropped, "excluded_chats": self.excluded_chats, "warnings": list(self.warnings),
                "memory": self.memory, **({"reading": self.reading} if self.reading else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetStats:
        owner = data.get("owner") or {}
        return cls(owner.get("id"), owner.get("name"), data["chats"], data["sessions"]["train"],
                   data["sessions"]["eval"], data["turns_per_session"], data["messages_per_session"],
                   data["messages"], tuple(Speaker(**s) for s in data["speakers"]), dict(data.get("dropped", {})),
                   dict(data.get("excluded_chats", {})), tuple(data.get("warnings", ())),
                   dict(data.get("memory") or {}), dict(data.get("reading") or {}))

    @classmethod
    def read(cls, path: Path) -> DatasetStats:
        """From a stats.json (or a run's copy of it); `DatasetError` if it is not one."""
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path} is not a doppel dataset's stats ({type(exc).__name__}: {exc})") from None

    def write(self, folder: Path) -> None:
        (folder / STATS_FILE).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n",
                                         encoding="utf-8")

    def summary(self, top: int = 5) -> list[str]:
        """Human summary lines."""
        total = self.train_sessions + self.eval_sessions
        lines = [f"{total:,} sessions from {self.chats:,} chats, "
                 f"{self.messages_per_session:.2f} messages per session on average "
                 f"({self.train_sessions:,} train, {self.eval_sessions:,} eval)"]
        # names (and the warnings that quote them) as one line each: an ESC in a name never reaches the terminal
        lines.append(f"you: {header_name(self.owner_name or '')} ({self.owner_id})" if self.owner_id
                     else "you: unknown (--me)")
        people = ", ".join(f"{header_name(s.name)} {s.messages:,}" for s in self.speakers[:top])
        lines.append(f"top speakers (messages): {people}")
        if self.dropped:
            lines.append("messages dropped: " + ", ".join(f"{k} {v:,}" for k, v in self.dropped.items()))
        lines.extend(f"warning: {header_name(w)}" for w in self.warnings)
        if self.memory:
            windows = self.memory.get("windows", self.memory["entries"])
            lines.append(f"memory: {self.memory['entries']:,} entries of past sessions in {windows:,} windows "
                         f"({self.memory['embedded']:,} embedded, {self.memory['reused']:,} reused)")
        if self.excluded_chats:
            lines.append("chats not used: " + ", ".join(f"{k} {v:,}" for k, v in self.excluded_chats.items()))
        return lines


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset directory."""

    path: Path
    stats: DatasetStats

    @classmethod
    def open(cls, path: str | Path) -> Dataset:
        """The dataset in `path`; `DatasetError` when there is none."""
        folder = Path(path)
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such dataset directory" if not folder.exists() else
                               f"{folder} is not a directory; give a dataset directory (doppel prepare -o DIR)")
        if not (folder / STATS_FILE).is_file() or not (folder / TRAIN_FILE).is_file():
            raise DatasetError(f"{folder} is not a doppel dataset (no {STATS_FILE}); run doppel prepare")
        return cls(folder, DatasetStats.read(folder / STATS_FILE))

    @property
    def memory_path(self) -> Path | None:
        """The memory index's directory, None when the dataset has none."""
        folder = self.path / MEMORY_DIR
        return folder if folder.is_dir() else None

    def sessions(self, split: Split = "train") -> Iterator[Session]:
        """The sessions of one split, in file order (each chat's newest last)."""
        path = self.path / (TRAIN_FILE if split == "train" else EVAL_FILE)
        if not path.is_file():
            raise DatasetError(f"{self.path} is not a doppel dataset (no {path.name}); run doppel prepare")
        decode = msgspec.json.Decoder(Session).decode
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    session = decode(line)
                except msgspec.DecodeError as exc:
                    raise DatasetError(f"{path} has a line that is not a session ({exc}); "
                                       "run doppel prepare again") from None
                for verb, value in (("starts", session.start), ("ends", session.end)):
                    if not is_time(value):
                        raise DatasetError(f"{path}, line {number}: session {session.id} {verb} at {value}, not a "
                                           "time (unix seconds of the years 1 to 9999); correct the export's times "
                                           "and run doppel prepare again")
                yield session

    def check(self) -> None:
        """Read every session once: a `DatasetError` for a line that is not one comes before a long job starts."""
        splits: tuple[Split, ...] = ("train", "eval")
        for split in splits:
            for _ in self.sessions(split):
                pass


_ENCODE = msgspec.json.Encoder().encode


def jsonl_line(obj: Any) -> bytes:
    """One compact JSON line (a dataclass such as `Session` is written as its fields); U+2028/U+2029 escaped so
    that no line-splitting reader breaks it apart."""
    data = _ENCODE(obj)
    if b"\xe2\x80\xa8" in data or b"\xe2\x80\xa9" in data:
        data = data.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
    return data + b"\n"
