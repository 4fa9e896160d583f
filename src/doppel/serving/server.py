"""An OpenAI-compatible API over one loaded model, and a small web chat page.

`model` in a request names the persona; each `user` message's `name` says who writes (default: the
server's `--as`); `assistant` messages are the persona's earlier replies. A reply's content is the
persona's messages joined by newlines, and each message on its own in `doppel.messages` (a list: a message may hold
a newline). A request's message is a message a line when its content is a string, a message a text part when it is
a list (`Message.messages`). One model is in memory and requests take turns on it. With a memory, each
reply opens with what it recalls, and the response says what in an extension field, `doppel.memory` (in a stream,
on the first chunk); clients that do not know it ignore it. With `--remember`, a request's `user` (OpenAI's id of the
end user) is the scope of the conversation remembered: it is recalled only for requests of the same `user`.

One endpoint is doppel's own: POST /doppel/feedback takes a conversation that ends with the persona's reply and
`content`, that reply as the owner would have written it, and records the pair in the run's feedback.jsonl
(feedback.py); the web page's "rewrite" sends it. It asks for the API key as /v1/ does.

No request can hold the model for good: a failed generation becomes an error in OpenAI's shape and frees
the model, a client that leaves stops its generation (waiting or running), and the body size, the number of
messages and the prompt's tokens are limited (`ServeConfig`). docs/security.md says what is promised.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from doppel.config import LOOPBACK, Sampling, ServeConfig
from doppel.errors import ChatError, ContextTooLong, DoppelError, GenerationFailed
from doppel.feedback import FeedbackPair, record
from doppel.memory.recall import Recall
from doppel.records import MemoryEntry, Turn
from doppel.render import header_name
from doppel.serving.chat import Conversation, Reply, TurnIds, add_messages

PAGE = Path(__file__).with_name("page.html")
DEFAULTS = Sampling()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: str
    content: str | list[TextPart] | None = None  # a list of text parts, as newer OpenAI clients send
    name: str | None = None

    def messages(self) -> list[str]:
        """The API's rule for what one OpenAI message holds: a string is a message a line (as an OpenAI client's
        text box, and as `doppel chat` reads them); a list of text parts is a message a part, a newline in a part
        kept inside its message (as the bot takes a Telegram message, and training a message of the export)."""
        if isinstance(self.content, list):
            return [part.text.strip() for part in self.content if part.text.strip()]
        return [line for line in (self.content or "").split("\n") if line.strip()]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    # null is what some clients send for "the default"
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    user: str | None = None  # the end user: whose remembered conversations a request may recall

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop must be up to 4 non-empty strings", "stop")
        return stops

    def sampling(self) -> Sampling:
        return Sampling(DEFAULTS.temperature if self.temperature is None else self.temperature,
                        self.top_p or DEFAULTS.top_p, DEFAULTS.repetition_penalty,
                        self.max_completion_tokens or self.max_tokens or DEFAULTS.max_new_tokens, self.seed)


class FeedbackRequest(BaseModel):
    model: str  # the persona
    messages: list[Message] = Field(min_length=1)  # the conversation, the persona's reply last
    content: str  # that reply as the owner would write it, one message per line


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def log_failure(exc: BaseException) -> None:
    """A request the server could not answer: its traceback on the server's stderr (the model's own error, for a
    failed generation), never to the client, which gets one line in OpenAI's shape."""
    if isinstance(exc, ChatError) and not isinstance(exc, GenerationFailed):
        return  # a setting the model cannot use: the line says it all
    cause = exc.__cause__ if isinstance(exc, GenerationFailed) and exc.__cause__ else exc
    print("doppel serve: a request failed:", file=sys.stderr)
    traceback.print_exception(cause, file=sys.stderr)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, param, code, kind).body(), status_code=status)


def history(request: ChatRequest, persona: str, default_user: str) -> tuple[list[Turn], Turn]:
    """(earlier turns, the user's turn to answer)."""
    turns = turns_of(request.messages, persona, default_user)
    if not turns or turns[-1].speaker == persona:
        raise ApiError(400, "The last message must be a user message with content", "messages")
    return turns[:-1], turns[-1]


def turns_of(messages: list[Message], persona: str, default_user: str) -> list[Turn]:
    """The messages as turns; consecutive messages of one writer form one turn, like a burst in a messenger."""
    turns: list[Turn] = []
    for message in messages:
        if message.role in ("system", "developer"):
            continue  # personas have no system prompt: who speaks is in the headers
        if message.role not in ("user", "assistant"):
            raise ApiError(400, f"Invalid role {message.role!r}: use user or assistant", "messages")
        if message.role == "user" and message.name is not None and header_name(message.name) == header_name(persona):
            raise ApiError(400, f"A user message cannot be written as {persona!r}, the persona the model plays: "
                                "name another writer", "messages")
        speaker = persona if message.role == "assistant" else (message.name or default_user)
        add_messages(turns, speaker, message.messages())
    return turns


