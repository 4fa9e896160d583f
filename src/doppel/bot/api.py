"""The Bot API as the bot uses it: connecting, and calls that wait out flood limits (429) and network failures.

python-telegram-bot makes the requests; what to do when one fails is decided here: a flood wait is waited (an hour
at most, whatever Telegram asks), a network failure or an answer that is not JSON is retried with a growing delay
(one warning per outage), a refusal (a user who blocked the bot, a message too old to edit) is a warning and the
call is dropped, and a revoked token or a second poller stops the bot with one line.

The outboxes' calls (`deliver`) go to Telegram one at a time across all chats, and the caller strikes a call off
its outbox, in the state file, before anything else runs: so at any moment at most one call has gone out without
its answer being on disk, and a crash repeats at most one message. The price: the bot's messages to all chats go
one after another, each waiting for Telegram's answer (a round trip, tens of milliseconds; Telegram lets a bot
send about 30 messages a second in all anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from telegram import Bot, ForceReply, InlineKeyboardButton, InlineKeyboardMarkup, User
from telegram.constants import ChatAction
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.request import HTTPXRequest

from doppel.bot.state import Op
from doppel.errors import BotError

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_DELAY = 60.0  # seconds between two tries while the Bot API cannot be reached, at most
MAX_FLOOD_WAIT = 3600.0  # seconds a flood limit is waited, at most: Telegram has asked for 10^9
MAX_SHOWN = 200  # characters of a Bot API error a message quotes, at most (an error page can be long)


class Request(HTTPXRequest):
    """python-telegram-bot's requests, reading the answers as doppel needs: a flood wait above `MAX_FLOOD_WAIT` is
    cut to it, with a warning (10^16 s would overflow the timedelta PTB makes of it), and a body that is not JSON
    (a proxy's error page) fails like any bad answer, without the traceback PTB logs for it."""

    @staticmethod
    def parse_json_payload(payload: bytes) -> dict[str, Any]:
        try:
            data = json.loads(payload.decode("utf-8", "replace"))
        except ValueError as exc:
            raise TelegramError("Invalid server response") from exc
        parameters = data.get("parameters") if isinstance(data, dict) else None
        if isinstance(parameters, dict):
            wait = parameters.get("retry_after")
            if isinstance(wait, int | float) and not isinstance(wait, bool) and not wait <= MAX_FLOOD_WAIT:
                log.warning("the Bot API asks to wait %s s; waiting %g s (the most doppel waits), then trying again",
                            wait, MAX_FLOOD_WAIT)
                parameters["retry_after"] = MAX_FLOOD_WAIT
        return data


def new_bot(token: str, base_url: str) -> Bot:
    """A `Bot` whose requests are `Request`s (the pools as PTB sizes them: one for getUpdates, 256 for the rest)."""
    return Bot(token, base_url=base_url, request=Request(), get_updates_request=Request(connection_pool_size=1))


async def connect(bot: Bot, base_url: str, token: str) -> User:
    """The bot's own account (getMe), or a `BotError` that says in one line why there is none."""
    where = urlsplit(base_url).netloc
    try:
        await bot.initialize()
    except InvalidToken:
        raise BotError("the Bot API refused the token; copy it again from @BotFather") from None
    except BadRequest as exc:
        raise BotError(f"the Bot API at {where} answered: {_text(exc, token)}") from None
    except NetworkError as exc:
        raise BotError(f"cannot reach the Bot API at {where} ({_text(exc, token)}); check the connection, or "
                       "--base-url") from None
    except TelegramError as exc:
        raise BotError(f"the Bot API at {where} answered: {_text(exc, token)}") from None
    return bot.bot


class Api:
    """The bot's calls, each made until Telegram takes it or refuses it."""

    def __init__(self, bot: Bot) -> None:
        self.bot = bot
        self.failing: set[object] = set()  # the calls whose last try failed on the network (an outage: warned once)
        self.turn = asyncio.Lock()  # held by the one `deliver` call under way
        self.stopping = False  # the bot stops: no call begins any more

    async def call(self, method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T | None:
        """`method(*args, **kwargs)`, again after a flood wait or a network failure; None when Telegram refuses
        it, said in a warning."""
        return await self._call(contextlib.nullcontext(), method, args, kwargs)

    async def deliver(self, method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T | None:
        """`call` for an outbox: each try waits for the one under way to end (see the module's docstring), and the
        caller strikes the call off before it awaits anything else."""
        return await self._call(self.turn, method, args, kwargs)

    async def _call(self, turn: contextlib.AbstractAsyncContextManager[Any], method: Callable[..., Awaitable[T]],
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> T | None:
        delay, me = 1.0, object()
        try:
            while True:
                try:
                    async with turn:  # released while a flood wait or a retry waits: other chats go on
                        if self.stopping:
                            raise asyncio.CancelledError  # not begun: it is made after a restart
                        result = await method(*args, **kwargs)
                except RetryAfter as exc:
                    await asyncio.sleep(_seconds(exc))
                    continue
                except (BadRequest, Forbidden, ChatMigrated) as exc:
                    name = getattr(method, "__name__", "a call")
                    log.warning("Telegram refused %s: %s", name, _text(exc, self.bot.token))
                    return None
                except InvalidToken:
                    raise BotError("the Bot API no longer accepts the token; copy it again from @BotFather") from None
                except Conflict:
                    raise BotError("another program gets this bot's updates (a second doppel bot, or a webhook): "
                                   "stop it, or delete the webhook") from None
                except NetworkError as exc:  # timeouts, 5xx answers and answers that are not JSON included
                    if not self.failing:
                        log.warning("cannot reach the Bot API (%s); trying again", _text(exc, self.bot.token))
                    self.failing.add(me)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, MAX_DELAY)
                    continue
                except TelegramError as exc:
                    raise BotError(f"the Bot API answered: {_text(exc, self.bot.token)}") from None
                if me in self.failing:
                    self.failing.discard(me)
                    if not self.failing:
                        log.warning("the Bot API answers again")
                return result
        finally:
            self.failing.discard(me)

    async def typing(self, chat_id: int, business: str | None) -> None:
        """Show "typing…" in a chat: a hint, never worth a wait or a failure."""
        with contextlib.suppress(TelegramError):
            await self.bot.send_chat_action(chat_id, ChatAction.TYPING, business_connection_id=business)


def markup(op: Op) -> InlineKeyboardMarkup | ForceReply | None:
    """The buttons (or the reply prompt) of an outbox message."""
    if op.get("buttons"):
        return InlineKeyboardMarkup([[InlineKeyboardButton(label, callback_data=data)
                                      for label, data in op["buttons"]]])
    return ForceReply() if op.get("force_reply") else None


def _seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # an int before PTB_TIMEDELTA, with a warning that it will change
        warnings.simplefilter("ignore")
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _text(exc: BaseException, token: str) -> str:
    text = str(exc).replace(token, "TOKEN") if token else str(exc)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 1] + "…"
