"""`evaluate(run)`: how much the tuned model sounds like each person, against its base model.

1. held-out loss and perplexity per speaker, on exactly the training targets (render.encode);
2. style of generated turns (from the real preceding turns) against the real turns (style.py);
3. probe conversations opening with "hey" / "what's up?" in both directions;
4. RUN/eval/report.json, report.md, probes.md and PNG plots.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doppel.config import EvalConfig, Sampling
from doppel.dataset import Dataset
from doppel.errors import ContextTooLong, EvalError
from doppel.evaluation import style
from doppel.evaluation.judge import Judge
from doppel.records import Session, spoken
from doppel.run import EVAL_DIR, Run, RunInfo

if TYPE_CHECKING:
    from doppel.memory.recall import Recall

__all__ = ["EvalConfig", "EvalError", "evaluate"]

OPENERS = {"en": ("hey", "what's up?"), "ru": ("привет", "как дела?")}


def speaker_losses(model: Any, tokenizer: Any, sessions: list[Session], max_length: int,
                   blocks: Sequence[list[list[int]] | None] | None = None, recall: dict[str, set[int]] | None = None,
                   per_session: list[dict[str, tuple[float, int]]] | None = None) -> dict[str, tuple[float, int]]:
    """{speaker: (summed NLL, target tokens)} over the sessions' trained turns, in the windows and masks of
    training; with `blocks` (each session's, a memory block before each turn: memory/recall.py `for_turns`), each
    turn after the block chat would recall before it. With `recall` ({session id: turn indexes}), also
    {"speaker/recall": …} over those turns only. `per_session` receives each session's own totals, in order."""
    import torch
    import torch.nn.functional as F

    from doppel.render import IGNORE, encode

    totals: dict[str, tuple[float, int]] = {}
    for k, session in enumerate(sessions):
        own: dict[str, tuple[float, int]] = {}
        # the windows depend on token counts only, so the speakers' label sets share one forward pass
        windows: dict[tuple[int, ...], list[tuple[str, list[int]]]] = {}
        chosen = (recall or {}).get(session.id, set())
        for speaker in sorted({t.speaker for t in session.turns if t.train}):
            sets: list[tuple[str, set[int] | None]] = [(speaker, None)]
            if any(session.turns[i].speaker == speaker for i in chosen):
                sets.append((f"{speaker}/recall", chosen))
            for key, only_turns in sets:
                mine = {i for i, t in enumerate(session.turns)
                        if t.train and t.speaker == speaker and (only_turns is None or i in only_turns)}
                for ids, labels in encode(session, tokenizer, max_length, blocks=blocks[k] if blocks else None,
                                          targets=mine):
                    windows.setdefault(tuple(ids), []).append((key, labels))
        for window, by_speaker in windows.items():
            with torch.no_grad():
                logits = model(torch.tensor([window], device=model.device), use_cache=False).logits[0, :-1].float()
            for speaker, labels in by_speaker:
                target = torch.tensor(labels[1:], device=logits.device)
                nll = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").item()
                before = own.get(speaker, (0.0, 0))
                own[speaker] = (before[0] + nll, before[1] + int((target != IGNORE).sum()))
        for speaker, (nll, count) in own.items():
            before = totals.get(speaker, (0.0, 0))
            totals[speaker] = (before[0] + nll, before[1] + count)
        if per_session is not None:
            per_session.append(own)
    return totals


def generate_turns(model: Any, tokenizer: Any, sessions: list[Session], cfg: EvalConfig,
                   progress: Callable[[], None], memory: Recall | None = None,
                   sources: dict[str, list[int]] | None = None) -> dict[str, list[tuple[str, ...]]]:
    """{speaker: generated turns}, each from the real turns before a trained turn of the speaker (and, with a
    `memory`, what it recalls from the sessions that ended before). `sources` receives, per speaker, the position
    in `sessions` of each generated turn's session."""
    from doppel.serving.chat import Conversation

    out: dict[str, list[tuple[str, ...]]] = {}
    position = {id(s): k for k, s in enumerate(sessions)}
    for i, (session, index) in enumerate(_targets(sessions, cfg.max_turns)):
        turn = session.turns[index]
        chat = Conversation(model, tokenizer, turn.speaker, session.turns[index - 1].speaker,
                            Sampling(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + i),
                            memory=_before(memory, session))
        chat.load(session.turns[:index - 1])
        try:
            said = tuple(chat.reply(list(session.turns[index - 1].messages)))
        except ContextTooLong:  # a turn too long for the model's context (a pasted log): nothing to answer from
            said = None
        if said is not None:
            out.setdefault(turn.speaker, []).append(said)
            if sources is not None:
                sources.setdefault(turn.speaker, []).append(position[id(session)])
        progress()
    return out


def pick_sessions(sessions: list[Session], count: int) -> list[Session]:
    """At most `count` sessions, one chat's after another's in turn (in each chat, the order of the split), so that a
    chat with many held-out sessions cannot crowd the others out; in the split's order."""
    by_chat: dict[int, list[Session]] = {}
    for session in sessions:
        by_chat.setdefault(session.chat.id, []).append(session)
    chosen: set[int] = set()
    for rank in range(max((len(v) for v in by_chat.values()), default=0)):
        for chat in by_chat.values():
            if rank < len(chat) and len(chosen) < count:
                chosen.add(id(chat[rank]))
    return [s for s in sessions if id(s) in chosen]


def _targets(sessions: list[Session], max_turns: int) -> Iterator[tuple[Session, int]]:
    for session in sessions:
        found = [i for i, t in enumerate(session.turns) if t.train and i > 0][:max_turns]
        yield from ((session, i) for i in found)


def probes(model: Any, tokenizer: Any, owner: str, contacts: list[str], language: str, cfg: EvalConfig
           ) -> list[dict[str, Any]]:
    """Fixed openers in both directions; the model then plays both sides for a few turns."""
    from doppel.serving.chat import Conversation

    out = []
    for opener_language in dict.fromkeys(("en", language)):
        for contact in contacts:
            for persona, user in ((owner, contact), (contact, owner)):
                chat = Conversation(model, tokenizer, persona, user,
                                    Sampling(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
                turns = [spoken(user, OPENERS[opener_language])]
                for k in range(cfg.probe_turns):
                    speaker, other = (persona, user) if k % 2 == 0 else (user, persona)
                    chat.persona, chat.user = speaker, other
                    chat.load(turns[:-1])
                    said = tuple(chat.reply(list(turns[-1].messages)))
                    turns.append(spoken(speaker, said or ("…",)))
                out.append({"model_as": persona, "facing": user, "language": opener_language,
                            "turns": [{"speaker": t.speaker, "messages": list(t.messages)} for t in turns]})
    return out


def _before(memory: Recall | None, session: Session) -> Recall | None:
    """The recall of a held-out session: from the sessions that ended before it started."""
    return None if memory is None else memory.for_conversation(session.id, before=session.start)


def recall_probes(model: Any, tokenizer: Any, sessions: list[Session], recall: dict[str, set[int]],
                  memory: Recall, cfg: EvalConfig, count: int = 3) -> list[dict[str, Any]]:
    """Held-out turns that mention something told before: the real turn, and the turn generated from the same
    conversation with and without memory, with what was recalled."""
    from doppel.render import memory_text
    from doppel.serving.chat import Conversation

    out = []
    found = [(s, i) for s in sessions for i in sorted(recall.get(s.id, ())) if i > 0][:count]
    for session, index in found:
        turn, before = session.turns[index], session.turns[index - 1]
        said = {}
        recalled = ""
        for with_memory in (True, False):
            chat = Conversation(model, tokenizer, turn.speaker, before.speaker,
                                Sampling(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
                                memory=_before(memory, session) if with_memory else None)
            chat.load(session.turns[:index - 1])
            try:
                said[with_memory] = list(chat.reply(list(before.messages)))
            except ContextTooLong:
                said[with_memory] = []
            if with_memory:
                recalled = memory_text(chat.recalled)
        out.append({"session": session.id, "speaker": turn.speaker,
                    "context": [{"speaker": t.speaker, "messages": list(t.messages)}
                                for t in session.turns[max(0, index - 2):index]],
                    "real": list(turn.messages), "with_memory": said[True], "without_memory": said[False],
                    "recalled": recalled})
    return out


@contextmanager
def _adapters_off(model: Any) -> Iterator[None]:
    with model.disable_adapter():
        yield


def evaluate(run: str | Path | Run, cfg: EvalConfig | None = None,
             progress: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """Evaluate `run` against its base (or another run) and write RUN/eval/; returns report.json's content."""
    import torch

    from doppel.evaluation import report

    cfg = cfg or EvalConfig()
    run = run if isinstance(run, Run) else Run.open(run)
    if not run.finished:
        raise EvalError(f"{run.path} is not a finished doppel run (no run.json)")
    info = run.info
    dataset = Dataset.open(cfg.dataset or Path(info.dataset))
    sessions = pick_sessions(list(dataset.sessions("eval")), cfg.max_sessions)
    if not sessions:
        raise EvalError(f"{dataset.path} has no held-out sessions; prepare it with eval_fraction above 0")
    max_length = run.config.max_length
    torch.manual_seed(cfg.seed)
    tuned, tokenizer = run.load()
    other, use_base = _comparison(cfg.compare, tuned, info, tokenizer)
    owner = info.owner_name or run.owner or "Me"
    contacts = [s for s in run.personas() if s != owner][:cfg.top_contacts]
    messages = [m for s in sessions for t in s.turns for m in t.messages]
    language = "ru" if style.measure([messages])["cyrillic_share"] > 0.5 else "en"
    targets = list(_targets(sessions, cfg.max_turns))
    total = 2 * len(targets)  # generated turns, the slow part
    done = [0]

    def step() -> None:
        done[0] += 1
        progress(done[0], total)

    memory = _memory(run, dataset)
    blocks, recall = None, None
    if memory is not None:
        from doppel.memory.recall import for_turns, recall_turns

        blocks = [[ids for ids, _ in turns] for turns in
                  for_turns(memory.memory, sessions, tokenizer, memory.budget, None)]
        recall = recall_turns(memory.memory, sessions)
    results: dict[str, Any] = {}
    # a run compared with is measured as it chats too: with memory when it trained with it (the base never did)
    trained_with = {"tuned": info.memory_tokens,
                    "base": Run.open(cfg.compare).info.memory_tokens if cfg.compare != "base" else None}
    for name, model in (("base", other), ("tuned", tuned)):
        with use_base() if name == "base" else nullcontext():
            # the tuned model as it chats: with memory when it trained with it
            recalls = memory if trained_with[name] else None
            per_session: list[dict[str, tuple[float, int]]] = []
            sources: dict[str, list[int]] = {}
            losses = speaker_losses(model, tokenizer, sessions, max_length, blocks if recalls else None, recall,
                                    per_session)
            results[name] = {"losses": {k: v for k, v in losses.items() if "/recall" not in k},
                             "session_losses": per_session,
                             "generated": generate_turns(model, tokenizer, sessions, cfg, step, recalls, sources),
                             "sources": sources}
            results[name]["probes"] = probes(model, tokenizer, owner, contacts, language, cfg)
            if memory is not None:
                other_losses = speaker_losses(model, tokenizer, sessions, max_length, None if recalls else blocks,
                                              recall)
                with_, without = (losses, other_losses) if recalls else (other_losses, losses)
                results[name]["memory"] = {"with": with_, "without": without}
                if name == "tuned":
                    results[name]["recall_probes"] = recall_probes(model, tokenizer, sessions, recall or {}, memory,
                                                                   cfg)
    real: dict[str, list[tuple[str, ...]]] = {}
    real_sources: dict[str, list[int]] = {}
    position = {id(s): k for k, s in enumerate(sessions)}
    for session, index in targets:
        real.setdefault(session.turns[index].speaker, []).append(session.turns[index].messages)
        real_sources.setdefault(session.turns[index].speaker, []).append(position[id(session)])
    results["real_sources"] = real_sources
    judge = Judge.train(dataset.sessions("train"), seed=cfg.seed)
    if judge is not None:
        results["judge"] = {"speakers": judge.speakers,
                            **{name: {speaker: judge.attribute(turns) for speaker, turns in by_speaker.items()}
                               for name, by_speaker in (("real", real), ("base", results["base"]["generated"]),
                                                        ("tuned", results["tuned"]["generated"]))}}
    if recall is not None:
        by_id = {s.id: s for s in sessions}
        results["recall_turns"] = Counter(by_id[sid].turns[i].speaker for sid, found in recall.items() for i in found)
    result = report.build(run.path, dataset.path, cfg, owner, real, results)
    report.write(run.path / EVAL_DIR, result, run.metrics())
    return result


def _memory(run: Run, dataset: Dataset) -> Recall | None:
    """The dataset's memory, with the run's budget; None when the dataset has none."""
    from doppel.memory.index import Memory
    from doppel.memory.recall import Recall

    if dataset.memory_path is None:
        return None
    return Recall(Memory.open(dataset.memory_path), run.info.memory_tokens or run.config.memory_budget)


def _comparison(compare: str, tuned: Any, info: RunInfo, tokenizer: Any) -> tuple[Any, Any]:
    """(the model to compare with, a context manager to enter while using it)."""
    from doppel import models

    if compare != "base":
        model, _ = Run.open(compare).load()
        return model, nullcontext
    if info.mode != "full":  # the same weights with the adapter switched off: no second copy
        return tuned, lambda: _adapters_off(tuned)
    base = models.load_model(info.base)
    models.fit_embeddings(base, tokenizer)
    return base.eval(), nullcontext
