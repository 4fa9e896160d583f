"""The memory index: every past session, in small entries, searched by meaning and by keywords.

    DATASET/memory/memory.json      what it is: format, encoder, entries, windows
    DATASET/memory/entries.jsonl    one entry a line (records.MemoryEntry, its window's row and text hash)
    DATASET/memory/vectors.npy      (windows, 512) float32 sentence vectors, a row a window
    DATASET/memory/keywords/        the BM25 index of the entries' stemmed keywords (bm25s); none when no entry has
                                    a word (an export of emoji): then the vectors alone search
    RUN/memory/remembered.jsonl     conversations held with the model (`--remember`, memory/remembered.py)

An entry is a turn, or a few short ones, of about `UNIT_CHARS` (what the memory block shows); a window is the
consecutive entries of a session of about `WINDOW_CHARS` (what a vector embeds, so that a short answer is found by
its question around it). `prepare` builds it from the sessions it writes, so `--redact` and `--pseudonymize`
apply to it as to training. A vector is reused, not computed again, for a window whose text the directory's
previous index already held.

A search scores the entries allowed (ended before a time, of some splits, not excluded) by the cosine similarity of
their window's vector to the query's, plus `KEYWORD_WEIGHT` of BM25 over the stemmed keywords of the entry and its
neighbours (as a share of the best match); an entry said by a person the query names gains `NAMED_BONUS`, one whose
people include all of the conversation's a little (same partner, same chat), and among equals the newer comes
first. Fusing by scores rather than by reciprocal rank keeps a keyword match from outranking the entry that
answers in another language (docs/benchmarks.md has both measured, and the LoCoMo figures of each choice). At a
person's scale (a hundred thousand entries) a brute-force search over the vectors takes milliseconds, so there is
no vector database.

A remembered conversation is found only by the searches of its scope (the API's `user`; None: `doppel chat` and the
requests without one); the prepared entries by every search.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from doppel.errors import MemoryIndexError
from doppel.memory.text import DIMENSIONS, ENCODER, Encoder, keywords
from doppel.records import MemoryEntry, Session, Turn
from doppel.render import is_time

_WORDS = re.compile(r"\w+")

if TYPE_CHECKING:
    from doppel.memory.remembered import Held

MANIFEST, ENTRIES, VECTORS, KEYWORDS = "memory.json", "entries.jsonl", "vectors.npy", "keywords"
KEYWORD_FILES = ("params.index.json", "vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy",
                 "indptr.csc.index.npy")  # what bm25s writes
REMEMBERED = "remembered.jsonl"
EMBED_BATCH = 256  # texts embedded at a time (the encoder's own batch)
FORMAT = "doppel-memory/2"  # entries are small pieces of a session, each window of them one vector
FORMATS = (FORMAT, "doppel-memory/1")  # 1: an entry a window, a vector an entry (read as windows of one entry)
UNIT_CHARS = 160  # an entry: a turn, or a few short ones, of about this much text (what the block shows)
WINDOW_CHARS = 500  # a window: consecutive entries of a session of about this much text (what the vectors embed)
LINE_CHARS = 300  # a longer message is cut
TOP = 40  # entries offered to the memory block, best first; its token budget decides how many go in
CANDIDATES = 50  # taken from each ranking into the fusion
KEYWORD_WEIGHT = 0.5  # the best BM25 match adds this much to its cosine similarity (docs/benchmarks.md)
# BM25's length normalisation, lower than bm25s' 0.75: at 0.75 a short entry that shares one of the query's words
# outranks the longer one that answers it (the cross-lingual fixture's failures), which held the weight at 0.3
BM25_B = 0.3
PEOPLE_BONUS = 0.05  # an entry of the conversation's own people: ahead of others about as relevant
NAMED_BONUS = 0.3  # an entry said by a person the query names ("what did Lena say about …")
SCOPE_CHARS = 200  # a longer scope is kept as its hash


def windows_of(session: Session, split: str) -> list[list[MemoryEntry]]:
    """A session's memory entries, in windows: each entry holds messages of about `UNIT_CHARS` (a turn, or a few
    short turns; a message is never split), each window consecutive entries of about `WINDOW_CHARS`. An entry is
    what the memory block shows; a window is what its sentence vector is of, so that a short turn is found by what
    was said around it."""
    lines = [(turn.speaker, clip(m)) for turn in session.turns for m in turn.messages if m.strip()]
    speakers = tuple(dict.fromkeys(turn.speaker for turn in session.turns))
    units: list[list[tuple[str, str]]] = []
    size = 0
    for line in lines:
        if not units or size + len(line[1]) > UNIT_CHARS:
            units.append([])
            size = 0
        units[-1].append(line)
        size += len(line[1]) + 1
    entries = [MemoryEntry(session.id if len(units) == 1 else f"{session.id}#{k}", session.id, session.chat.id,
                           session.chat.name, speakers, session.start, session.end, split, tuple(unit))
               for k, unit in enumerate(units)]
    windows: list[list[MemoryEntry]] = []
    size = 0
    for entry in entries:
        length = sum(len(m) + 1 for _, m in entry.lines)
        if not windows or size + length > WINDOW_CHARS:
            windows.append([])
            size = 0
        windows[-1].append(entry)
        size += length
    return windows


def entries_of(session: Session, split: str) -> list[MemoryEntry]:
    """A session's memory entries (`windows_of`, the windows joined)."""
    return [entry for window in windows_of(session, split) for entry in window]


