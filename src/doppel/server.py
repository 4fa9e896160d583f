"""An OpenAI-compatible API over one loaded model, and a small web chat page.

`model` in a request names the persona; each `user` message's `name` says who writes (default: the
server's `--as`); `assistant` messages are the persona's earlier replies. A reply's content is the
persona's messages joined by newlines. One model is in memory and requests take turns on it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from doppel.chat import Conversation, Sampling
from doppel.sessions import Turn

PAGE = Path(__file__).with_name("page.html")


class Message(BaseModel):
    role: str
    content: str | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def history(request: ChatRequest, persona: str, default_user: str) -> tuple[list[Turn], Turn]:
    """(earlier turns, the user's turn to answer); consecutive messages of one writer form one turn,
    like a burst in a messenger."""
    turns: list[Turn] = []
    for message in request.messages:
        if message.role in ("system", "developer"):
            continue  # personas have no system prompt: who speaks is in the headers
        if message.role not in ("user", "assistant"):
            raise ApiError(400, f"Invalid role {message.role!r}: use user or assistant", "messages")
        speaker = persona if message.role == "assistant" else (message.name or default_user)
        lines = tuple(line for line in (message.content or "").split("\n") if line.strip())
        if not lines:
            continue
        if turns and turns[-1].speaker == speaker:
            turns[-1] = Turn(speaker, "", turns[-1].messages + lines, False)
        else:
            turns.append(Turn(speaker, "", lines, False))
    if not turns or turns[-1].speaker == persona:
        raise ApiError(400, "The last message must be a user message with content", "messages")
    return turns[:-1], turns[-1]


def create_app(model: Any, tokenizer: Any, personas: list[str], default_user: str,
               api_key: str | None = None, default_persona: str | None = None) -> FastAPI:
    app = FastAPI(title="doppel", docs_url=None, redoc_url=None)
    lock = threading.Lock()  # one generation at a time on the one model; the others wait their turn
    names = personas or [default_persona or "Me"]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"Invalid request: {where}: {first.get('msg')}", param=where or None)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            return _error(401, "Incorrect API key provided", "invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "doppel"}
                                           for name in names]}

    def conversation(request: ChatRequest) -> tuple[Conversation, list[str]]:
        if request.n != 1:
            raise ApiError(400, "Only n=1 is supported", "n")
        if personas and request.model not in personas:
            raise ApiError(404, f"The model `{request.model}` does not exist", "model", "model_not_found")
        earlier, last = history(request, request.model, default_user)
        sampling = Sampling(request.temperature, request.top_p, 1.1,
                            request.max_completion_tokens or request.max_tokens or 200, request.seed)
        chat = Conversation(model, tokenizer, request.model, last.speaker, sampling)
        chat.history = earlier
        return chat, list(last.messages)

    def replies(chat: Conversation, messages: list[str], stops: list[str]) -> Iterator[str]:
        with lock:
            for message in chat.reply(messages):
                cut = min((message.find(s) for s in stops if s in message), default=-1)
                if cut >= 0:
                    chat.finish_reason = "stop"
                    if message[:cut].strip():
                        yield message[:cut].rstrip()
                    return
                yield message

    @app.post("/v1/chat/completions", response_model=None)
    async def completions(request: ChatRequest) -> Any:
        chat, messages = conversation(request)
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if request.stream:
            return StreamingResponse(_events(replies(chat, messages, stops), lambda: chat.finish_reason, ident,
                                             created, request.model), media_type="text/event-stream")
        said = await asyncio.to_thread(lambda: list(replies(chat, messages, stops)))
        prompt, completion = chat.usage
        return {"id": ident, "object": "chat.completion", "created": created, "model": request.model,
                "choices": [{"index": 0, "finish_reason": chat.finish_reason, "logprobs": None,
                             "message": {"role": "assistant", "content": "\n".join(said)}}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    return app


async def _events(messages: Iterator[str], finish: Callable[[], str], ident: str, created: int,
                  model: str) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per message (newline-separated), a finish chunk, [DONE]."""
    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def produce() -> None:
        try:
            for message in messages:
                loop.call_soon_threadsafe(queue.put_nowait, message)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=produce, daemon=True).start()
    first = True
    while (message := await queue.get()) is not None:
        yield chunk({"content": message if first else "\n" + message})
        first = False
    yield chunk({}, finish())
    yield "data: [DONE]\n\n"
