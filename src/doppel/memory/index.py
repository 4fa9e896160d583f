"""The memory index: every past session (a long one in windows), searched by meaning and by keywords.

    DATASET/memory/memory.json      what it is: format, encoder, entries, when built
    DATASET/memory/entries.jsonl    one entry a line (records.MemoryEntry, and its text's hash)
    DATASET/memory/vectors.npy      (entries, 512) float32 sentence vectors, row i for line i
    DATASET/memory/keywords/        the BM25 index of the entries' stemmed keywords (bm25s); none when no entry has
                                    a word (an export of emoji): then the vectors alone search
    RUN/memory/remembered.jsonl     conversations held with the model (`--remember`, memory/remembered.py)

`prepare` builds it from the sessions it writes, so `--redact` and `--pseudonymize` apply to it as to training. A
vector is reused, not computed again, for an entry whose text the directory's previous index already held.

A search scores the entries allowed (ended before a time, of some splits, not excluded) by the cosine similarity of
their vectors to the query's, plus a share of BM25 over the stemmed keywords (the best keyword match adds 0.15); an
entry whose people include all of the conversation's gains a little (same partner, same chat), and among equals the
newer comes first. Fusing by scores rather than by reciprocal rank keeps a keyword match from outranking the entry
that answers in another language (docs/benchmarks.md has both measured). At a person's scale (a hundred thousand
entries) a brute-force search over the vectors takes milliseconds, so there is no vector database.

A remembered conversation is found only by the searches of its scope (the API's `user`; None: `doppel chat` and the
requests without one); the prepared entries by every search.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppel.errors import MemoryIndexError
from doppel.memory.text import DIMENSIONS, ENCODER, Encoder, keywords
from doppel.records import MemoryEntry, Session, Turn
from doppel.render import is_time

if TYPE_CHECKING:
    from doppel.memory.remembered import Held

MANIFEST, ENTRIES, VECTORS, KEYWORDS = "memory.json", "entries.jsonl", "vectors.npy", "keywords"
KEYWORD_FILES = ("params.index.json", "vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy",
                 "indptr.csc.index.npy")  # what bm25s writes
REMEMBERED = "remembered.jsonl"
FORMAT = "doppel-memory/1"
WINDOW_CHARS = 500  # a longer session is remembered in windows of about this much text
LINE_CHARS = 300  # a longer message is cut
TOP = 4  # entries offered to the memory block, best first; its token budget decides how many go in
CANDIDATES = 50  # taken from each ranking into the fusion
KEYWORD_WEIGHT = 0.15  # the best BM25 match adds this much to its cosine similarity (docs/benchmarks.md)
PEOPLE_BONUS = 0.05  # an entry of the conversation's own people: ahead of others about as relevant
SCOPE_CHARS = 200  # a longer scope is kept as its hash


def entries_of(session: Session, split: str) -> list[MemoryEntry]:
    """A session's memory entries: one, or windows of about `WINDOW_CHARS` for a long session."""
    lines = [(turn.speaker, clip(m)) for turn in session.turns for m in turn.messages if m.strip()]
    speakers = tuple(dict.fromkeys(turn.speaker for turn in session.turns))
    windows: list[list[tuple[str, str]]] = []
    size = 0
    for line in lines:
        if not windows or size + len(line[1]) > WINDOW_CHARS:
            windows.append([])
            size = 0
        windows[-1].append(line)
        size += len(line[1]) + 1
    return [MemoryEntry(session.id if len(windows) == 1 else f"{session.id}#{k}", session.id, session.chat.id,
                        session.chat.name, speakers, session.start, session.end, split, tuple(window))
            for k, window in enumerate(windows)]


def clip(message: str, size: int = LINE_CHARS) -> str:
    """`message` on one line, cut to `size` characters."""
    message = " ".join(message.split())
    return message if len(message) <= size else message[:size - 1] + "…"


