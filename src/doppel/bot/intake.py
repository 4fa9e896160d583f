"""What each update means for the bot's state: a message to answer, a command, a refusal owed, a business chat's
new word, the owner's tap on a draft. Nothing here waits on the model; the workers (telegram.py) answer later.

What the owner does with a draft is feedback (feedback.py), gathered in `pending` while an update is filed and
written by `flush` once the state that update brought is saved: a crash may lose the pair of the update it cut short,
never write one twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from telegram import BusinessConnection, Message, Update

from doppel.bot.api import Api
from doppel.bot.people import People
from doppel.bot.state import Chat, Connection, Draft, Op, State
from doppel.config import BotConfig
from doppel.errors import ChatError, ContextTooLong
from doppel.feedback import FeedbackPair, Source, record
from doppel.records import Turn, spoken
from doppel.serving.chat import check_name, pick_people

SHOWN = 2000  # characters of the contact's messages a draft shows, at most
KEEP_DRAFTS = 50  # drafts sent or skipped that are kept (a late tap on an older one is told it is done)
REFUSAL = "Sorry, this bot only talks with people its owner has allowed."
BUSINESS_HELP = ("(business mode: when someone writes to you, the reply I suggest comes here, with Send, Edit and "
                 "Skip; nothing reaches them before you tap Send)")
log = logging.getLogger(__name__)


class Intake:
    """Files updates into the state, and wakes the chats that have work."""

    def __init__(self, api: Api, cfg: BotConfig, people: People, state: State,
                 wake: Callable[[str, bool], None], feedback: Path | None = None) -> None:
        self.api, self.cfg, self.people, self.state, self.wake = api, cfg, people, state, wake
        self.feedback = feedback  # RUN/feedback.jsonl; None: nothing recorded
        self.pending: list[FeedbackPair] = []  # to write once the state is saved

    async def file(self, update: Update) -> None:
        """File one update into the state (its answer is the workers' job)."""
        if update.business_connection is not None:
            if self.cfg.business:
                self._connected(update.business_connection, notify=True)
        elif update.business_message is not None:
            if self.cfg.business:
                await self._business_message(update.business_message)
        elif update.callback_query is not None:
            self._tapped(update)
        elif update.message is not None:
            self._message(update.message)

    def _message(self, message: Message) -> None:
        """A message in a private chat with the bot."""
        user = message.from_user
        if user is None or user.is_bot or message.chat.type != "private":
            return  # groups and channels are not served
        key = str(message.chat.id)
        owner = self.people.is_owner(user.id, user.username)
        if not (owner if self.cfg.business else self.people.allowed(user.id, user.username)):
            if user.id not in self.state.refused:
                self.state.refused.add(user.id)
                self._say(key, self._chat(key, message.chat.id), REFUSAL)
            return
        text = message.text or message.caption
        if self.cfg.business:
            self._owner_wrote(key, message, text)
            return
        chat = self._persona_chat(key, message)
        if not text:
            return
        if text.startswith("/"):
            self._command(key, chat, owner, text)
            return
        chat.inbox.append({"text": text, "owner": False})
        self.wake(key, True)

    def _persona_chat(self, key: str, message: Message) -> Chat:
        """The chat of a bot-mode writer, who is talked to by the owner's persona unless it is the owner."""
        user = message.from_user
        assert user is not None
        chat = self._chat(key, message.chat.id)
        owner = self.people.is_owner(user.id, user.username)
        if chat.persona is None:
            chat.persona = self.people.persona if owner else self.people.owner_name
            chat.user = self.people.speaker(user.id, user.full_name, chat.persona)
        if not owner and chat.persona != self.people.owner_name:  # a setting of an earlier run; never for others
            chat.persona = self.people.owner_name
        chat.contact = {"id": user.id, "username": user.username, "name": user.full_name, "owner": owner}
        return chat

    def _command(self, key: str, chat: Chat, owner: bool, text: str) -> None:
        name, _, arg = text.partition(" ")
        name, arg = name.split("@")[0].lower(), arg.strip()
        known = list(self.people.speakers)
        try:
            if name == "/start":
                reply = (f"Hi! I am a language model that writes like {chat.persona}, trained on their chats; I am "
                         f"not {chat.persona} in person. You are {chat.user} to me: /as NAME to change that, /reset "
                         "to start over.")
            elif name == "/reset":
                chat.inbox.append({"reset": True})
                self.wake(key, False)
                reply = "(a new conversation)"
            elif name == "/as" and arg:
                who = check_name(arg, known, "speaker")
                reply = f"({who} is who answers; /as someone else)"
                if who != chat.persona:
                    chat.user, reply = who, f"(you are {who} now)"
            elif name == "/persona" and arg and not owner:
                reply = "(only the bot's owner can change who answers)"
            elif name == "/persona" and arg:
                chat.persona = check_name(arg, known, "persona")
                if chat.user == chat.persona:
                    chat.user = pick_people(known, self.people.owner_name, chat.persona)[1]
                reply = f"({chat.persona} answers now; you are {chat.user})"
            else:
                reply = "(commands: /reset, /as NAME" + (", /persona NAME)" if owner else ")")
        except ChatError as exc:
            reply = f"({exc})"
        self._say(key, chat, reply)

    def _connected(self, connection: BusinessConnection, notify: bool) -> None:
        user = connection.user
        owner = self.people.is_owner(user.id, user.username)
        self.state.connections[connection.id] = {"user": user.id, "chat": connection.user_chat_id, "owner": owner}
        if not owner:
            log.warning("a Telegram Business account that is not yours (%s, id %d) connected the bot: ignored",
                        user.full_name, user.id)
        elif notify:
            key = str(connection.user_chat_id)
            rights = connection.rights
            note = ("(connected to your Business account: the replies I suggest will come here)" if
                    connection.is_enabled else "(disconnected from your Business account)")
            if connection.is_enabled and rights is not None and not rights.can_reply:
                note = note[:-1] + "; allow me to reply to messages in Telegram Business → Chatbots)"
            self._say(key, self._chat(key, connection.user_chat_id), note)

    async def _connection(self, connection_id: str) -> Connection | None:
        """The owner's business connection of this id, asked of the Bot API when it is new; None for another's."""
        if connection_id not in self.state.connections:
            found = await self.api.call(self.api.bot.get_business_connection, connection_id)
            if found is None:
                return None
            self._connected(found, notify=False)
        connection = self.state.connections[connection_id]
        return connection if connection["owner"] else None

    async def _business_message(self, message: Message) -> None:
        """A message in one of the owner's private chats: the contact's, or the owner's own by hand."""
        connection_id = message.business_connection_id
        if connection_id is None or message.chat.type != "private" or message.sender_business_bot is not None:
            return  # a message a bot sent for the owner (this one's replies among them) is no one's new word
        connection = await self._connection(connection_id)
        if connection is None:
            return
        key = f"{connection_id}:{message.chat.id}"
        chat = self._chat(key, message.chat.id, connection_id)
        if chat.persona is None:
            contact = message.chat  # a private chat is the contact
            chat.persona = self.people.owner_name
            chat.user = self.people.speaker(contact.id, contact.full_name or "", chat.persona)
            chat.contact = {"id": contact.id, "username": contact.username, "name": contact.full_name or chat.user}
        owner = message.from_user is not None and message.from_user.id == connection["user"]
        if owner:
            chat.owner_at = message.date.timestamp()
        text = message.text or message.caption
        if text:
            self._after_skip(key, text if owner else None)
            chat.inbox.append({"text": text, "owner": owner})
            self.wake(key, not owner)

    def _tapped(self, update: Update) -> None:
        """The owner's tap on a draft's Send, Edit or Skip."""
        query = update.callback_query
        assert query is not None
        user, message = query.from_user, query.message
        if not self.cfg.business or message is None or not self.people.is_owner(user.id, user.username):
            return
        key = str(message.chat.id)
        chat = self._chat(key, message.chat.id)
        action, _, number = (query.data or "").partition(":")
        draft = self.state.drafts.get(number)
        if draft is None or draft["status"] != "open":
            self._do(key, chat, {"op": "answer", "id": query.id, "text": "already done"})
            return
        draft["message_id"] = message.message_id
        if action == "send":
            self._do(key, chat, {"op": "answer", "id": query.id, "text": "sent"})
            self._send_draft(number, draft["messages"], "✓ sent")
            self._record(draft, draft["messages"], [], "bot-send")
        elif action == "skip":
            draft["status"] = "skipped"  # its context waits for what the owner writes to the contact instead
            waiting = [n for n, d in self.state.drafts.items()
                       if d["chat"] == draft["chat"] and d["status"] == "skipped" and "context" in d]
            for older in sorted(waiting, key=int)[:-1]:  # the newest answers the contact's words of all of them
                self.state.drafts[older].pop("context")
            self._do(key, chat, {"op": "answer", "id": query.id, "text": "skipped"})
            self._do(key, chat, self._edit(draft, "✗ skipped"))
        elif action == "edit":
            self.state.editing = number
            self._do(key, chat, {"op": "answer", "id": query.id})
            self._do(key, chat, {"op": "send", "chat_id": chat.chat_id, "force_reply": True,
                                 "text": f"Write the reply to {draft['name']}, one message per line:"})

    def _owner_wrote(self, key: str, message: Message, text: str | None) -> None:
        """The owner's message in the bot's chat: the corrected text of the draft being edited, else help."""
        chat = self._chat(key, message.chat.id)
        number, self.state.editing = self.state.editing, None
        draft = self.state.drafts.get(number or "")
        lines = [line.strip() for line in (text or "").split("\n") if line.strip()]
        if draft is not None and draft["status"] == "open" and lines and not lines[0].startswith("/"):
            self._send_draft(number or "", lines, "✓ sent as you wrote it")
            same = lines == draft["messages"]  # an edit that changed nothing approves the draft
            self._record(draft, lines, [] if same else draft["messages"], "bot-send" if same else "bot-edit")
            self._say(key, chat, f"(sent to {draft['name']})")
        else:
            self._say(key, chat, BUSINESS_HELP)

    def _send_draft(self, number: str, messages: list[str], note: str) -> None:
        """Send a draft (or the owner's correction of it) to its contact; it is the owner's turn in that chat."""
        draft = self.state.drafts[number]
        draft["status"] = "sent"
        contact = self.state.chats[draft["chat"]]
        for text in messages:
            contact.outbox.append({"op": "send", "chat_id": contact.chat_id, "business": contact.business,
                                   "text": text, "paced": True})
            contact.inbox.append({"text": text, "owner": True})
        self.wake(draft["chat"], False)
        control = self.state.chats[draft["control"]]
        self._do(draft["control"], control, self._edit(draft, note))

    def _edit(self, draft: Draft, note: str) -> Op:
        return {"op": "edit", "chat_id": self.state.chats[draft["control"]].chat_id,
                "message_id": draft["message_id"], "text": f"{draft['text']}\n\n{note}"}

    def draft(self, key: str, chat: Chat, said: list[str], reply: list[str], context: list[Turn]) -> None:
        """Offer `reply` to the owner, in the bot's chat, with Send / Edit / Skip; `context`: the chat's turns before
        it, kept with the draft for the feedback."""
        control_id = self.state.connections[chat.business or ""]["chat"]
        control_key = str(control_id)
        number = str(self.state.next_draft)
        self.state.next_draft += 1
        name = chat.contact.get("name") or chat.user or ""
        words = "\n".join(said)
        words = words if len(words) <= SHOWN else "…" + words[-SHOWN:]  # a message holds 4096 characters
        text = f"{name}:\n{words}\n\nSuggested reply:\n" + "\n".join(reply)
        done = [n for n, d in self.state.drafts.items() if d["status"] != "open"]
        for old in done[:-KEEP_DRAFTS]:
            del self.state.drafts[old]
        self.state.drafts[number] = {"chat": key, "control": control_key, "name": name, "messages": reply,
                                     "text": text, "status": "open", "message_id": None}
        if self.feedback is not None:
            self.state.drafts[number]["context"] = [(t.speaker, list(t.messages)) for t in context]
        self._do(control_key, self._chat(control_key, control_id), {
            "op": "send", "chat_id": control_id, "text": text, "draft": number,
            "buttons": [["Send", f"send:{number}"], ["Edit", f"edit:{number}"], ["Skip", f"skip:{number}"]]})

    def _after_skip(self, key: str, owner_text: str | None) -> None:
        """A message in business chat `key` after a skipped draft: the owner's (`owner_text`) is part of the reply they
        wrote instead; the contact's ends it, and the pair is recorded (or, when the owner wrote nothing, dropped)."""
        for draft in self.state.drafts.values():
            if draft["chat"] != key or draft["status"] != "skipped" or "context" not in draft:
                continue
            if owner_text is not None:
                draft.setdefault("answer", []).append(owner_text)
                return  # the newest skipped draft of the chat: there is only one that keeps its context
            self._record(draft, draft.pop("answer", []), draft["messages"], "bot-skip")

    def _record(self, draft: Draft, chosen: list[str], rejected: list[str], source: Source) -> None:
        """What the owner did with `draft`, as a pair to write once the state is saved; the draft's context goes."""
        context = draft.pop("context", None)
        persona = self.state.chats[draft["chat"]].persona
        chosen = [m for m in chosen if m.strip()]
        if self.feedback is None or context is None or persona is None or not chosen:
            return
        turns = tuple(spoken(speaker, messages) for speaker, messages in context)
        self.pending.append(FeedbackPair(turns, persona, tuple(chosen), tuple(rejected), source, int(time.time())))

    def flush(self) -> None:
        """Write the pairs gathered (called once the state they came with is saved)."""
        pending, self.pending = self.pending, []
        try:
            for pair in pending:
                assert self.feedback is not None  # nothing is gathered without it
                record(self.feedback, pair)
        except OSError as exc:  # the bot goes on: the replies matter more than the record of them
            log.warning("cannot write %s (%s): what you did with a draft is not recorded", self.feedback,
                        exc.strerror or exc)

    def not_drafted(self, chat: Chat, said: list[str], exc: ChatError) -> None:
        """Tell the owner that `said`, the contact's newest messages, got no suggested reply, and why."""
        control_id = self.state.connections[chat.business or ""]["chat"]
        name = chat.contact.get("name") or chat.user
        if isinstance(exc, ContextTooLong):
            one = len(said) == 1
            note = (f"({'a message' if one else f'{len(said)} messages'} from {name} {'was' if one else 'were'} too "
                    f"long to draft ({sum(len(m) for m in said):,} characters); answer {'it' if one else 'them'} "
                    "yourself)")
        else:
            note = f"(no reply suggested to {name}: {exc})"
        self._say(str(control_id), self._chat(str(control_id), control_id), note)

    def _chat(self, key: str, chat_id: int, business: str | None = None) -> Chat:
        return self.state.chats.setdefault(key, Chat(chat_id, business))

    def _say(self, key: str, chat: Chat, text: str) -> None:
        self._do(key, chat, {"op": "send", "chat_id": chat.chat_id, "text": text})

    def _do(self, key: str, chat: Chat, op: Op) -> None:
        chat.outbox.append(op)
        self.wake(key, False)