def window_text(window: Sequence[MemoryEntry]) -> str:
    """What a window's vector embeds: its entries' messages, one a line."""
    return "\n".join(entry.text for entry in window)


def window_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def search_texts(entries: Sequence[MemoryEntry]) -> list[str]:
    """What each entry's keywords are taken from: its messages and those of the entries before and after it in its
    session (entries of a session are consecutive), so that an answer is found by the words of its question."""
    out = []
    for i, entry in enumerate(entries):
        parts = [entries[i - 1].text] if i > 0 and entries[i - 1].session == entry.session else []
        parts.append(entry.text)
        if i + 1 < len(entries) and entries[i + 1].session == entry.session:
            parts.append(entries[i + 1].text)
        out.append("\n".join(parts))
    return out


def clip(message: str, size: int = LINE_CHARS) -> str:
    """`message` on one line, cut to `size` characters."""
    message = " ".join(message.split())
    return message if len(message) <= size else message[:size - 1] + "…"


def scope_key(scope: str | None) -> str | None:
    """A remembered conversation's scope as it is kept: itself, or the hash of a long one."""
    if scope is None or len(scope) <= SCOPE_CHARS:
        return scope
    return "sha256:" + hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()


def checked_entry(data: Any) -> MemoryEntry:
    """An entry read back from a file; `ValueError` for one that doppel could not have written (a time that is not
    one, a line that is not two strings), so that damage is found when the index is opened, not in a search."""
    entry = MemoryEntry.from_json(data)
    for name in ("start", "end"):
        value = getattr(entry, name)
        if not is_time(value):
            raise ValueError(f"{name} {value!r} is not a time in seconds")
    texts = (entry.id, entry.session, entry.chat_name, entry.split, *entry.speakers,
             *(part for line in entry.lines for part in line))
    if type(entry.chat) is not int or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"entry {entry.id!r} is not one (a chat id that is not a number, or text that is not text)")
    return entry


def problem(exc: BaseException) -> str:
    """What a `ValueError`, `KeyError` or `TypeError` of a line says, in a few words."""
    if isinstance(exc, KeyError):
        return f"no {exc}"
    return str(exc).splitlines()[0][:150] if str(exc) else type(exc).__name__


@dataclass(frozen=True)
class BuildStats:
    entries: int
    embedded: int  # windows whose vector was computed
    reused: int  # windows whose vector was taken from the previous index
    windows: int = 0  # embedded + reused


