"""`prepare`: export → dataset directory (sessions.train.jsonl, sessions.eval.jsonl, stats.json).

Readers: Telegram Desktop's JSON (readers/telegram.py), WhatsApp's chat export (whatsapp.py), DiscordChatExporter's
JSON (discord.py), Messenger and Instagram from Meta's download (meta.py), signal-export's Markdown or JSON of
Signal Desktop (signal.py), LINE's chat history (line.py), the WeChat CSV of PyWxDump and MemoTrace (wechat.py),
the Messages chat.db of a Mac (imessage.py) and plain JSONL (jsonl.py) all give the same `Header`, `Chat` and
`Message` records through one entry point (readers/records.py); everything after them is one path. `DETECTION`
tells an export's format, `READERS` reads it: a new format is one module and a line in each.

The dataset is built in a temporary sibling directory and swapped into place only when complete,
so a failed run never leaves a half-written dataset and never damages an existing one. An existing
directory is replaced only when it holds nothing but a dataset's files (see `_check_target`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from doppel import config, workfolder
from doppel.config import PrepareConfig
from doppel.dataset import (
    CONFIG_FILE,
    DATASET_FILES,
    EVAL_FILE,
    MARKER,
    MARKER_FILE,
    MEMORY_DIR,
    STATS_FILE,
    TRAIN_FILE,
    Dataset,
    DatasetStats,
    Speaker,
    jsonl_line,
)
from doppel.errors import ConfigError, ExportError
from doppel.preparing import privacy, sessions
from doppel.preparing.sessions import Census
from doppel.readers import discord, imessage, jsonl, line, meta, records, signal, telegram, wechat, whatsapp
from doppel.readers.records import Chat, Header, Message, Reader
from doppel.records import Session


def prepare(export: str | Path | Sequence[str | Path], out: str | Path, cfg: PrepareConfig | None = None,
            progress: Callable[[int, int], None] | None = None,
            memory_progress: Callable[[int, int], None] | None = None) -> DatasetStats:
    """Build the dataset in `out` from one export or several (each a file, or the folder that holds it; of any
    format) and return its stats. `progress` is called with the bytes read and the export's size, `memory_progress`
    with the memory entries embedded and the number to embed. Raises `ExportError` on bad input."""
    cfg = cfg or PrepareConfig()
    out = Path(out).resolve()  # "." too has a parent for the work folder
    paths = [Path(export)] if isinstance(export, str | Path) else [Path(e) for e in export]
    if not paths:
        raise ExportError("no export given")
    sources = [_open(path, cfg, progress) for path in paths]
    header = sources[0].header if len(sources) == 1 else records.joined([s.header for s in sources])
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    work = work_folder(out)
    try:
        census = _collect_all(sources, cfg, work / "spool.jsonl")
        stats = _write(census, header, cfg, work)
        stats = replace(stats, reading={s.path.name: dict(s.header.notes) for s in sources if s.header.notes})
        (work / "spool.jsonl").unlink()
        if cfg.memory:
            stats = _memory(work, out, stats, memory_progress)
        stats.write(work)
        config.dump(cfg, work / CONFIG_FILE)
        (work / MARKER_FILE).write_text(MARKER, encoding="utf-8")
        (work / workfolder.MARK).unlink()
        _swap(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return stats


def work_folder(out: Path) -> Path:
    """A new hidden folder beside `out` to build the dataset in, marked with this process and machine, so that a later
    run can tell one left by a run that was killed and remove it (`remove_stale`)."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    workfolder.mark(work, "prepare")
    return work


def remove_stale(out: Path) -> None:
    """Remove the work folders for `out` of runs that were killed (doppel/workfolder.py)."""
    for folder in out.parent.iterdir():
        if folder.name.startswith(f".{out.name}.") and workfolder.left_by_dead_process(folder, "prepare"):
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Source:
    path: Path
    kind: str
    header: Header
    items: Iterator[Chat | Message]


def _open(path: Path, cfg: PrepareConfig, progress: Callable[[int, int], None] | None) -> _Source:
    kind = detect(path, cfg.format)
    if kind == "telegram":
        path = telegram.export_file(path)  # a folder's result.json: its size, and its name in stats.json
    size = path.stat().st_size if path.is_file() else 0
    header, items = READERS[kind](path, (lambda n: progress(n, size)) if progress else None)
    return _Source(path, kind, header, items)


