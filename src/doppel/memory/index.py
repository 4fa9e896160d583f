"""The memory index: every past session (a long one in windows), searched by meaning and by keywords.

    DATASET/memory/memory.json      what it is: format, encoder, entries, when built
    DATASET/memory/entries.jsonl    one entry a line (records.MemoryEntry, and its text's hash)
    DATASET/memory/vectors.npy      (entries, 512) float32 sentence vectors, row i for line i
    DATASET/memory/keywords/        the BM25 index of the entries' stemmed keywords (bm25s)
    RUN/memory/remembered.jsonl     conversations held with the model (`--remember`), each with its vector

`prepare` builds it from the sessions it writes, so `--redact` and `--pseudonymize` apply to it as to training. A
vector is reused, not computed again, for an entry whose text the directory's previous index already held.

A search scores the entries allowed (ended before a time, of some splits, not excluded) by the cosine similarity of
their vectors to the query's, plus a share of BM25 over the stemmed keywords (the best keyword match adds 0.15); an
entry whose people include all of the conversation's gains a little (same partner, same chat), and among equals the
newer comes first. Fusing by scores rather than by reciprocal rank keeps a keyword match from outranking the entry
that answers in another language (docs/benchmarks.md has both measured). At a person's scale (a hundred thousand
entries) a brute-force search over the vectors takes milliseconds, so there is no vector database.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppel.errors import MemoryIndexError
from doppel.memory.text import DIMENSIONS, ENCODER, Encoder, keywords
from doppel.records import MemoryEntry, Session

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


def entries_of(session: Session, split: str) -> list[MemoryEntry]:
    """A session's memory entries: one, or windows of about `WINDOW_CHARS` for a long session."""
    lines = [(turn.speaker, _clip(m)) for turn in session.turns for m in turn.messages if m.strip()]
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


def _clip(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= LINE_CHARS else message[:LINE_CHARS - 1] + "…"


def _hash(entry: MemoryEntry) -> str:
    return hashlib.sha1(entry.text.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class BuildStats:
    entries: int
    embedded: int  # vectors computed
    reused: int  # vectors taken from the previous index


def build(sessions: Iterable[tuple[Session, str]], folder: Path, previous: Path | None = None,
          progress: Callable[[int, int], None] | None = None, encoder: Encoder | None = None) -> BuildStats:
    """Write the memory of `sessions` ((session, split) pairs) into `folder`; vectors of texts that the index in
    `previous` holds are reused."""
    import bm25s
    import numpy as np

    entries = [e for session, split in sessions for e in entries_of(session, split)]
    hashes = [_hash(e) for e in entries]
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
    index = bm25s.BM25()
    index.index([keywords(e.text) for e in entries] or [[]], show_progress=False)
    index.save(str(folder / KEYWORDS), show_progress=False)
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "encoder": ENCODER, "dimensions": DIMENSIONS,
                                               "entries": len(entries)}, indent=1) + "\n", encoding="utf-8")
    return BuildStats(len(entries), len(todo), len(entries) - len(todo))