def build(sessions: Iterable[tuple[Session, str]], folder: Path, previous: Path | None = None,
          progress: Callable[[int, int], None] | None = None, encoder: Encoder | None = None) -> BuildStats:
    """Write the memory of `sessions` ((session, split) pairs) into `folder`; vectors of texts that the index in
    `previous` holds are reused.

    It streams, so that its memory does not grow with the export's entries: each entry is written as it is made,
    keeping only its keywords (ids in one array) and where its vector comes from; the keyword index is built from
    those; then the entries are read back, a batch at a time, to embed the new ones, each vector written to its row
    of `vectors.npy` (by file writes, not a memory map, whose written pages would count as the process's memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    known, old = _previous_rows(previous) if previous is not None else ({}, None)
    sources = array("q")  # per window: the row of its vector in the previous index, -1 when it is to be embedded
    words = _KeywordIds()
    count = 0
    with (folder / ENTRIES).open("w", encoding="utf-8") as handle:
        for session, split in sessions:
            windows = windows_of(session, split)
            texts = iter(search_texts([entry for window in windows for entry in window]))
            for window in windows:
                key = window_hash(window_text(window))
                for entry in window:
                    handle.write(json.dumps({**entry.to_json(), "window": len(sources), "hash": key},
                                            ensure_ascii=False) + "\n")
                    words.add(next(texts))
                    count += 1
                sources.append(known.get(key, -1))
    del known
    index = _index(words)
    del words
    if index is not None:
        index.save(str(folder / KEYWORDS), show_progress=False)
    has_keywords = index is not None
    del index
    todo = sources.count(-1)
    _write_vectors(folder, sources, old, todo, progress, encoder)
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "encoder": ENCODER, "dimensions": DIMENSIONS,
                                               "entries": count, "windows": len(sources),
                                               "keywords": has_keywords}, indent=1) + "\n", encoding="utf-8")
    return BuildStats(count, todo, len(sources) - todo, len(sources))


def _write_vectors(folder: Path, sources: array[int], old: Path | None, todo: int,
                   progress: Callable[[int, int], None] | None, encoder: Encoder | None) -> None:
    """`vectors.npy` (the bytes `np.save` writes) of the windows in `folder`: row i reused from row `sources[i]` of
    `old`, or, where that is -1, embedded; the windows' texts are read back from `entries.jsonl` and embedded 256
    at a time in their order, the batches of embedding them all at once (the vectors the same, bit for bit)."""
    import numpy as np
    from numpy.lib import format as npy

    row = DIMENSIONS * 4
    encode = encoder or Encoder()
    batch: list[tuple[int, str]] = []
    done = 0
    with (folder / VECTORS).open("wb") as out, (folder / ENTRIES).open(encoding="utf-8") as lines, \
            (old.open("rb") if old is not None else contextlib.nullcontext()) as previous:
        npy.write_array_header_1_0(out, {"descr": npy.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                                         "shape": (len(sources), DIMENSIONS)})
        out.flush()
        start = out.tell()
        out.truncate(start + len(sources) * row)
        skip = _header_end(previous) if previous is not None else 0
        reused = previous.fileno() if previous is not None else -1  # a row of -1 never points there

        def flush() -> None:
            nonlocal done
            vectors = np.ascontiguousarray(encode([text for _, text in batch]), dtype=np.float32)
            for (i, _), vector in zip(batch, vectors, strict=True):
                os.pwrite(out.fileno(), vector.tobytes(), start + i * row)
            done += len(batch)
            batch.clear()
            if progress is not None:
                progress(done, todo)

        for i, window in _windows_read(lines):
            source = sources[i]
            if source >= 0:
                os.pwrite(out.fileno(), os.pread(reused, row, skip + source * row), start + i * row)
                continue
            batch.append((i, window_text(window)))
            if len(batch) == EMBED_BATCH:
                flush()
        if batch:
            flush()


def _windows_read(lines: Iterable[str]) -> Iterator[tuple[int, list[MemoryEntry]]]:
    """(row, its entries) of each window of the entry lines `build` wrote, in order."""
    current: list[MemoryEntry] = []
    row = -1
    for line in lines:
        data = json.loads(line)
        if data["window"] != row and current:
            yield row, current
            current = []
        row = data["window"]
        current.append(MemoryEntry.from_json(data))
    if current:
        yield row, current


class _KeywordIds:
    """Every entry's keywords, as ids of one vocabulary in one flat array, handed to bm25s as its `Tokenized.ids`
    (which it only measures and iterates): 4 bytes a keyword, where a list of strings per entry costs 8 a keyword
    and about a hundred more an entry; bm25s's own tokenizer would hold such lists too."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.ids = array("i")
        self.ends = array("q")

    def add(self, text: str) -> None:
        vocab = self.vocab
        self.ids.extend(vocab.setdefault(word, len(vocab)) for word in keywords(text))
        self.ends.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.ends)

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        for end in self.ends:
            yield self.ids[start:end].tolist()
            start = end


def _index(words: _KeywordIds) -> Any:
    """The BM25 index of the entries' keywords; None when not one has a word (all emoji or punctuation), which bm25s
    cannot index: then the vectors alone search."""
    import bm25s
    from bm25s.tokenization import Tokenized

    if not words.ids:
        return None
    index = bm25s.BM25(b=BM25_B)
    index.index(Tokenized(ids=words, vocab=words.vocab), show_progress=False)
    return index


