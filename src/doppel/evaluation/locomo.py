"""LoCoMo as a benchmark of doppel's memory: of the turns that hold a question's answer, how many are retrieved.

LoCoMo (snap-research/locomo; Maharana et al., ACL 2024) holds long conversations between two people, about
twenty sessions weeks apart, and questions about them, each naming its evidence: the turns that hold the answer
("D3:7": session 3, turn 7). Its data is CC BY-NC 4.0, so doppel ships none of it: `doppel bench recall --locomo
FILE…` takes the files, one conversation each (the object of one conversation, flat as in the multimodal release,
or `{"conversation": …, "qa": …}` as in locomo10.json).

A conversation goes the way a user's export goes: written as the JSONL reader's input (speaker_a is the owner;
each turn one message, `TURN_SECONDS` apart from its session's `session_N_date_time`; an image turn's
`blip_caption` appended as "[shares …]"), prepared with the default options, memory index included. Then every
question of categories 1–4 is the query (5, adversarial, names evidence of what was never said).

Three retrievals over the same entries, side by side:

- doppel: `Memory.search` as chat calls it, with the question as the query and both people as the conversation's;
- bm25: plain BM25 (bm25s) over lowercased words, without stemming or stop words;
- dense: the cosine similarity of doppel's own vectors alone.

A question's evidence recall is the share of its evidence turns retrieved; a category's, the mean over its
questions. Retrieved is taken three ways: the first k entries of the ranking; a text budget (the ranking's lines
as the block writes them, "Name: message" one a line, while they fit in N characters: a line the budget would cut
is not retrieved); and the memory block exactly as chat builds it (`render.fit_memory` of the first `index.TOP`
entries, in chat's default budget, a quarter of --max-length 1024).

An evidence turn is retrieved when a retrieved line is its text, whitespace normalised: the whole line equal to
it, or a line the index cut short (ending "…") that is the start of it. Lines rather than substrings, so that a
short turn ("Yes!") is not found inside a longer one; a turn said twice word for word is found by either copy.
Evidence ids that name no turn (the data has a few typos) are left out, and a question left with no evidence is
not asked.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from doppel.errors import ExportError
from doppel.records import MemoryEntry

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}  # 5, adversarial: not asked
RETRIEVALS = ("doppel", "bm25", "dense")
KS = (1, 3, 5, 10)  # entries
CHARS = (1000, 2000)  # characters of retrieved text
TURN_SECONDS = 5  # between two turns of a session
DATE = "%I:%M %p on %d %B, %Y"  # "1:56 pm on 8 May, 2023"
_SESSION = re.compile(r"session_(\d+)")
_EVIDENCE = re.compile(r"D:?(\d+):(\d+)")  # "D1:3", and the data's "D:11:26" and "D8:6; D9:17"
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Said:
    """One turn of a LoCoMo conversation: one doppel message."""

    dia: str  # "D1:3"
    speaker: str
    time: int  # unix seconds
    text: str


@dataclass(frozen=True)
class Question:
    text: str
    category: int
    evidence: tuple[str, ...]  # dia ids of turns that exist


@dataclass(frozen=True)
class Conversation:
    owner: str  # speaker_a
    partner: str  # speaker_b
    turns: tuple[Said, ...]
    questions: tuple[Question, ...]  # categories 1–4, each with evidence
    skipped: int  # questions not asked: adversarial, or without evidence that names a turn


def read(path: Path) -> Conversation:
    """The LoCoMo conversation in `path`; `ExportError` (one line) for a file that is not one."""
    if not path.is_file():  # a FIFO would block the read
        raise ExportError(f"{path}: {'no such file' if not path.exists() else 'not a regular file'}")
    try:
        return _conversation(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else "nested too deeply" if isinstance(
            exc, RecursionError) else "not UTF-8 text" if isinstance(exc, UnicodeError) else str(
            exc).splitlines()[0][:150]
        raise ExportError(f"{path}: not a LoCoMo conversation ({what}); give one conversation per file, with "
                          "speaker_a, speaker_b, session_N, session_N_date_time and qa") from None


def _conversation(data: Any) -> Conversation:
    if not isinstance(data, dict):
        raise TypeError(f"the file holds a JSON {type(data).__name__}, not an object")
    if isinstance(data.get("conversation"), dict):  # locomo10.json's layout
        data = {**data["conversation"], "qa": data["qa"]}
    owner, partner = data["speaker_a"], data["speaker_b"]
    if not (isinstance(owner, str) and isinstance(partner, str)) or owner == partner:
        raise ValueError("speaker_a and speaker_b must be two names")
    numbers = sorted(int(m[1]) for key in data if (m := _SESSION.fullmatch(key)))
    if not numbers:
        raise ValueError("no session_N")
    turns = []
    for n in numbers:
        try:
            start = int(datetime.strptime(data[f"session_{n}_date_time"], DATE).replace(tzinfo=UTC).timestamp())
        except (ValueError, TypeError):
            raise ValueError(f"session_{n}_date_time is not a date like '1:56 pm on 8 May, 2023'") from None
        for i, turn in enumerate(data[f"session_{n}"]):
            speaker, text, dia = turn["speaker"], turn["text"], turn["dia_id"]
            if speaker not in (owner, partner) or not isinstance(text, str) or not isinstance(dia, str):
                raise ValueError(f"session_{n}, turn {i + 1}: not a turn of {owner} or {partner} with text")
            caption = turn.get("blip_caption")
            if isinstance(caption, str) and caption.strip():
                text = f"{text} [shares {caption.strip()}]"
            turns.append(Said(dia, speaker, start + TURN_SECONDS * i, text))
    known = {t.dia for t in turns}
    questions, skipped = [], 0
    for item in data["qa"]:
        category, evidence = item["category"], item["evidence"]
        if not isinstance(item["question"], str) or not isinstance(evidence, list):
            raise ValueError("a question of qa is not {question, evidence: [...], category}")
        ids = tuple(dict.fromkeys(f"D{a}:{b}" for e in evidence if isinstance(e, str) for a, b in _EVIDENCE.findall(e)
                                  if f"D{a}:{b}" in known))
        if category in CATEGORIES and ids:
            questions.append(Question(item["question"], category, ids))
        else:
            skipped += 1
    return Conversation(owner, partner, tuple(turns), tuple(questions), skipped)


def write_export(conversation: Conversation, path: Path) -> None:
    """The conversation as the JSONL reader's input: one message a line, the owner's marked `"me": true`."""
    with path.open("w", encoding="utf-8") as handle:
        for turn in conversation.turns:
            row = {"chat": conversation.partner, "sender": turn.speaker, "time": turn.time, "text": turn.text}
            handle.write(json.dumps({**row, **({"me": True} if turn.speaker == conversation.owner else {})},
                                    ensure_ascii=False) + "\n")


# --- retrieval ------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rankings(memory: Any, queries: Sequence[str], people: Collection[str], depth: int) -> dict[str, list[list[int]]]:
    """{retrieval: for each query, the indexes of `memory.entries`, best first, at most `depth`}."""
    import bm25s
    import numpy as np

    from doppel.memory.text import Encoder

    position = {id(entry): i for i, entry in enumerate(memory.entries)}
    out: dict[str, list[list[int]]] = {
        "doppel": [[position[id(e)] for e in memory.search(q, people=people, top=depth)] for q in queries]}
    dense = (memory.vectors @ Encoder()(list(queries)).T)[memory.rows]
    out["dense"] = [[int(i) for i in np.argsort(-dense[:, j], kind="stable")[:depth]] for j in range(len(queries))]
    tokens = [_words(e.text) for e in memory.entries]
    index = None
    if any(tokens):
        index = bm25s.BM25()
        index.index(tokens, show_progress=False)
    out["bm25"] = []
    for query in queries:
        terms = _words(query)
        scores = index.get_scores(terms) if index is not None and terms else np.zeros(len(memory.entries))
        out["bm25"].append([int(i) for i in np.argsort(-scores, kind="stable")[:depth]])
    return out


def retrieved(ranked: Sequence[MemoryEntry], tokenizer: Any, budget: int, ks: Sequence[int] = KS,
              chars: Sequence[int] = CHARS) -> list[list[str]]:
    """The messages retrieved by one ranking: at each k, at each text budget, and in the memory block."""
    from doppel.memory.index import TOP
    from doppel.render import fit_memory, header_name

    def messages(entries: Sequence[MemoryEntry]) -> list[str]:
        return [message for entry in entries for _, message in entry.lines]

    out = [messages(ranked[:k]) for k in ks]
    lines = [(len(header_name(speaker)) + 2 + len(message), message) for e in ranked for speaker, message in e.lines]
    for size in chars:
        kept, used = [], -1  # the lines and the newlines between them
        for length, message in lines:
            used += length + 1
            if used > size:
                break
            kept.append(message)
        out.append(kept)
    out.append(messages(fit_memory(tokenizer, ranked[:TOP], budget)[1]))
    return out


def holds(messages: Collection[str], text: str) -> bool:
    """Whether one of the retrieved `messages` is `text` (the matching rule of the module's docstring)."""
    text = " ".join(text.split())
    lines = (" ".join(m.split()) for m in messages)
    return any(m == text or (m.endswith("…") and len(text) >= len(m) and text.startswith(m[:-1])) for m in lines)


# --- the benchmark --------------------------------------------------------------------------------


def measure(paths: Sequence[Path], budget: int | None = None, ks: Sequence[int] = KS, chars: Sequence[int] = CHARS,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Evidence recall of each retrieval over the LoCoMo conversations of `paths`, per category and overall, at
    each k, each text budget and in the memory block of `budget` tokens (default: chat's for --max-length 1024)."""
    from doppel import models
    from doppel.config import PrepareConfig, TrainConfig
    from doppel.dataset import MEMORY_DIR
    from doppel.memory.index import Memory
    from doppel.preparing.pipeline import prepare

    conversations = [read(Path(p)) for p in paths]  # every file checked before the first is prepared
    budget = budget or TrainConfig().memory_budget
    tokenizer = models.load_tokenizer(None)
    depth = max(max(ks), 50)
    figures: dict[str, dict[int, list[list[float]]]] = {r: {c: [] for c in CATEGORIES} for r in RETRIEVALS}
    entries = evidence = found = 0
    with tempfile.TemporaryDirectory() as tmp:
        for n, conversation in enumerate(conversations):
            folder = Path(tmp) / str(n)
            folder.mkdir()
            write_export(conversation, folder / "locomo.jsonl")
            prepare(folder / "locomo.jsonl", folder / "data", PrepareConfig())
            memory = Memory.open(folder / "data" / MEMORY_DIR)
            texts = {turn.dia: turn.text for turn in conversation.turns}
            everything = [m for entry in memory.entries for _, m in entry.lines]
            wanted = {dia for q in conversation.questions for dia in q.evidence}
            entries, evidence = entries + len(memory.entries), evidence + len(wanted)
            found += sum(holds(everything, texts[dia]) for dia in wanted)
            ranked = rankings(memory, [q.text for q in conversation.questions],
                              {conversation.owner, conversation.partner}, depth)
            for name, orders in ranked.items():
                for question, order in zip(conversation.questions, orders, strict=True):
                    views = retrieved([memory.entries[i] for i in order], tokenizer, budget, ks, chars)
                    figures[name][question.category].append(
                        [sum(holds(view, texts[dia]) for dia in question.evidence) / len(question.evidence)
                         for view in views])
            if progress is not None:
                progress(n + 1, len(conversations))
    columns = [f"at_{k}" for k in ks] + [f"chars_{c}" for c in chars] + ["block"]

    def mean(rows: list[list[float]]) -> dict[str, float | None]:
        return {c: round(sum(r[j] for r in rows) / len(rows), 3) if rows else None for j, c in enumerate(columns)}

    return {"conversations": len(conversations), "entries": entries, "block_tokens": budget,
            "evidence_in_index": f"{found}/{evidence}",
            "questions": {**{CATEGORIES[c]: len(figures["doppel"][c]) for c in CATEGORIES},
                          "overall": sum(len(figures["doppel"][c]) for c in CATEGORIES)},
            "not_asked": sum(c.skipped for c in conversations),
            "recall": {name: {**{CATEGORIES[c]: mean(rows[c]) for c in CATEGORIES},
                              "overall": mean([r for c in CATEGORIES for r in rows[c]])}
                       for name, rows in figures.items()}}


def table(result: dict[str, Any]) -> Any:
    """The figures of `measure` as a rich table: a row per category and retrieval."""
    from rich.table import Table

    columns = list(result["recall"]["doppel"]["overall"])
    names = {"block": "block", **{c: f"@{c[3:]}" for c in columns if c[:3] == "at_"},
             **{c: f"{int(c[6:]):,} ch" for c in columns if c[:6] == "chars_"}}
    out = Table(title=f"LoCoMo evidence recall: {result['conversations']} conversation"
                      f"{'s' if result['conversations'] != 1 else ''}, "
                      f"{result['questions']['overall']} questions, {result['entries']} entries, block "
                      f"{result['block_tokens']} tokens")
    for heading in ("category", "questions", "retrieval", *(names[c] for c in columns)):
        out.add_column(heading, justify="left" if heading in ("category", "retrieval") else "right")
    for category in [*CATEGORIES.values(), "overall"]:
        for k, name in enumerate(RETRIEVALS):
            row = result["recall"][name][category]
            out.add_row(category if k == 0 else "", str(result["questions"][category]) if k == 0 else "", name,
                        *("–" if row[c] is None else f"{row[c]:.3f}" for c in columns),
                        end_section=k == len(RETRIEVALS) - 1)
    return out