def _collect_all(sources: list[_Source], cfg: PrepareConfig, spool: Path) -> Census:
    """Every export's census, one after the other; their spools joined into `spool`. A session that two exports
    both hold (the same chat and first message: a chat exported twice) is kept once."""
    if len(sources) == 1:
        return _collect(sources[0], cfg, spool)
    merged = Census()
    seen: set[tuple[int, int]] = set()
    with spool.open("wb") as joined:
        for k, source in enumerate(sources):
            own = spool.with_name(f"spool.{k}.jsonl")
            census = _collect(source, cfg, own)
            offset = len(merged.chats)
            with own.open("rb") as handle:
                for line in handle:
                    row = msgspec.json.decode(line)
                    chat = census.chats[row[0]].id
                    if (chat, row[1]) in seen:
                        merged.dropped["duplicate"] += sum(len(texts) for _, texts in row[4])
                        census.spooled[chat] -= 1
                        continue
                    seen.add((chat, row[1]))
                    row[0] += offset
                    joined.write(msgspec.json.encode(row) + b"\n")
            own.unlink()
            merged.chats += census.chats
            merged.senders += census.senders
            for sid, name in census.names.items():
                if name is not None or sid not in merged.names:
                    merged.names[sid] = name
            merged.dropped.update(census.dropped)
            merged.excluded_chats.update(census.excluded_chats)
            merged.matched |= census.matched
            merged.spooled.update(census.spooled)
            merged.split.update(census.split)
    return merged


def _memory(work: Path, out: Path, stats: DatasetStats, progress: Callable[[int, int], None] | None
            ) -> DatasetStats:
    """The memory index of the sessions just written; vectors of texts the dataset in `out` already had are reused."""
    from dataclasses import asdict, replace

    from doppel.memory import index

    dataset = Dataset(work, stats)
    sessions = ((s, split) for split in ("train", "eval") for s in dataset.sessions(split))
    built = index.build(sessions, work / MEMORY_DIR, out / MEMORY_DIR if (out / MEMORY_DIR).is_dir() else None,
                        progress)
    return replace(stats, memory=asdict(built))


def _memory_files() -> set[str]:
    from doppel.memory import index

    return {index.MANIFEST, index.ENTRIES, index.VECTORS, *(f"{index.KEYWORDS}/{n}" for n in index.KEYWORD_FILES)}