def _keyword_index(texts: Iterable[str]) -> Any:
    """The BM25 index of the texts' keywords (`_index`)."""
    words = _KeywordIds()
    for text in texts:
        words.add(text)
    return _index(words)


def _header_end(handle: BinaryIO) -> int:
    """Where the vectors of an `.npy` file start, its header read."""
    from numpy.lib import format as npy

    version = npy.read_magic(handle)
    header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    header(handle)
    return handle.tell()


def _vector_file(handle: BinaryIO, rows: int) -> int:
    """Where the (rows, DIMENSIONS) float32 vectors of the open `.npy` file start; `ValueError` when the file holds
    anything else. Only its header is read: a damaged one can claim terabytes, which `np.load` would try to
    allocate."""
    import numpy as np
    from numpy.lib import format as npy

    version = npy.read_magic(handle)
    header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
    shape, fortran, dtype = header(handle)
    if shape != (rows, DIMENSIONS) or dtype != np.float32 or fortran:
        raise ValueError(f"{VECTORS} holds {dtype} of shape {shape}, for {rows} entries")
    start = handle.tell()
    size = os.fstat(handle.fileno()).st_size - start
    if size != rows * DIMENSIONS * 4:
        raise ValueError(f"{VECTORS} holds {min(size // 4, rows * DIMENSIONS)} of the {rows * DIMENSIONS} vector "
                         f"numbers it says, for {rows} entries")
    return start


def _vectors(path: Path, rows: int) -> Any:
    """The (rows, DIMENSIONS) float32 vectors of `path`; `ValueError` when the file holds anything else."""
    import numpy as np

    with path.open("rb") as handle:
        _vector_file(handle, rows)
        vectors = np.fromfile(handle, dtype=np.float32, count=rows * DIMENSIONS)
    return vectors.reshape(rows, DIMENSIONS)


def _previous_rows(folder: Path) -> tuple[dict[str, int], Path | None]:
    """{window text hash: row} of an earlier index, and its vectors file; empty and None when there is none, it is
    unreadable or of another format (nothing to reuse). The vectors are read a row at a time as reused, not loaded."""
    try:
        if json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("format") != FORMAT:
            return {}, None
        rows: dict[str, int] = {}
        count = 0
        with (folder / ENTRIES).open(encoding="utf-8") as handle:
            for line in handle:
                data = json.loads(line)
                key, row = data["hash"], data["window"]
                if not isinstance(key, str) or not (row == count or (count and row == count - 1)):
                    raise TypeError("a hash that is not text, or windows out of order")
                if row == count:
                    rows[key] = count
                    count += 1
        with (folder / VECTORS).open("rb") as vectors:
            _vector_file(vectors, count)
        return rows, folder / VECTORS
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, None


