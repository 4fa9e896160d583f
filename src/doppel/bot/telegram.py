"""`doppel bot`: the persona in Telegram, through the Bot API (python-telegram-bot).

Bot mode: the people the owner allows write to the bot, and the owner's persona answers them, a turn of one or more
messages, with "typing…" while it writes and a pause before each message. Only the owner may have another persona
answer, and only in the owner's own chat (people.py).

Business mode: the bot is the owner's chatbot in Telegram Business and sees the owner's private chats. It suggests a
reply in the owner's chat with the bot, with Send / Edit / Skip buttons, and nothing reaches the contact before the
owner's tap; with `auto`, allowed contacts get the reply at once, each message opened by a marker that says it is
not the owner, unless the owner wrote in that chat lately. What the owner does with each draft goes to
RUN/feedback.jsonl (intake.py, feedback.py) unless `feedback` is off; nothing is recorded in bot mode.

One loop long-polls getUpdates and files each update into the state (intake.py, state.py) before acknowledging it; a
worker per chat answers its inbox and empties its outbox, the Bot API calls waiting out flood limits and outages
(api.py). The model writes one reply at a time, in a thread, so updates keep coming in meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from telegram import Bot
from telegram.error import InvalidToken, TelegramError

from doppel.bot.api import Api, connect, markup, new_bot
from doppel.bot.intake import Intake
from doppel.bot.people import OwnRecall, People, people_of
from doppel.bot.state import Chat, Op, State
from doppel.config import BotConfig, Sampling
from doppel.errors import BotError, ChatError
from doppel.feedback import FEEDBACK_FILE
from doppel.memory.recall import Recall
from doppel.records import Turn
from doppel.serving.chat import Conversation, add_messages, open_memory

if TYPE_CHECKING:
    from doppel.engines import Engine
    from doppel.run import Loaded, Run

UPDATES = ("message", "callback_query", "business_connection", "business_message")
TYPING_EVERY = 4.5  # seconds; Telegram shows "typing…" for 5
MAX_PAUSE = 8.0  # seconds of typing before one message, at most
FINISH_WAIT = 10.0  # seconds a stop waits for the Bot API calls under way
log = logging.getLogger(__name__)
T = TypeVar("T")


async def serve(run: Run, token: str, cfg: BotConfig, sampling: Sampling, loaded: Loaded | None = None,
                ready: Callable[[str], None] | None = None, engine: str = "auto", gguf: Path | None = None) -> None:
    """Run the bot of `token` for `run` until cancelled (Ctrl-C). `BotError` for a refused token, an unreachable Bot
    API, or a setting the run cannot honour; `loaded`: the run's model, when it is loaded already (else `engine`
    and `gguf` say how to load it, as in `run.open_model`)."""
    from doppel.run import open_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines carry the token
    os.environ.setdefault("PTB_TIMEDELTA", "1")  # PTB's next behaviour (RetryAfter in a timedelta), not its warning
    people = people_of(run, cfg)
    try:
        bot = new_bot(token, cfg.base_url)
    except InvalidToken as exc:
        raise BotError(f"{exc}; copy the token from @BotFather") from None
    try:
        me = await connect(bot, cfg.base_url, token)
        state = State.load(run.path / "bot" / f"bot{me.id}.json")
        recall = open_memory(run, cfg.memory)
        if loaded is None:
            loaded = await asyncio.to_thread(open_model, run.path, engine, gguf)
        feedback = run.path / FEEDBACK_FILE if cfg.business and cfg.feedback else None
        twin = Twin(bot, cfg, sampling, people, state, loaded.engine, loaded.tokenizer, recall, feedback)
        if ready is not None:
            ready(_describe(me.username, people, cfg, recall))
        await twin.run()
    finally:
        with contextlib.suppress(TelegramError):  # the connection pool is closed either way
            await bot.shutdown()


def _describe(username: str | None, people: People, cfg: BotConfig, recall: Recall | None) -> str:
    memory = f"memory: {len(recall.memory.entries):,} entries" if recall else "memory: off"
    if cfg.business:
        mode = (f"answers allowed contacts with {cfg.marker.strip()!r}, drafts the rest" if cfg.auto
                else "drafts replies for you to send")
        return f"@{username}: business mode, {people.owner_name} {mode} ({memory}); Ctrl-C stops"
    allowed = ", ".join([str(i) for i in sorted(people.ids)] + [f"@{u}" for u in sorted(people.usernames)])
    return (f"@{username}: {people.owner_name} answers you{' and ' + allowed if allowed else ''} ({memory}); "
            "Ctrl-C stops")


class Twin:
    """The running bot: the poll loop, a worker per chat. The chats' replies take turns on the engine (it writes
    one at a time), each in a thread, so that updates keep coming in meanwhile."""

    def __init__(self, bot: Bot, cfg: BotConfig, sampling: Sampling, people: People, state: State, engine: Engine,
                 tokenizer: Any, recall: Recall | None, feedback: Path | None = None) -> None:
        self.bot, self.cfg, self.sampling, self.people, self.state = bot, cfg, sampling, people, state
        self.api = Api(bot)
        self.intake = Intake(self.api, cfg, people, state, self._wake, feedback)
        self.engine, self.tokenizer, self.recall = engine, tokenizer, recall
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.conversations: dict[str, Conversation] = {}
        self.cancel = threading.Event()  # stops the generation under way, and those waiting, when the bot stops
        self.arrived: dict[str, float] = {}  # when a chat's newest message came (loop time)
        self.spoke: dict[str, float] = {}  # when the bot began or last sent a message in a chat (loop time)
        self.failed: asyncio.Future[None] | None = None
        self.finishing: set[asyncio.Future[None]] = set()  # calls under way that a stop waits for

    async def run(self) -> None:
        """Poll and answer until cancelled; a worker's failure stops the bot and is raised."""
        self.failed = asyncio.get_running_loop().create_future()
        for key, chat in self.state.chats.items():
            if chat.inbox or chat.outbox:  # left by the last run
                self._wake(key)
        poller = asyncio.create_task(self._poll())
        try:
            await asyncio.wait([poller, self.failed], return_when=asyncio.FIRST_COMPLETED)
            if self.failed.done():
                self.failed.result()
            poller.result()
        finally:
            self.cancel.set()
            self.api.stopping = True  # the call under way ends; no other begins
            tasks = [poller, *self.workers.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.finishing:
                await asyncio.wait(self.finishing, timeout=FINISH_WAIT)
                for late in self.finishing:
                    late.cancel()  # the network is down: the call goes again after a restart

    async def _poll(self) -> None:
        while True:
            updates = await self.api.call(self.bot.get_updates, offset=self.state.offset,
                                          timeout=self.cfg.poll_timeout, allowed_updates=list(UPDATES))
            if updates is None:  # asking again would be refused again, as fast as Telegram answers
                raise BotError("the Bot API refuses getUpdates (the warning above says why)")
            for update in updates:
                if update.update_id < self.state.offset:
                    continue
                await self.intake.file(update)
                self.state.offset = update.update_id + 1
                self.state.save()  # from here on Telegram may forget it: the next poll acknowledges it
                self.intake.flush()

    # --- the workers --------------------------------------------------------------------------------------------

    def _wake(self, key: str, arrived: bool = False) -> None:
        """Have the chat's worker see to its inbox and outbox; `arrived`: a writer's message, to gather others with."""
        if arrived:
            self.arrived[key] = asyncio.get_running_loop().time()
        task = self.workers.get(key)
        if task is None or task.done():
            self.workers[key] = asyncio.create_task(self._guard(self._work(key)))

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception as exc:  # stops the bot, and the caller of `run` sees why
            if self.failed is not None and not self.failed.done():
                self.failed.set_exception(exc)

    async def _work(self, key: str) -> None:
        """Empty the chat's outbox, then answer its inbox (once its writer paused for `gather`), until neither
        holds anything."""
        chat = self.state.chats[key]
        loop = asyncio.get_running_loop()
        while chat.outbox or chat.inbox:
            if chat.outbox:
                op = chat.outbox[0]
                if op.get("paced"):
                    await self._pause(key, chat, op.get("text") or "")
                await self._finish(self._deliver(key, chat, op))
                continue
            wait = self.cfg.gather - (loop.time() - self.arrived.get(key, -math.inf))
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self._turn(key, chat)

    async def _turn(self, key: str, chat: Chat) -> None:
        """Bring the inbox into the history and answer the writer's newest messages."""
        taken = len(chat.inbox)
        turns = chat.turns()
        said: list[str] = []
        for item in chat.inbox[:taken]:
            if item.get("reset"):
                turns, said = [], []
                conversation = self.conversations.get(key)
                if conversation is not None and conversation.memory is not None:
                    conversation.memory.reset()
            elif item["owner"]:
                if chat.user is not None:
                    add_messages(turns, chat.user, said)
                if chat.persona is not None:
                    add_messages(turns, chat.persona, [item["text"]])
                said = []
            else:
                said.append(item["text"])
        ops: list[Op] = []
        if said:
            turns, ops = await self._reply(key, chat, turns, said)
        chat.keep(turns)
        del chat.inbox[:taken]
        chat.outbox.extend(ops)
        self.state.save()

    async def _reply(self, key: str, chat: Chat, turns: list[Turn], said: list[str]) -> tuple[list[Turn], list[Op]]:
        """(history, calls to make): the persona's answer to `said`, as messages to send or as a draft."""
        if turns and turns[-1].speaker == chat.user:  # a turn left unanswered (a skipped draft): answered with these
            said = list(turns.pop().messages) + said
        business = chat.business is not None
        auto = business and self._auto(chat)
        conversation = self._conversation(key, chat, turns)
        self.spoke[key] = asyncio.get_running_loop().time()
        try:
            work = self._generate(conversation, said)
            reply = await (self._typing_during(chat, work) if auto or not business else work)
        except ChatError as exc:  # a turn too long for the context, a model that failed: the turn is dropped
            if business:
                self.intake.not_drafted(chat, said, exc)
                return turns, []
            return turns, [{"op": "send", "chat_id": chat.chat_id, "text": f"({exc}; not answered)"}]
        turns = list(conversation.history)
        auto = auto and self._auto(chat)  # the owner may have written meanwhile
        if business and not auto:
            if reply:
                turns.pop()  # not said until the owner sends it
                self.intake.draft(key, chat, said, reply, turns)
            return turns, []
        marker = self.cfg.marker if business else ""
        return turns, [{"op": "send", "chat_id": chat.chat_id, "business": chat.business, "text": marker + text,
                        "paced": True} for text in reply]

    def _auto(self, chat: Chat) -> bool:
        """Whether --auto answers this business chat now: an allowed contact, and the owner quiet in it."""
        contact = chat.contact
        return (self.cfg.auto and self.people.allowed(contact.get("id", 0), contact.get("username"))
                and time.time() - chat.owner_at >= self.cfg.quiet_minutes * 60)

    def _conversation(self, key: str, chat: Chat, turns: list[Turn]) -> Conversation:
        conversation = self.conversations.get(key)
        if conversation is None:
            memory: Recall | None = None
            if self.recall is not None and chat.business is None and chat.contact.get("owner"):
                memory = self.recall.for_conversation(f"telegram:{key}")
            elif self.recall is not None:  # by the Telegram id Telegram gave, never by a name or by /as
                people = self.people.recalled(chat.contact.get("id", 0))
                if people is not None:
                    memory = OwnRecall(self.recall.for_conversation(f"telegram:{key}"), people)
            conversation = self.conversations[key] = Conversation(
                self.engine, self.tokenizer, chat.persona or "", chat.user or "", self.sampling, self.cfg.max_context,
                memory=memory)
        conversation.persona, conversation.user = chat.persona or "", chat.user or ""
        conversation.load(turns)  # what was tokenized for the last reply is not tokenized again
        return conversation

    async def _generate(self, conversation: Conversation, said: list[str]) -> list[str]:
        """The reply to `said`, in a thread: it waits there for the replies of other chats before it (engines.Turns)."""
        return await asyncio.to_thread(lambda: conversation.reply(said, self.cancel).wait())

    async def _typing_during(self, chat: Chat, work: Awaitable[T]) -> T:
        """Await `work` with "typing…" shown in the chat, from before it starts to its end."""
        try:
            await self.api.typing(chat.chat_id, chat.business)
        except BaseException:
            if asyncio.iscoroutine(work):
                work.close()  # stopped before it began
            raise

        async def keep() -> None:
            while True:
                await asyncio.sleep(TYPING_EVERY)
                await self.api.typing(chat.chat_id, chat.business)

        ticker = asyncio.create_task(keep())
        try:
            return await work
        finally:
            ticker.cancel()

    async def _deliver(self, key: str, chat: Chat, op: Op) -> None:
        """Make the outbox's first call, until Telegram takes it (or refuses it: a warning), and strike it off. No
        await between Telegram's answer and the save: `Api.deliver` lets the next call begin only after it."""
        if op["op"] == "send":
            sent = await self.api.deliver(self.bot.send_message, op["chat_id"], op["text"], reply_markup=markup(op),
                                          business_connection_id=op.get("business"))
            self.spoke[key] = asyncio.get_running_loop().time()
            if sent is not None and op.get("draft", "") in self.state.drafts:
                self.state.drafts[op["draft"]]["message_id"] = sent.message_id
        elif op["op"] == "edit":
            await self.api.deliver(self.bot.edit_message_text, op["text"], chat_id=op["chat_id"],
                                   message_id=op["message_id"])
        elif op["op"] == "answer":
            await self.api.deliver(self.bot.answer_callback_query, op["id"], text=op.get("text"))
        chat.outbox.pop(0)
        self.state.save()

    async def _finish(self, work: Coroutine[Any, Any, None]) -> None:
        """Await `work` to its end even when the bot stops meanwhile (`run` waits for it): a call that Telegram may
        have taken is struck off, not made again after a restart (one not yet begun ends at once: `Api.stopping`)."""
        task = asyncio.ensure_future(work)
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        await asyncio.shield(task)

    async def _pause(self, key: str, chat: Chat, text: str) -> None:
        """Type for as long as a person would type `text` (`pace` seconds a character), counted from the bot's last
        message in the chat or the start of the reply."""
        loop = asyncio.get_running_loop()
        wait = min(MAX_PAUSE, self.cfg.pace * len(text)) - (loop.time() - self.spoke.get(key, -math.inf))
        if wait > 0:
            await self._typing_during(chat, asyncio.sleep(wait))
