"""The preference step's pairs: a real turn (chosen) against the tuned run's own version of it (rejected).

For trained turns of the training split only, the `--from` run writes its turn from the real preceding context,
rendered exactly as training renders that turn (`pair_ids`: the same memory block, windows and masks, through
packing.memory_blocks and render.encode), sampled as `doppel chat` samples. Each pair is a line of
RUN/preferences.jsonl, written as soon as it is made:

    {"session": "700100301:10000", "turn": 3, "speaker": "Lena Volkova", "chosen": ["го))"],
     "rejected": ["Hey! How are you?"], "finish": "stop", "dropped": null, "seconds": 1.42}

A rerun reads the file first and generates only the contexts it does not hold yet, so each pair is made once; a last
line cut short (no line end: the process stopped while writing it) is dropped and made again. A context whose
generated turn is word for word the real one (whitespace aside) is written with `"dropped": "identical"` and is no
pair: it is the only measure that says, for one turn, that the model already wrote what the person did. The style
distance (evaluation/style.py) and the judge measure a speaker's turns together; over one turn of a message or two
their rates are 0 or 1, too coarse to call a turn as good as the real one.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from msgspec.structs import replace

from doppel.config import Sampling
from doppel.errors import TrainError
from doppel.records import Session, Turn
from doppel.render import IGNORE, IM_END, IM_START, encode, turn_ids

PREFERENCES_FILE = "preferences.jsonl"
LONGEST = 2  # a generated turn may run to this many times the real one's tokens (at least MIN_NEW_TOKENS)
MIN_NEW_TOKENS = 32


class Preference(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One context tried: the real turn and the generated one; `dropped` says why it is no pair (None: a pair)."""

    session: str
    turn: int
    speaker: str
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    finish: str  # "stop": the model ended its turn; "length": cut at the token limit
    dropped: str | None = None
    seconds: float = 0.0  # time taken to generate it


class Rendered(msgspec.Struct, frozen=True):
    """A pair as token ids: the shared prompt, then each completion (a turn's body and its `<|im_end|>`)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def contexts(sessions: list[Session], limit: int | None, seed: int) -> list[tuple[Session, int]]:
    """(session, turn index) of the trained turns that answer a turn, in an order fixed by `seed` (so a larger
    `limit` later goes on where a smaller one stopped), at most `limit`."""
    found = [(s, i) for s in sessions for i, t in enumerate(s.turns) if t.train and i > 0]
    random.Random(seed).shuffle(found)
    return found[:limit] if limit is not None else found


def targets(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]


def pair_ids(session: Session, index: int, blocks: list[list[int]] | None, rejected: tuple[str, ...], tokenizer: Any,
             max_length: int) -> Rendered | None:
    """The pair of turn `index` as training renders it: `encode` of the session as training encodes it (`blocks`:
    the memory block before each turn, None without memory), with that turn's labels the only ones kept, gives the
    one window training trains it in: its memory block, the window's earlier turns, the turn's header. The prompt
    is that window up to the turn's targets, and the rejected turn's body and end are rendered as the real one's.
    None when the turn alone does not fit `max_length` (training cuts it into pieces)."""
    windows = encode(session, tokenizer, max_length, blocks=blocks, targets={index})
    if len(windows) != 1:
        return None
    ids, labels = windows[0]
    start = next(k for k, label in enumerate(labels) if label != IGNORE)
    turn = session.turns[index]
    chosen = targets(*turn_ids(tokenizer, turn))
    if ids[start:start + len(chosen)] != chosen:  # cut at the window's end
        return None
    return Rendered(ids[:start], chosen, targets(*turn_ids(tokenizer, replace(turn, messages=rejected))))


def same(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two turns are the same words, whitespace aside."""
    return " ".join(" ".join(a).split()) == " ".join(" ".join(b).split())