def text_hash(entry: MemoryEntry) -> str:
    return hashlib.sha1(entry.text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


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
    embedded: int  # vectors computed
    reused: int  # vectors taken from the previous index


def build(sessions: Iterable[tuple[Session, str]], folder: Path, previous: Path | None = None,
          progress: Callable[[int, int], None] | None = None, encoder: Encoder | None = None) -> BuildStats:
    """Write the memory of `sessions` ((session, split) pairs) into `folder`; vectors of texts that the index in
    `previous` holds are reused."""
    import numpy as np

    entries = [e for session, split in sessions for e in entries_of(session, split)]
    hashes = [text_hash(e) for e in entries]
    known = _previous_vectors(previous) if previous is not None else {}
    vectors = np.empty((len(entries), DIMENSIONS), dtype=np.float32)
    todo = []
    for i, key in enumerate(hashes):
        if key in known:
            vectors[i] = known[key]
        else:
            todo.append(i)
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(todo))

    if todo:
        vectors[todo] = (encoder or Encoder())([entries[i].text for i in todo], progress=step)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ENTRIES).open("w", encoding="utf-8") as handle:
        for entry, key in zip(entries, hashes, strict=True):
            handle.write(json.dumps({**entry.to_json(), "hash": key}, ensure_ascii=False) + "\n")
    np.save(folder / VECTORS, vectors)
    index = _keyword_index([e.text for e in entries])
    if index is not None:
        index.save(str(folder / KEYWORDS), show_progress=False)
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "encoder": ENCODER, "dimensions": DIMENSIONS,
                                               "entries": len(entries), "keywords": index is not None}, indent=1)
                                   + "\n", encoding="utf-8")
    return BuildStats(len(entries), len(todo), len(entries) - len(todo))


def _keyword_index(texts: Sequence[str]) -> Any:
    """The BM25 index of the texts' keywords; None when not one has a word (all emoji or punctuation), which bm25s
    cannot index: then the vectors alone search."""
    import bm25s

    tokens = [keywords(text) for text in texts]
    if not any(tokens):
        return None
    index = bm25s.BM25()
    index.index(tokens, show_progress=False)
    return index


def _vectors(path: Path, rows: int) -> Any:
    """The (rows, DIMENSIONS) float32 vectors of `path`; `ValueError` when the file holds anything else. Its header is
    checked before anything is read: a damaged one can claim terabytes, which `np.load` would try to allocate."""
    import numpy as np
    from numpy.lib import format as npy

    with path.open("rb") as handle:
        version = npy.read_magic(handle)
        header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = header(handle)
        if shape != (rows, DIMENSIONS) or dtype != np.float32 or fortran:
            raise ValueError(f"{VECTORS} holds {dtype} of shape {shape}, for {rows} entries")
        vectors = np.fromfile(handle, dtype=np.float32, count=rows * DIMENSIONS)
        if len(vectors) != rows * DIMENSIONS or handle.read(1):
            raise ValueError(f"{VECTORS} holds {len(vectors)} of the {rows * DIMENSIONS} vector numbers it says, for "
                             f"{rows} entries")
    return vectors.reshape(shape)