def create_app(model: Any, tokenizer: Any, personas: list[str], default_user: str,
               cfg: ServeConfig | None = None, default_persona: str | None = None,
               memory: Recall | None = None, feedback: Path | None = None) -> FastAPI:
    """The app of `model` (`open_model`'s engine, or a transformers model: `Conversation` takes either); `feedback`:
    the run's feedback.jsonl that POST /doppel/feedback writes (None: it refuses). Generations take turns on the
    model in the engine, first come first served."""
    cfg = cfg or ServeConfig()
    app = FastAPI(title="doppel", docs_url=None, redoc_url=None, openapi_url=None)
    turn_cache = TurnIds(tokenizer)  # a conversation that comes back one turn longer tokenizes that turn alone
    names = personas or [default_persona or "Me"]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # its location is a byte offset, not a parameter
            return _error(400, f"The body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"Invalid request: {where}: {first.get('msg')}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), code="request_too_large" if exc.status_code == 413 else None)

    @app.exception_handler(Exception)
    async def failed(_: Request, exc: Exception) -> JSONResponse:
        log_failure(exc)
        return _error(500, f"The server failed: {type(exc).__name__}", "server_error")

    app.add_middleware(Guard, cfg=cfg)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "doppel"}
                                           for name in names]}

    def writer(request: ChatRequest | FeedbackRequest) -> str:
        """Who writes a user message without a name; `ApiError` for a persona or a conversation not served."""
        if personas and request.model not in personas:
            raise ApiError(404, f"The model `{request.model}` does not exist", "model", "model_not_found")
        if len(request.messages) > cfg.max_messages:
            raise ApiError(400, f"Too many messages: {len(request.messages)}, at most {cfg.max_messages}",
                           "messages", "too_many_messages")
        # the default writer cannot be the persona asked for: then it is the next person
        return default_user if default_user != request.model else next(
            (p for p in personas if p != request.model), "Friend")

    def conversation(request: ChatRequest) -> Conversation:
        """The request's conversation with the user's turn added; raises `ApiError` for what cannot run."""
        if request.n not in (None, 1):
            raise ApiError(400, "Only n=1 is supported", "n")
        earlier, last = history(request, request.model, writer(request))
        try:
            recall = None
            if memory is not None:  # a conversation that goes on opens with the same turn: the same remembered id
                opening = earlier[0] if earlier else last
                seed = [request.model, opening.speaker, opening.messages] + ([request.user] if request.user else [])
                recall = memory.for_conversation(Recall.new_conversation(json.dumps(seed, ensure_ascii=False)),
                                                 scope=request.user or None)
            chat = Conversation(model, tokenizer, request.model, last.speaker, request.sampling(),
                                max_prompt=cfg.max_prompt_tokens, memory=recall, turn_cache=turn_cache)
            chat.load(earlier)
            chat.add(list(last.messages))
        except ContextTooLong as exc:
            raise ApiError(400, f"This request does not fit the model's context: {exc}", "messages",
                           "context_length_exceeded") from None
        except DoppelError as exc:  # a sampling setting out of range
            raise ApiError(400, str(exc)) from None
        return chat

    def replies(reply: Reply, stops: list[str]) -> Iterator[str]:
        """The persona's messages, cut at the first stop string, once the model is free (a client that leaves while
        it waits sets the reply's `cancel`, and gives up its place: the engine's queue)."""
        try:
            for message in reply:
                cut = min((message.find(s) for s in stops if s in message), default=-1)
                if cut >= 0:
                    reply.finish_reason = "stop"
                    if message[:cut].strip():
                        yield message[:cut].rstrip()
                    return
                yield message
        finally:
            reply.close()

    @app.post("/v1/chat/completions", response_model=None)
    async def completions(body: ChatRequest, request: Request) -> Any:
        stops = body.stops()
        cancel = threading.Event()
        # tokenizing a long history is work too: not on the event loop
        chat = await asyncio.to_thread(conversation, body)
        reply = await asyncio.to_thread(chat.answer, cancel)
        extension = {"doppel": {"memory": [_entry(e) for e in chat.recalled]}} if memory is not None else {}
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return StreamingResponse(_events(replies(reply, stops), cancel, lambda: reply.finish_reason or
                                             "length", ident, created, body.model, extension),
                                     media_type="text/event-stream")
        work = asyncio.ensure_future(asyncio.to_thread(lambda: list(replies(reply, stops))))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=0.25)
                if not work.done() and await request.is_disconnected():
                    cancel.set()  # nobody will read the answer: stop generating it
            said = work.result()
        except ChatError as exc:
            log_failure(exc)
            raise ApiError(500, str(exc), kind="server_error") from None
        finally:
            cancel.set()
        return {"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "finish_reason": reply.finish_reason or "length", "logprobs": None,
                             "message": {"role": "assistant", "content": "\n".join(said)}}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                          "total_tokens": reply.prompt_tokens + reply.completion_tokens},
                "doppel": {**extension.get("doppel", {}), "messages": said}}

    @app.post("/doppel/feedback")
    async def rewrite(body: FeedbackRequest) -> dict[str, Any]:
        """Record the owner's rewrite of the persona's last reply (a JSON body only: a form another site posts is
        refused before it gets here)."""
        if feedback is None:
            raise ApiError(403, "This server records no feedback: it was started without a trained run, or with "
                                "--no-feedback", code="feedback_off")
        turns = turns_of(body.messages, body.model, writer(body))
        if not turns or turns[-1].speaker != body.model:
            raise ApiError(400, "The last message must be the persona's reply (role assistant) to rewrite", "messages")
        chosen = tuple(line.strip() for line in body.content.split("\n") if line.strip())
        if not chosen:
            raise ApiError(400, "content must hold the reply as you would write it, one message per line", "content")
        recorded = chosen != turns[-1].messages
        pair = FeedbackPair(tuple(turns[:-1]), body.model, chosen, turns[-1].messages, "page", int(time.time()))
        try:
            if recorded:
                await asyncio.to_thread(record, feedback, pair)
        except OSError as exc:
            raise ApiError(500, f"Cannot write the feedback file ({exc.strerror or exc})",
                           kind="server_error") from None
        return {"object": "doppel.feedback", "recorded": recorded, "chosen": list(chosen),
                "rejected": list(turns[-1].messages)}

    return app