def read(path: Path, known: dict[str, Session]) -> list[Preference]:
    """The pairs in `path` (none when it is missing). A last line without its line end was being written when the
    process stopped: it is cut off the file, to be made again. Any other bad line, or one whose turn is no trained
    turn of a training session in `known`, is a `TrainError` naming the line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    decoder = msgspec.json.Decoder(Preference)
    out = []
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            pair = decoder.decode(line)
        except msgspec.DecodeError as exc:
            raise TrainError(f"{path} line {number}: not a preference pair ({exc}); delete the line, or the file to "
                             "generate the pairs again") from None
        session = known.get(pair.session)
        if session is None or not (0 < pair.turn < len(session.turns)) or not session.turns[pair.turn].train:
            raise TrainError(f"{path} line {number}: turn {pair.turn} of session {pair.session} is no trained turn of "
                             "the training split (another dataset's pairs?); delete the file to generate them again")
        out.append(pair)
    return out


def generate(engine: Any, tokenizer: Any, prompt: list[int], sampling: Sampling) -> tuple[tuple[str, ...], str]:
    """(messages, finish) of the turn the model writes after `prompt`, decoded and split as `doppel chat` does."""
    from doppel.serving.chat import split_messages

    ends = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, IM_START)]
    stops = ends + [t for t in [tokenizer.eos_token_id] if t is not None and t not in ends]
    said: list[int] = []
    finish = "length"
    for token in engine.tokens(prompt, sampling, stops, threading.Event()):
        if token in stops:
            finish = "stop"
            break
        said.append(token)
    text = tokenizer.decode(said, skip_special_tokens=False).rstrip("\ufffd")
    return tuple(split_messages(text)), finish


def make(path: Path, model: Any, tokenizer: Any, chosen: list[tuple[Session, int]], known: dict[str, Session],
         blocks: dict[str, list[list[int]] | None], max_length: int, seed: int,
         progress: Callable[[int, int], None] = lambda done, total: None) -> list[Preference]:
    """Every pair of `chosen` in `path`: those already there are read, the others generated and appended one line
    at a time. `known`: the training sessions by id (what a line may name); `blocks`: each chosen session's memory
    block ids before each turn (None: no memory). Sampling is `doppel chat`'s, seeded per context, so a
    pair made again (a cut-off line) is the same pair."""
    from doppel.engines import as_engine

    done = {(p.session, p.turn): p for p in read(path, known)}
    engine = as_engine(model)
    progress(sum((s.id, i) in done for s, i in chosen), len(chosen))
    with path.open("ab") as out:
        for k, (session, index) in enumerate(chosen):
            if (session.id, index) in done:
                continue
            turn = session.turns[index]
            real = pair_ids(session, index, blocks[session.id], turn.messages, tokenizer, max_length)
            if real is None:
                continue
            sampling = Sampling(seed=seed + k,
                                max_new_tokens=min(Sampling().max_new_tokens,
                                                   max(MIN_NEW_TOKENS, LONGEST * len(real.chosen_ids))))
            began = time.perf_counter()
            said, finish = generate(engine, tokenizer, real.prompt_ids, sampling)
            pair = Preference(session.id, index, turn.speaker, turn.messages, said, finish,
                              "identical" if same(said, turn.messages) else None,
                              round(time.perf_counter() - began, 3))
            out.write(msgspec.json.encode(pair) + b"\n")
            out.flush()
            done[(session.id, index)] = pair
            progress(len(done), len(chosen))
    return [done[(s.id, i)] for s, i in chosen if (s.id, i) in done]


def rendered(pairs: list[Preference], sessions: dict[str, Session], blocks: dict[str, list[list[int]] | None],
             tokenizer: Any, max_length: int) -> list[Rendered]:
    """The kept pairs as token ids, rendered as training renders their turns."""
    out = []
    for pair in pairs:
        if pair.dropped is None:
            found = pair_ids(sessions[pair.session], pair.turn, blocks[pair.session], pair.rejected, tokenizer,
                             max_length)
            if found is not None and found.rejected_ids != found.chosen_ids:  # the same tokens: nothing to prefer
                out.append(found)
    return out


def feedback_pairs(path: Path, tokenizer: Any, recall: Any, max_length: int) -> list[Rendered]:
    """The owner's corrections (feedback.py's file) as pairs: the context as `doppel chat` renders it (the memory it
    recalls when the run has one, then the newest whole turns that fit `max_length` with both replies, then the
    persona's header), the owner's text chosen and the draft rejected. A Send (no rejected draft) says the draft was
    fine but gives nothing to prefer it over: it is no pair."""
    from doppel import feedback

    out = []
    for item in feedback.read(path):
        if not item.rejected:
            continue
        context = list(item.context)
        real = Turn(item.speaker, "", tuple(item.chosen), True)
        ids, labels = turn_ids(tokenizer, real)
        head = ids[:next(k for k, label in enumerate(labels) if label != IGNORE)]
        chosen = targets(ids, labels)
        rejected = targets(*turn_ids(tokenizer, replace(real, messages=tuple(item.rejected))))
        room = max_length - len(head) - max(len(chosen), len(rejected))
        block = recall.block(tokenizer, context, {item.speaker, *(t.speaker for t in context[-1:])},
                             min(recall.budget, room))[0] if recall is not None and context else []
        room -= len(block)
        history: list[int] = []
        for turn in reversed(context):  # older turns are left out to fit, as in chat
            turn_context = turn_ids(tokenizer, replace(turn, train=False))[0]
            if len(turn_context) > room:
                break
            history[:0] = turn_context
            room -= len(turn_context)
        if room >= 0:
            out.append(Rendered(block + history + head, chosen, rejected))
    return out