class Memory:
    """The index, loaded: its entries, their vectors and keywords, and the remembered conversations, if any."""

    def __init__(self, entries: list[MemoryEntry], vectors: Any, keyword_index: Any,
                 remembered: Path | None = None, encoder: Encoder | None = None, rows: Any = None) -> None:
        import numpy as np

        self.entries = entries
        self.vectors = np.asarray(vectors, dtype=np.float32)  # a row a window
        # the window (row of `vectors`) of each entry; None: a row an entry
        self.rows = np.arange(len(entries), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self._keywords = keyword_index  # covers entries[:self._covered]; None: no entry has a word
        self._covered = len(entries)
        self._moves = 0  # how often entries moved (a remembered conversation replaced): an older reindex is stale
        self.encoder = encoder or Encoder(threads=1)  # one query at a time: one thread answers fastest
        self._batch_encoder: Encoder | None = None  # many (training's): every core
        self.remembered = remembered
        self._held: dict[str, Held] = {}  # the remembered conversations' turns
        self._scopes: dict[str, str | None] = {}  # remembered session → the scope that may recall it
        self._lock = threading.Lock()  # guards the arrays a search takes
        self._writing = threading.Lock()  # one conversation remembered at a time
        self._refresh()

    @classmethod
    def open(cls, folder: Path, remembered: Path | None = None) -> Memory:
        """The index in `folder` (and the conversations remembered in the file `remembered`); `MemoryIndexError`
        when it is missing or damaged."""
        import bm25s

        if not (folder / MANIFEST).is_file():
            raise MemoryIndexError(f"{folder}: no memory index (build it with doppel prepare)")
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") not in FORMATS:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
            windowed = manifest["format"] == FORMAT
            entries: list[MemoryEntry] = []
            rows: list[int] = []
            with (folder / ENTRIES).open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    try:
                        data = json.loads(line)
                        entries.append(checked_entry(data))
                        row = data["window"] if windowed else number - 1
                        expected = (rows[-1], rows[-1] + 1) if rows else (0,)
                        if type(row) is not int or row not in expected:
                            raise ValueError(f"window {row!r} out of order")
                        rows.append(row)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        raise ValueError(f"{ENTRIES}, line {number}: {problem(exc)}") from None
            if len(entries) != manifest["entries"]:
                raise ValueError(f"{len(entries)} entries, the manifest says {manifest['entries']}")
            vectors = _vectors(folder / VECTORS, rows[-1] + 1 if rows else 0)
            index = bm25s.BM25.load(str(folder / KEYWORDS), show_progress=False) if manifest.get(
                "keywords", True) else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MemoryIndexError(f"{folder}: the memory index is damaged ({_reason(exc)}); build it again with "
                                   "doppel prepare, or go on without it (--memory off)") from None
        memory = cls(entries, vectors, index, remembered, rows=rows)
        if remembered is not None and remembered.is_file():
            memory._load_remembered(remembered)
        return memory

    # --- remembered conversations (memory/remembered.py) --------------------------------------------

    def _load_remembered(self, path: Path) -> None:
        import numpy as np

        from doppel.memory import remembered

        try:
            read = remembered.read(path)
        except (OSError, ValueError) as exc:
            raise MemoryIndexError(f"{path}: the remembered conversations are damaged ({_reason(exc)}); move the "
                                   "file away to start a new memory of conversations") from None
        vectors = [vector for _, vector in read.windows]
        missing = [i for i, vector in enumerate(vectors) if vector is None]  # only where a line was lost
        if missing:
            texts = [window_text(read.windows[i][0]) for i in missing]
            for i, vector in zip(missing, self.encoder(texts), strict=True):
                vectors[i] = vector
        self._held, self._scopes = read.held, read.scopes
        if read.windows:
            first = len(self.vectors)
            self.entries = self.entries + [e for window, _ in read.windows for e in window]
            self.rows = np.concatenate([self.rows, np.array(
                [first + k for k, (window, _) in enumerate(read.windows) for _ in window], dtype=np.int64)])
            self.vectors = np.vstack([self.vectors, np.stack(vectors)])
            self._reindex()  # the saved keyword index covers the prepared entries only
        self._refresh()

    def remember(self, conversation: str, turns: Sequence[Turn], scope: str | None = None) -> None:
        """Keep the conversation `conversation` (its turns so far), recalled later by searches of `scope` only: the
        turns not held yet are written, each once, and only the windows they changed are embedded. A history that
        differs from the one held (an edited message, a regenerated reply) replaces it from where it differs."""
        import numpy as np

        from doppel.memory import remembered

        if self.remembered is None:
            raise MemoryIndexError("this memory has no file for remembered conversations")
        scope = scope_key(scope)
        with self._writing:
            held = self._held.get(conversation)
            if held is not None and held.scope != scope:
                return  # another scope's conversation (the same id): never mixed with it
            changed = remembered.change(held, turns, scope, int(time.time()))
            if changed is None:
                return
            held, first = changed
            windows = windows_of(held.session(conversation), "remembered")
            with self._lock:
                mine = self._sessions.get(conversation, [])
                known = {}
                for row in dict.fromkeys(int(self.rows[i]) for i in mine):
                    of_row = [self.entries[i] for i in mine if self.rows[i] == row]
                    known[window_hash(window_text(of_row))] = self.vectors[row]
            hashes = [window_hash(window_text(w)) for w in windows]
            todo = [i for i, key in enumerate(hashes) if key not in known]
            new = dict(zip([hashes[i] for i in todo], self.encoder([window_text(windows[i]) for i in todo]),
                           strict=True)) if todo else {}
            known.update(new)
            remembered.append(self.remembered, conversation, held, first, windows, new)
            vectors = np.stack([known[key] for key in hashes]) if windows else np.zeros((0, DIMENSIONS), np.float32)
            with self._lock:
                drop = self._sessions.get(conversation, [])
                gone = set(drop)
                kept = [i for i in range(len(self.entries)) if i not in gone]
                old_rows = np.unique(self.rows[kept]) if kept else np.zeros(0, np.int64)
                renumber = np.full(len(self.vectors), -1, dtype=np.int64)
                renumber[old_rows] = np.arange(len(old_rows))
                added = [e for w in windows for e in w]
                self.entries = [self.entries[i] for i in kept] + added
                self.rows = np.concatenate([renumber[self.rows[kept]], np.array(
                    [len(old_rows) + k for k, w in enumerate(windows) for _ in w], dtype=np.int64)])
                self.vectors = np.concatenate([self.vectors[old_rows], vectors])
                if drop:
                    self._covered, self._moves = min(self._covered, drop[0]), self._moves + 1
                self._held[conversation], self._scopes[conversation] = held, scope
                self._refresh()
        threading.Thread(target=self._reindex, daemon=True).start()  # found by keywords once it is done

    def _reindex(self) -> None:
        with self._lock:
            entries, moves = list(self.entries), self._moves
        index = _keyword_index(search_texts(entries))
        with self._lock:
            if moves == self._moves and len(entries) >= self._covered:
                self._keywords, self._covered = index, len(entries)

    def _refresh(self) -> None:
        import numpy as np

        self._ends = np.array([e.end for e in self.entries], dtype=np.int64)
        self._splits = {split: np.array([e.split == split for e in self.entries])
                        for split in {e.split for e in self.entries}}
        self._sessions: dict[str, list[int]] = {}
        for i, entry in enumerate(self.entries):
            self._sessions.setdefault(entry.session, []).append(i)
        self._people = [frozenset(e.speakers) for e in self.entries]
        self._said = [frozenset(speaker for speaker, _ in e.lines) for e in self.entries]
        by_speaker: dict[str, list[int]] = {}
        for i, said in enumerate(self._said):
            for speaker in said:
                by_speaker.setdefault(speaker, []).append(i)
        self._by_speaker = {k: np.array(v, dtype=np.int64) for k, v in by_speaker.items()}
        self._names = _names(by_speaker)
        # who may find an entry: 0 every search (the prepared ones), k the searches of the k-th scope
        self._scope_codes: dict[str | None, int] = {}
        self._owners = np.zeros(len(self.entries), dtype=np.int64)
        for session, scope in self._scopes.items():
            code = self._scope_codes.setdefault(scope, len(self._scope_codes) + 1)
            self._owners[self._sessions.get(session, [])] = code

    # --- search -------------------------------------------------------------------------------------

    def search(self, query: str, before: int | None = None, splits: Collection[str] | None = None,
               people: Collection[str] = (), exclude: Collection[str] = (), top: int = TOP,
               scope: str | None = None) -> list[MemoryEntry]:
        """The `top` entries that best answer `query`, best first, among those of `splits` (None: any) that ended
        before `before` (None: any time), whose session is not in `exclude`, and, of the remembered conversations,
        those of `scope`."""
        return self.search_many([query], [before], splits, [people], exclude, top, scope=scope)[0]

    def search_many(self, queries: Sequence[str], before: Sequence[int | None], splits: Collection[str] | None,
                    people: Sequence[Collection[str]], exclude: Collection[str] = (), top: int = TOP,
                    progress: Callable[[int], None] | None = None, scope: str | None = None
                    ) -> list[list[MemoryEntry]]:
        """`search` for many queries at once (training: every session's), the vectors compared a block at a time."""
        import numpy as np

        with self._lock:
            entries, vectors, ends, keyword_index, covered = (self.entries, self.vectors, self._ends,
                                                              self._keywords, self._covered)
            entry_splits, sessions, entry_people = self._splits, self._sessions, self._people
            rows, said, names, by_speaker = self.rows, self._said, self._names, self._by_speaker
            owners, code = self._owners, self._scope_codes.get(scope_key(scope), -1)
        allowed = (owners == 0) | (owners == code)
        if splits is not None:
            of_splits = np.zeros(len(entries), dtype=bool)
            for split in splits:
                of_splits |= entry_splits.get(split, False)
            allowed &= of_splits
        for session in exclude:
            allowed[sessions.get(session, [])] = False
        out: list[list[MemoryEntry]] = []
        block = 256
        encoder = self.encoder
        if len(queries) > 1:
            encoder = self._batch_encoder = self._batch_encoder or Encoder()
        for start in range(0, len(queries), block):
            chunk = list(queries[start:start + block])
            dense = (vectors @ encoder(chunk).T)[rows] if len(entries) else np.zeros((0, len(chunk)), np.float32)
            for j, query in enumerate(chunk):
                limit = before[start + j]
                mask = allowed if limit is None else allowed & (ends < limit)
                ranked = _fuse(dense[:, j], _keyword_scores(keyword_index, covered, query, len(entries)), mask,
                               entry_people, frozenset(people[start + j]), ends, said, named(names, query), by_speaker)
                out.append([entries[i] for i in ranked[:top]])
            if progress is not None:
                progress(len(chunk))
        return out


def _best(scores: Any, mask: Any) -> Any:
    """Indexes of the `CANDIDATES` best scores among the allowed ones."""
    import numpy as np

    masked = np.where(mask, scores, -np.inf)
    if len(masked) > CANDIDATES:
        masked_top = np.argpartition(-masked, CANDIDATES - 1)[:CANDIDATES]
    else:
        masked_top = np.arange(len(masked))
    return masked_top[np.isfinite(masked[masked_top])]


def _keyword_scores(index: Any, covered: int, query: str, size: int) -> Any:
    """BM25 scores of every entry (0 for those the index does not cover yet)."""
    import numpy as np

    scores = np.zeros(size, dtype=np.float32)
    terms = keywords(query)
    if terms and index is not None and covered:
        scores[:covered] = index.get_scores(terms)[:covered]
    return scores


def _names(speakers: Collection[str]) -> dict[str, frozenset[str]]:
    """{a word or words that name a person, lowercased: the speakers it names}: each speaker's full name and, of a
    name of several words, its first (a question says "Lena", the export "Lena Volkova")."""
    out: dict[str, set[str]] = {}
    for speaker in speakers:
        words = _WORDS.findall(speaker.lower())
        for key in {" ".join(words), *words[:1]} - {""}:
            if len(key) > 1:
                out.setdefault(key, set()).add(speaker)
    return {k: frozenset(v) for k, v in out.items()}


def named(names: dict[str, frozenset[str]], query: str) -> frozenset[str]:
    """The speakers `query` names, by their first or full name as whole words."""
    words = _WORDS.findall(query.lower())
    found: set[str] = set()
    for size in (1, 2, 3):
        for k in range(len(words) - size + 1):
            found |= names.get(" ".join(words[k:k + size]), frozenset())
    return frozenset(found)


def _fuse(dense: Any, keyword: Any, mask: Any, entry_people: list[frozenset[str]], people: frozenset[str],
          ends: Any, said: list[frozenset[str]] | None = None, named: frozenset[str] = frozenset(),
          by_speaker: dict[str, Any] | None = None) -> list[int]:
    """The best allowed entries, best first: cosine similarity (of the entry's window), plus `KEYWORD_WEIGHT` times
    the BM25 score as a share of the best allowed one, plus `PEOPLE_BONUS` for the conversation's people and
    `NAMED_BONUS` for an entry said by a person the query names; among equals the newer. The candidates are the
    `CANDIDATES` best of each ranking, and those said by the people named."""
    import numpy as np

    keyword = np.where(mask, keyword, 0.0)
    best = float(keyword.max()) if len(keyword) else 0.0
    candidates = _best(dense, mask)
    if best > 0:
        candidates = np.union1d(candidates, _best(keyword, keyword > 0))
    if by_speaker and named:
        of_named = np.zeros(len(dense), dtype=bool)
        for speaker in named:
            of_named[by_speaker.get(speaker, [])] = True
        fused = dense + KEYWORD_WEIGHT * keyword / best if best > 0 else dense
        candidates = np.union1d(candidates, _best(fused, mask & of_named))
    if best > 0:
        score = dense[candidates] + KEYWORD_WEIGHT * keyword[candidates] / best
    else:
        score = dense[candidates].astype(np.float64)
    if people:
        score = score + PEOPLE_BONUS * np.array([people <= entry_people[i] for i in candidates.tolist()])
    if named and said is not None:
        score = score + NAMED_BONUS * np.array([bool(named & said[i]) for i in candidates.tolist()])
    order = np.lexsort((candidates, -ends[candidates], -score))
    return [int(i) for i in candidates[order]]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