def _check_target(out: Path) -> None:
    """Allow `out` to be missing, empty or a dataset; anything else is an `ExportError`.

    A dataset holds doppel's files only, among them the marker or, from versions that wrote no
    marker, stats.json.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if not out.is_dir():
        return
    entries = sorted(out.iterdir())
    memory = out / MEMORY_DIR
    stray = next((p.name for p in entries if (p.name not in DATASET_FILES or not p.is_file()) and p != memory), None)
    if stray is None and memory.exists():
        known = _memory_files()
        stray = next((f"{MEMORY_DIR}/{p.relative_to(memory)}" for p in sorted(memory.rglob("*"))
                      if (str(p.relative_to(memory)) not in known or not p.is_file()) and p != memory / "keywords"),
                     None)
    if stray is not None:
        raise ExportError(f"{out} is not a doppel dataset ({stray} is not one of its files); "
                          "refusing to replace it")
    if entries and not {p.name for p in entries} & {MARKER_FILE, STATS_FILE}:
        raise ExportError(f"{out} is not a doppel dataset (no {STATS_FILE}); refusing to replace it")


def _swap(work: Path, out: Path) -> None:
    old = None
    if out.exists():
        _check_target(out)  # again: reading a large export takes minutes
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    work.rename(out)
    if old is not None:
        # by name: a file that appeared since the check stays, in the renamed directory
        for name in DATASET_FILES | {f"{MEMORY_DIR}/{n}" for n in _memory_files()}:
            (old / name).unlink(missing_ok=True)
        for folder in (old / MEMORY_DIR / "keywords", old / MEMORY_DIR, old):
            if folder.is_dir():
                folder.rmdir()


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _text(path: Path) -> bool:
    return _suffix(path) in (".txt", ".md") and path.is_file()


def _folder(path: Path) -> bool:
    return path.is_dir() and not (path / "result.json").exists()


def _json(path: Path) -> bool:
    return path.is_file() and _suffix(path) == ".json"


def _sample(path: Path) -> str:
    """A text file's first 64 KiB, which tell LINE's chat history (its title, or TABs after the times) and Signal's
    Markdown (whose dates WhatsApp's year-first layouts would also read) from WhatsApp's chat."""
    try:
        with path.open("rb") as handle:
            return handle.read(1 << 16).decode("utf-8", "ignore").removeprefix("\ufeff")
    except OSError:  # unreadable: the reader says so
        return ""


# (format, whether a path is its export), asked in this order: the first yes is the export's format, else Telegram's
DETECTION: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    ("jsonl", lambda p: _suffix(p) == ".jsonl"),
    ("wechat", lambda p: _suffix(p) == ".csv"),
    ("imessage", lambda p: _suffix(p) == ".db" or (p.is_dir() and (p / "chat.db").is_file())),
    ("line", lambda p: _text(p) and _suffix(p) == ".txt" and line.is_history(_sample(p))),
    ("signal", lambda p: _text(p) and (signal.is_markdown(_sample(p)) or _suffix(p) == ".md")),
    ("whatsapp", lambda p: _suffix(p) in (".txt", ".zip")),
    ("meta", lambda p: _folder(p) and meta.is_meta(p)),
    ("signal", lambda p: _folder(p) and signal.is_export(p)),
    ("wechat", lambda p: _folder(p) and wechat.is_export(p)),
    ("signal", lambda p: _json(p) and signal.is_json(p)),
    ("meta", lambda p: _json(p) and meta.is_meta(p)),
    ("discord", lambda p: _json(p) and discord.first_key(p) == "guild"),
)
READERS: dict[str, Reader] = {
    "telegram": telegram.read, "whatsapp": whatsapp.read, "discord": discord.read, "meta": meta.read,
    "jsonl": jsonl.read, "signal": signal.read, "line": line.read, "wechat": wechat.read, "imessage": imessage.read}


def detect(export: Path, chosen: str = "auto") -> str:
    """The export's format: the one chosen, or the first of `DETECTION` that the path is (told by the file's name
    and suffix, a folder's files, a JSON file's first key or line, a text file's first 64 KiB), else Telegram's."""
    if chosen != "auto":
        return chosen
    return next((kind for kind, test in DETECTION if test(export)), "telegram")


def _collect(source: _Source, cfg: PrepareConfig, spool: Path) -> Census:
    with spool.open("wb") as handle:
        return sessions.collect(source.items, cfg, handle, source.header.shifted)


def _write(census: Census, header: Header, cfg: PrepareConfig, work: Path) -> DatasetStats:
    unmatched = [v for v in cfg.chat if v not in census.matched]
    if unmatched:
        raise ConfigError(f"chat {unmatched[0]!r} matched no chat in the export")
    if header.one_chat:
        _check_single_chat(census)
    same = sessions.same_people(census, cfg.same_person)
    owner = sessions.resolve_owner(header, census, cfg)
    owner = same.get(owner, owner) if owner else owner  # the account owner joined with another export's owner
    if owner == header.owner_id and owner in census.names and census.names[owner] is None:
        census.names[owner] = header.owner_name  # their messages have "from": null
    activity = sum(census.senders, Counter())
    labels = sessions.unique_labels(census.names, activity)
    trained = sessions.trained_ids(cfg, owner, labels, header.shifted)
    rename: Callable[[str], str] = sessions.same_text
    if cfg.pseudonymize:
        alias = privacy.aliases(sid for sid, _ in activity.most_common())
        rename = privacy.name_replacer({n: alias[s] for s, n in census.names.items() if n})
        labels = {sid: alias.get(sid, label) for sid, label in labels.items()}
    spool = work / "spool.jsonl"

    def kept() -> Iterator[Session]:
        with spool.open("rb") as handle:
            yield from sessions.sessions(handle, census, labels, trained, rename, same)

    # with every turn trained, every spooled session (two turns or more) satisfies the context rule
    per_chat = census.spooled if trained is None else Counter(s.chat.id for s in kept())
    per_chat = +per_chat
    if not per_chat:
        raise ExportError("no usable conversations in the export: no session with a reply "
                          "(check the chat selection, include_groups or train_on)")
    to_eval = sessions.eval_counts(per_chat, cfg.eval_fraction)
    seen: Counter[int] = Counter()
    counts = Counter[str]()
    speakers: dict[str, Counter[str]] = {}
    n_turns = n_messages = 0
    with (work / TRAIN_FILE).open("wb") as train, (work / EVAL_FILE).open("wb") as held_out:
        for session in kept():
            chat = session.chat.id
            seen[chat] += 1
            split = "eval" if seen[chat] > per_chat[chat] - to_eval[chat] else "train"
            counts[split] += 1
            (held_out if split == "eval" else train).write(jsonl_line(session))
            for turn in session.turns:
                person = speakers.get(turn.speaker_id)
                if person is None:
                    person = speakers[turn.speaker_id] = Counter()
                person["messages"] += len(turn.messages)
                person["turns"] += 1
                n_messages += len(turn.messages)
            n_turns += len(session.turns)
    total = counts["train"] + counts["eval"]
    owner_name = labels.get(owner) if owner else None
    return _stats(census, owner, owner_name, labels, speakers, counts, len(per_chat), n_turns / total, n_messages)


_NEVER_BY_DEFAULT = {"bot": "a bot chat", "channel": "a channel", "saved messages": "Saved Messages",
                     "replies": "the replies chat", "verification codes": "the verification codes chat",
                     "Telegram service": "Telegram's service chat", "other": "a chat of an unknown type"}


def _check_single_chat(census: Census) -> None:
    """A single-chat export whose chat is not used, or has nothing in it, says so (and what to do)."""
    if not census.chats:
        raise ExportError("the export holds no chat")
    chat = census.chats[0]
    name = chat.name or str(chat.id)
    reason = next(iter(census.excluded_chats), None)
    if reason == "group":
        raise ExportError(f"this export is the group {name!r}; groups are used only with --include-groups")
    if reason == "excluded by --exclude-chat":
        raise ExportError(f"this export's only chat, {name!r}, is excluded by --exclude-chat")
    if reason in _NEVER_BY_DEFAULT:
        raise ExportError(f"this export is {_NEVER_BY_DEFAULT[reason]} ({name!r}), which is not used by default; "
                          f"--chat {name!r} uses it")
    if not any(census.senders):
        raise ExportError(f"the chat {name!r} has no messages to learn from (none, or only ones prepare leaves out: "
                          "service messages, media without a caption, forwards)")


def _warnings(census: Census, owner: str | None) -> list[str]:
    """Groups whose kept messages are all the owner's (the export held only their own messages), and chats whose
    sessions were split at the cap on a session's size."""
    names = {chat.id: chat.name or str(chat.id) for chat in reversed(census.chats)}
    return [f"group {chat.name or chat.id!s} holds only your own messages (a full export keeps only "
            "yours by default); export it on its own with 'Export chat history' to use it"
            for chat, senders in zip(census.chats, census.senders, strict=True)
            if chat.type in sessions.GROUP_TYPES and senders and set(senders) == {owner}] + [
        f"chat {names[chat]}: sessions split {n} time{'s' * (n != 1)}, before a message that would have taken one past "
        f"{sessions.SESSION_CHARS:,} characters" for chat, n in sorted(census.split.items())]


def _stats(census: Census, owner: str | None, owner_name: str | None, labels: dict[str, str],
           speakers: dict[str, Counter[str]], counts: Counter[str], chats: int,
           turns_per_session: float, messages: int) -> DatasetStats:
    ranked = sorted(speakers.items(), key=lambda kv: (-kv[1]["messages"], kv[0]))
    total = counts["train"] + counts["eval"]
    return DatasetStats(
        owner, owner_name, chats, counts["train"], counts["eval"], round(turns_per_session, 4),
        round(messages / total, 4), messages,
        tuple(Speaker(sid, labels[sid], c["messages"], c["turns"]) for sid, c in ranked),
        dict(census.dropped.most_common()), dict(census.excluded_chats.most_common()),
        tuple(_warnings(census, owner)))
