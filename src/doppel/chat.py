"""Talking with a persona: conversation state, prompt rendering, streamed multi-message replies.

The prompt is the history rendered exactly as in training, then `<|im_start|>{persona}\\n`: the caller
always writes the header, so the model only ever speaks as the persona, and generation stops at
`<|im_end|>`. A reply body is one or more `>>> ` messages.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from doppel.render import IM_END, IM_START, PREFIX, turn_segments
from doppel.sessions import Turn


class ChatError(Exception):
    """A persona or setting the model cannot use; shown to the user as is."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 200
    seed: int | None = None


def _stats(run: Path | None) -> dict[str, Any]:
    """The statistics of the dataset a run was trained on (empty for a base or merged model)."""
    path = run / "dataset_stats.json" if run is not None else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def speakers(run: Path | None) -> list[str]:
    """The run's speakers, most active first (empty for a base model: any name goes)."""
    return [s["name"] for s in _stats(run).get("speakers", [])]


def owner(run: Path | None) -> str | None:
    return (_stats(run).get("owner") or {}).get("name")


def check_name(name: str, known: list[str], role: str) -> str:
    """`name` if the run knows it (or knows nobody); otherwise a `ChatError` with close matches."""
    if not known or name in known:
        return name
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return lowered[name.lower()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(known[:10])}"
    raise ChatError(f"unknown {role} {name!r}{hint}")


def split_messages(body: str) -> list[str]:
    """A generated turn body (`>>> a\\n>>> b`) → its messages; a line without `>>> ` continues one."""
    messages: list[str] = []
    for line in body.split("\n"):
        if line.startswith(PREFIX) or not messages:
            messages.append(line.removeprefix(PREFIX))
        else:
            messages[-1] += "\n" + line
    return [m.strip() for m in messages if m.strip()]


class Conversation:
    """One chat: who the model plays, who writes, the turns so far."""

    def __init__(self, model: Any, tokenizer: Any, persona: str, user: str, sampling: Sampling = Sampling(),
                 max_context: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.persona, self.user, self.sampling = persona, user, sampling
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_context = min(max_context or limit, limit)
        self.history: list[Turn] = []
        self.usage = (0, 0)  # (prompt, completion) tokens of the last reply
        self.finish_reason = "stop"  # of the last reply: "stop" (the turn ended) or "length" (max_new_tokens)
        self.stops = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, IM_START)]

    def prompt(self) -> str:
        """History (trimmed by whole turns to fit) + the persona's header."""
        header = f"{IM_START}{self.persona}\n"
        budget = self.max_context - self.sampling.max_new_tokens - len(self.tokenizer(header)["input_ids"])
        kept: list[str] = []
        for turn in reversed(self.history):
            text = "".join(piece for piece, _ in turn_segments(turn))
            size = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if size > budget:
                break
            kept.insert(0, text)
            budget -= size
        return "".join(kept) + header

    def reply(self, messages: list[str]) -> Iterator[str]:
        """Add the user's messages as one turn; yield the persona's messages as each is complete."""
        self.history.append(Turn(self.user, "", tuple(messages), False))
        said: list[str] = []
        for message in self._stream():
            said.append(message)
            yield message
        self.history.append(Turn(self.persona, "", tuple(said), False))

    def _stream(self) -> Iterator[str]:
        """Generate one turn body; yield each message once the next one starts (or the turn ends)."""
        import threading

        import torch
        from transformers import TextIteratorStreamer

        ids = self.tokenizer(self.prompt(), add_special_tokens=False, return_tensors="pt")["input_ids"]
        self.usage = (int(ids.shape[1]), 0)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        s = self.sampling
        kwargs: dict[str, Any] = dict(input_ids=ids.to(self.model.device), streamer=streamer,
                                      max_new_tokens=s.max_new_tokens, eos_token_id=self.stops,
                                      pad_token_id=self.stops[0], repetition_penalty=s.repetition_penalty)
        kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else \
            kwargs.update(do_sample=False)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        worker = threading.Thread(target=lambda: self.model.generate(**kwargs), daemon=True)
        worker.start()
        text, done = "", 0
        self.finish_reason = "length"
        for piece in streamer:
            text += piece
            end = min((i for i in (text.find(IM_END), text.find(IM_START)) if i >= 0), default=-1)
            if end >= 0:
                text = text[:end]
                self.finish_reason = "stop"
                break
            complete = text.rfind("\n" + PREFIX)
            if complete > done:
                yield from split_messages(text[done:complete])
                done = complete + 1
        worker.join()
        ended = IM_END if self.finish_reason == "stop" else ""
        self.usage = (self.usage[0], len(self.tokenizer(text + ended, add_special_tokens=False)["input_ids"]))
        yield from split_messages(text[done:])
