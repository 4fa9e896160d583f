"""The Bot API as the bot uses it: connecting, and calls that wait out flood limits (429) and network failures.

python-telegram-bot makes the requests; what to do when one fails is decided here: a flood wait is waited, a
network failure is retried with a growing delay (one warning per outage), a refusal (a user who blocked the bot, a
message too old to edit) is a warning and the call is dropped, and a revoked token or a second poller stops the bot
with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from doppel.errors import BotError

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_DELAY = 60.0  # seconds between two tries while the Bot API cannot be reached, at most


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
        self.offline = False  # the last call failed on the network (warned once)

    async def call(self, method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T | None:
        """`method(*args, **kwargs)`, again after a flood wait or a network failure; None when Telegram refuses
        it, said in a warning."""
        delay = 1.0
        while True:
            try:
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
                raise BotError("another program gets this bot's updates (a second doppel bot, or a webhook): stop "
                               "it, or delete the webhook") from None
            except NetworkError as exc:  # timeouts and 5xx answers included
                if not self.offline:
                    log.warning("cannot reach the Bot API (%s); trying again", _text(exc, self.bot.token))
                self.offline = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_DELAY)
                continue
            except TelegramError as exc:
                raise BotError(f"the Bot API answered: {_text(exc, self.bot.token)}") from None
            if self.offline:
                log.warning("the Bot API answers again")
                self.offline = False
            return result

    async def typing(self, chat_id: int, business: str | None) -> None:
        """Show "typing…" in a chat: a hint, never worth a wait or a failure."""
        with contextlib.suppress(TelegramError):
            await self.bot.send_chat_action(chat_id, ChatAction.TYPING, business_connection_id=business)


def markup(op: dict[str, Any]) -> InlineKeyboardMarkup | ForceReply | None:
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
    return str(exc).replace(token, "TOKEN") if token else str(exc)