def _previous_vectors(folder: Path) -> dict[str, Any]:
    """{text hash: vector} of an earlier index; empty when there is none or it is unreadable (nothing to reuse)."""
    import numpy as np

    try:
        vectors = np.load(folder / VECTORS, mmap_mode="r")
        with (folder / ENTRIES).open(encoding="utf-8") as handle:
            hashes = [json.loads(line)["hash"] for line in handle]
        if vectors.shape != (len(hashes), DIMENSIONS):
            return {}
        return {key: np.array(vectors[i]) for i, key in enumerate(hashes)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class Memory:
    """The index, loaded: its entries, their vectors and keywords, and the remembered conversations, if any."""

    def __init__(self, entries: list[MemoryEntry], vectors: Any, keyword_index: Any,
                 remembered: Path | None = None, encoder: Encoder | None = None) -> None:
        import numpy as np

        self.entries = entries
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self._keywords = keyword_index  # covers entries[:self._covered]
        self._covered = len(entries)
        self.encoder = encoder or Encoder(threads=1)  # one query at a time: one thread answers fastest
        self._batch_encoder: Encoder | None = None  # many (training's): every core
        self.remembered = remembered
        self._lock = threading.Lock()
        self._refresh()

    @classmethod
    def open(cls, folder: Path, remembered: Path | None = None) -> Memory:
        """The index in `folder` (and the conversations remembered in the file `remembered`); `MemoryIndexError`
        when it is missing or damaged."""
        import bm25s
        import numpy as np

        if not (folder / MANIFEST).is_file():
            raise MemoryIndexError(f"{folder}: no memory index (build it with doppel prepare)")
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
            with (folder / ENTRIES).open(encoding="utf-8") as handle:
                entries = [MemoryEntry.from_json(json.loads(line)) for line in handle]
            vectors = np.load(folder / VECTORS)
            if vectors.shape != (len(entries), DIMENSIONS) or len(entries) != manifest["entries"]:
                raise ValueError(f"{len(entries)} entries, vectors of shape {vectors.shape}")
            index = bm25s.BM25.load(str(folder / KEYWORDS), show_progress=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MemoryIndexError(f"{folder}: the memory index is damaged ({_reason(exc)}); build it again with "
                                   "doppel prepare, or go on without it (--memory off)") from None
        memory = cls(entries, vectors, index, remembered)
        if remembered is not None and remembered.is_file():
            memory._load_remembered(remembered)
        return memory

    # --- remembered conversations ---------------------------------------------------------------------

    def _load_remembered(self, path: Path) -> None:
        import numpy as np

        latest: dict[str, tuple[MemoryEntry, Any]] = {}
        try:
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.endswith("\n"):
                        break  # the last line of a process that was killed while writing it
                    data = json.loads(line)
                    vector = np.frombuffer(base64.b64decode(data.pop("vector")), dtype=np.float32)
                    if vector.shape != (DIMENSIONS,):
                        raise ValueError(f"line {number}: a vector of {vector.shape[0]} numbers")
                    latest[data["id"]] = (MemoryEntry.from_json(data), vector)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MemoryIndexError(f"{path}: the remembered conversations are damaged ({_reason(exc)}); move the "
                                   "file away to start a new memory of conversations") from None
        if latest:
            self.entries = self.entries + [e for e, _ in latest.values()]
            self.vectors = np.vstack([self.vectors, np.stack([v for _, v in latest.values()])])
            self._reindex()  # the saved keyword index covers the prepared entries only
            self._refresh()

    def remember(self, entries: Sequence[MemoryEntry]) -> None:
        """Add (or replace, by id) a conversation's entries, persist them, and index them for later searches."""
        import numpy as np

        if self.remembered is None:
            raise MemoryIndexError("this memory has no file for remembered conversations")
        vectors = self.encoder([e.text for e in entries])
        self.remembered.parent.mkdir(parents=True, exist_ok=True)
        with self.remembered.open("a", encoding="utf-8") as handle:
            for entry, vector in zip(entries, vectors, strict=True):
                handle.write(json.dumps({**entry.to_json(), "vector": base64.b64encode(vector.tobytes()).decode()},
                                        ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with self._lock:
            position = {e.id: i for i, e in enumerate(self.entries)}
            entries_, vectors_ = list(self.entries), self.vectors.copy()
            for entry, vector in zip(entries, vectors, strict=True):
                if entry.id in position:
                    entries_[position[entry.id]], vectors_[position[entry.id]] = entry, vector
                else:
                    entries_.append(entry)
                    vectors_ = np.vstack([vectors_, vector[None]])
            self.entries, self.vectors = entries_, vectors_
            self._refresh()
        threading.Thread(target=self._reindex, daemon=True).start()  # found by keywords once it is done

    def _reindex(self) -> None:
        import bm25s

        with self._lock:
            entries = list(self.entries)
        index = bm25s.BM25()
        index.index([keywords(e.text) for e in entries] or [[]], show_progress=False)
        with self._lock:
            if len(entries) >= self._covered:
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

    # --- search -------------------------------------------------------------------------------------

    def search(self, query: str, before: int | None = None, splits: Collection[str] | None = None,
               people: Collection[str] = (), exclude: Collection[str] = (), top: int = TOP) -> list[MemoryEntry]:
        """The `top` entries that best answer `query`, best first, among those of `splits` (None: any) that ended
        before `before` (None: any time) and whose session is not in `exclude`."""
        return self.search_many([query], [before], splits, [people], exclude, top)[0]

    def search_many(self, queries: Sequence[str], before: Sequence[int | None], splits: Collection[str] | None,
                    people: Sequence[Collection[str]], exclude: Collection[str] = (), top: int = TOP,
                    progress: Callable[[int], None] | None = None) -> list[list[MemoryEntry]]:
        """`search` for many queries at once (training: every session's), the vectors compared a block at a time."""
        import numpy as np

        with self._lock:
            entries, vectors, ends, keyword_index, covered = (self.entries, self.vectors, self._ends,
                                                              self._keywords, self._covered)
            entry_splits, sessions, entry_people = self._splits, self._sessions, self._people
        allowed = np.ones(len(entries), dtype=bool)
        if splits is not None:
            allowed = np.zeros(len(entries), dtype=bool)
            for split in splits:
                allowed |= entry_splits.get(split, False)
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
