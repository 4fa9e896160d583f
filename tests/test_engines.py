"""The engines' own contract: one generation at a time per model, a waiter that gives up, seeds of their own."""

import threading
from typing import Any

import pytest

from doppel import config
from doppel.engines import TransformersEngine, as_engine
from doppel.serving import chat


@pytest.fixture(scope="module")
def model(tiny):
    from doppel.models import load_model

    return load_model(str(tiny)).eval()


def test_open_model_returns_an_engine_and_conversation_wraps_a_transformers_model(tiny, model, smollm2_tokenizer):
    from doppel.run import open_model

    loaded = open_model(tiny)
    assert isinstance(loaded.engine, TransformersEngine) and loaded.model is loaded.engine  # the old name still works
    assert isinstance(as_engine(model), TransformersEngine)  # a PyTorch module: wrapped
    assert as_engine(loaded.engine) is loaded.engine  # an engine: as it is
    conversation = chat.Conversation(model, smollm2_tokenizer, "Me", "Max")
    assert isinstance(conversation.engine, TransformersEngine) and conversation.engine.model is model


def test_a_seeded_reply_leaves_the_global_random_state_as_it_was(model, smollm2_tokenizer):
    import torch

    def reply(seed: int | None) -> list[str]:
        conversation = chat.Conversation(model, smollm2_tokenizer, "Me", "Max",
                                         config.Sampling(temperature=1, max_new_tokens=12, seed=seed))
        return conversation.reply(["hey", "what's up?"]).wait()

    torch.manual_seed(123)
    state = torch.get_rng_state()
    seeded = reply(7)
    assert torch.equal(torch.get_rng_state(), state)  # the process's generator is where it was
    assert reply(7) == seeded and torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    assert reply(None) == seeded  # the same reply as seeding the process's generator (what the engine did before)
    assert not torch.equal(torch.get_rng_state(), state)  # unseeded, sampling draws from the process's generator


def _ids(tokenizer: Any) -> list[int]:
    return tokenizer("hey there")["input_ids"]


def test_generations_on_one_model_take_turns_and_a_waiter_that_gives_up_leaves_the_queue(model, smollm2_tokenizer):
    """Two engines on one model wait for each other; a caller whose cancel is set while it waits generates nothing
    and lets the next one go (the server's client that left; the bot stopping)."""
    ids, stops = _ids(smollm2_tokenizer), [smollm2_tokenizer.eos_token_id]
    greedy = config.Sampling(temperature=0, max_new_tokens=20)
    holder = TransformersEngine(model).tokens(ids, greedy, stops, threading.Event(), exact=True)
    next(holder)  # holds the model until it is read to the end or closed
    other = TransformersEngine(model)

    def generate(out: list[int], cancel: threading.Event, tokens: int = 3) -> threading.Thread:
        sampling = config.Sampling(temperature=0, max_new_tokens=tokens)
        thread = threading.Thread(target=lambda: out.extend(other.tokens(ids, sampling, stops, cancel, exact=True)),
                                  daemon=True)
        thread.start()
        return thread

    gave_up: list[int] = []
    cancel = threading.Event()
    waiter = generate(gave_up, cancel)
    waiter.join(0.5)
    assert waiter.is_alive() and not gave_up  # waits its turn
    later: list[int] = []
    queued = generate(later, threading.Event())
    cancel.set()
    waiter.join(5)
    assert not waiter.is_alive() and gave_up == []  # gave up its place without generating
    queued.join(0.5)
    assert queued.is_alive() and not later  # the model is still held: the next one waits on
    holder.close()
    queued.join(60)
    assert not queued.is_alive() and len(later) == 3  # its turn came when the holder let go


def test_a_conversation_cancelled_while_it_waits_adds_no_reply(model, smollm2_tokenizer):
    ids, stops = _ids(smollm2_tokenizer), [smollm2_tokenizer.eos_token_id]
    holder = TransformersEngine(model).tokens(ids, config.Sampling(temperature=0, max_new_tokens=5), stops,
                                              threading.Event(), exact=True)
    next(holder)
    try:
        conversation = chat.Conversation(model, smollm2_tokenizer, "Me", "Max", config.Sampling(temperature=0))
        cancel = threading.Event()
        reply = conversation.reply(["hey"], cancel)
        result: list[list[str]] = []
        worker = threading.Thread(target=lambda: result.append(reply.wait()), daemon=True)
        worker.start()
        worker.join(0.3)
        assert worker.is_alive()
        cancel.set()
        worker.join(5)
        assert result == [[]] and reply.finish_reason is None and reply.completion_tokens == 0
        assert [t.speaker for t in conversation.history] == ["Max"]  # the writer's turn, no empty reply after it
    finally:
        holder.close()
    assert conversation.answer().wait() is not None and conversation.history[-1].speaker == "Me"  # the model is free