def _entry(entry: MemoryEntry) -> dict[str, Any]:
    """A recalled entry as the `doppel.memory` extension field shows it."""
    return {"id": entry.id, "chat": entry.chat_name, "speakers": list(entry.speakers), "start": entry.start,
            "end": entry.end, "lines": [{"speaker": s, "text": t} for s, t in entry.lines]}


def _host_allowed(host: str, cfg: ServeConfig) -> bool:
    """The Host header names the bound address (DNS rebinding: a web page's own name pointed at 127.0.0.1)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    allowed = {host.lower() for host in cfg.allowed_host} | {cfg.host.lower()}
    if "*" in allowed or cfg.host in ("0.0.0.0", "::", ""):  # any address: the API key guards it
        return True
    return name in allowed | (set(LOOPBACK) if cfg.loopback else set())


class Guard:
    """Refuses a request before any work: a Host header that is not the bound address, a missing API key, a body
    over the size limit (413: by its Content-Length at once, or as its chunks arrive).

    Plain ASGI: Starlette's BaseHTTPMiddleware would run the app in a task of its own, which wraps the 413 raised
    while the body is read in an exception group and hides a client's disconnect from the endpoint.
    """

    def __init__(self, app: Any, cfg: ServeConfig) -> None:
        self.app, self.cfg = app, cfg

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope, Headers(scope=scope))
        if refusal is not None:
            return await refusal(scope, receive, send)
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.cfg.max_body_bytes:
                raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    def _refusal(self, scope: Any, headers: Headers) -> JSONResponse | None:
        if not _host_allowed(headers.get("host", ""), self.cfg):
            return _error(400, "Invalid Host header (doppel answers only to the address it is bound to; see "
                               "--allowed-host)", code="invalid_host")
        if self.cfg.api_key and scope["path"].startswith(("/v1/", "/doppel/")) and not hmac.compare_digest(
                headers.get("authorization", "").encode(), f"Bearer {self.cfg.api_key}".encode()):
            return _error(401, "Incorrect API key provided", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cfg.max_body_bytes):
            return _error(413, self._too_large(), code="request_too_large")
        return None

    def _too_large(self) -> str:
        return f"The request body is larger than {self.cfg.max_body_bytes} bytes (--max-body-bytes)"


async def _events(messages: Iterator[str], cancel: threading.Event, finish: Callable[[], str], ident: str,
                  created: int, model: str, extension: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events: a role chunk (with the `extension` fields), one chunk per message (newline-separated), a
    finish chunk, [DONE]; an error event instead of the finish chunk when generation fails."""
    def chunk(delta: dict[str, Any], reason: str | None = None, **more: Any) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **more}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def produce() -> None:
        try:
            for message in messages:
                loop.call_soon_threadsafe(queue.put_nowait, message)
        except BaseException as exc:  # sent to the client as an error event
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    try:
        yield chunk({"role": "assistant", "content": ""}, **extension)
        threading.Thread(target=produce, daemon=True).start()
        first = True
        while (message := await queue.get()) is not None:
            if isinstance(message, BaseException):
                log_failure(message)
                failed = type(message).__name__
                said = str(message) if isinstance(message, ChatError) else f"The server failed: {failed}"
                yield f"data: {json.dumps(ApiError(500, said, kind='server_error').body(), ensure_ascii=False)}\n\n"
                await queue.get()
                break
            yield chunk({"content": message if first else "\n" + message})
            first = False
        else:
            yield chunk({}, finish())
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client left (the response was cancelled) or the reply is complete