def _previous_vectors(folder: Path) -> dict[str, Any]:
    """{text hash: vector} of an earlier index; empty when there is none or it is unreadable (nothing to reuse)."""
    try:
        with (folder / ENTRIES).open(encoding="utf-8") as handle:
            hashes = [json.loads(line)["hash"] for line in handle]
        vectors = _vectors(folder / VECTORS, len(hashes))
        return {key: vectors[i] for i, key in enumerate(hashes)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class Memory:
    """The index, loaded: its entries, their vectors and keywords, and the remembered conversations, if any."""

    def __init__(self, entries: list[MemoryEntry], vectors: Any, keyword_index: Any,
                 remembered: Path | None = None, encoder: Encoder | None = None) -> None:
        import numpy as np

        self.entries = entries
        self.vectors = np.asarray(vectors, dtype=np.float32)
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
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
            entries = []
            with (folder / ENTRIES).open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    try:
                        entries.append(checked_entry(json.loads(line)))
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        raise ValueError(f"{ENTRIES}, line {number}: {problem(exc)}") from None
            if len(entries) != manifest["entries"]:
                raise ValueError(f"{len(entries)} entries, the manifest says {manifest['entries']}")
            vectors = _vectors(folder / VECTORS, len(entries))
            index = bm25s.BM25.load(str(folder / KEYWORDS), show_progress=False) if manifest.get(
                "keywords", True) else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MemoryIndexError(f"{folder}: the memory index is damaged ({_reason(exc)}); build it again with "
                                   "doppel prepare, or go on without it (--memory off)") from None
        memory = cls(entries, vectors, index, remembered)
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
        vectors = [vector for _, vector in read.entries]
        missing = [i for i, vector in enumerate(vectors) if vector is None]  # only where a line was lost
        if missing:
            for i, vector in zip(missing, self.encoder([read.entries[i][0].text for i in missing]), strict=True):
                vectors[i] = vector
        self._held, self._scopes = read.held, read.scopes
        if read.entries:
            self.entries = self.entries + [e for e, _ in read.entries]
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
            entries = entries_of(held.session(conversation), "remembered")
            with self._lock:
                known = {text_hash(self.entries[i]): self.vectors[i] for i in self._sessions.get(conversation, ())}
            hashes = [text_hash(e) for e in entries]
            todo = [i for i, key in enumerate(hashes) if key not in known]
            new = dict(zip([hashes[i] for i in todo], self.encoder([entries[i].text for i in todo]),
                           strict=True)) if todo else {}
            known.update(new)
            remembered.append(self.remembered, conversation, held, first, entries, new)
            vectors = np.stack([known[key] for key in hashes]) if entries else np.zeros((0, DIMENSIONS), np.float32)
            with self._lock:
                drop = self._sessions.get(conversation, [])
                gone = set(drop)
                self.entries = [e for i, e in enumerate(self.entries) if i not in gone] + entries
                self.vectors = np.concatenate([np.delete(self.vectors, drop, axis=0), vectors])
                if drop:
                    self._covered, self._moves = min(self._covered, drop[0]), self._moves + 1
                self._held[conversation], self._scopes[conversation] = held, scope
                self._refresh()
        threading.Thread(target=self._reindex, daemon=True).start()  # found by keywords once it is done

    def _reindex(self) -> None:
        with self._lock:
            entries, moves = list(self.entries), self._moves
        index = _keyword_index([e.text for e in entries])
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
            dense = vectors @ encoder(chunk).T if len(entries) else np.zeros((0, len(chunk)), np.float32)
            for j, query in enumerate(chunk):
                limit = before[start + j]
                mask = allowed if limit is None else allowed & (ends < limit)
                ranked = _fuse(dense[:, j], _keyword_scores(keyword_index, covered, query, len(entries)), mask,
                               entry_people, frozenset(people[start + j]), ends)
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


def _fuse(dense: Any, keyword: Any, mask: Any, entry_people: list[frozenset[str]], people: frozenset[str],
          ends: Any) -> list[int]:
    """The best allowed entries, best first: cosine similarity, plus `KEYWORD_WEIGHT` times the BM25 score as a share
    of the best allowed one, plus `PEOPLE_BONUS` for the conversation's people; among equals the newer. The
    candidates are the `CANDIDATES` best of each ranking."""
    import numpy as np

    keyword = np.where(mask, keyword, 0.0)
    best = float(keyword.max()) if len(keyword) else 0.0
    candidates = _best(dense, mask)
    if best > 0:
        candidates = np.union1d(candidates, _best(keyword, keyword > 0))
        score = dense[candidates] + KEYWORD_WEIGHT * keyword[candidates] / best
    else:
        score = dense[candidates].astype(np.float64)
    if people:
        score = score + PEOPLE_BONUS * np.array([people <= entry_people[i] for i in candidates.tolist()])
    order = np.lexsort((candidates, -ends[candidates], -score))
    return [int(i) for i in candidates[order]]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
