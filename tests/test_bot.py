"""`doppel bot`: real updates through python-telegram-bot against a Bot API of the tests' own (FastAPI on a local
port), answered by the memorised model."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from doppel.bot.intake import REFUSAL
from doppel.cli import main
from doppel.config import BotConfig, Sampling

TOKEN = "123456:TEST"
OWNER = {"id": 100, "is_bot": False, "first_name": "Me", "last_name": "Owner"}
MAX = {"id": 201, "is_bot": False, "first_name": "Max", "last_name": "Orlov", "username": "max_orlov"}
ANN = {"id": 202, "is_bot": False, "first_name": "Ann", "last_name": "Lee"}
EVE = {"id": 999, "is_bot": False, "first_name": "Eve", "username": "eve"}
BOT = {"id": 4242, "is_bot": True, "first_name": "Twin", "username": "twin_bot"}
REPLY = ["го))", "в 7 🙂"]
DRAFT = "Max Orlov:\nyo\ngym later?\n\nSuggested reply:\nго))\nв 7 🙂"
BUTTONS = {"inline_keyboard": [[{"text": label, "callback_data": f"{label.lower()}:1"}
                                for label in ("Send", "Edit", "Skip")]]}
CONNECTED = "(connected to your Business account: the replies I suggest will come here)"
JSON_PARAMS = {"reply_markup", "allowed_updates"}
INT_PARAMS = {"chat_id", "offset", "timeout", "message_id"}


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    outcome: str  # "ok", "hung", or the error code given
    at: float
    result: Any = None


class FakeBotAPI:
    """The Bot API as python-telegram-bot sees it: getUpdates serves `push`ed updates (long polling, offsets as
    Telegram keeps them), every other call is recorded in `calls` and answered like Telegram would. `script` gives a
    method's next answers instead: an error body (429 and its retry_after…) or "hang" (no answer until the end)."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []
        self.calls: list[Call] = []
        self.offsets: list[int] = []  # of every getUpdates, in order
        self.script: dict[str, list[Any]] = {}
        self.bad_tokens: set[str] = set()
        self.connections: dict[str, dict[str, Any]] = {}
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.message_id = 1000
        app = FastAPI()
        app.add_api_route("/bot{token}/{method}", self.handle, methods=["POST"])
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/bot"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        until(lambda: self.server.started)

    def close(self) -> None:
        self.released.set()
        self.server.should_exit = True
        self.thread.join(10)

    def push(self, *updates: dict[str, Any]) -> None:
        with self.lock:
            for update in updates:
                self.updates.append({"update_id": len(self.updates) + 1, **update})

    def sent(self, chat_id: int) -> list[str]:
        """The texts Telegram took for `chat_id`, in order."""
        return [c.params["text"] for c in self.ok("sendMessage") if c.params["chat_id"] == chat_id]

    def last_id(self, chat_id: int) -> int:
        """The id of the newest message Telegram took for `chat_id`."""
        return [c for c in self.ok("sendMessage") if c.params["chat_id"] == chat_id][-1].result["message_id"]

    def ok(self, method: str) -> list[Call]:
        return [c for c in list(self.calls) if c.method == method and c.outcome == "ok"]

    async def handle(self, token: str, method: str, request: Request) -> JSONResponse:
        params: dict[str, Any] = dict(parse_qsl((await request.body()).decode()))
        for key in params.keys() & JSON_PARAMS:
            params[key] = json.loads(params[key])
        for key in params.keys() & INT_PARAMS:
            params[key] = int(params[key])
        if token in self.bad_tokens:
            return JSONResponse({"ok": False, "error_code": 401, "description": "Unauthorized"}, 401)
        with self.lock:
            special = self.script[method].pop(0) if self.script.get(method) else None  # None: answered as usual
        if special == "hang":
            self.calls.append(Call(method, params, "hung", time.monotonic()))
            while not self.released.is_set():
                await asyncio.sleep(0.05)
            return JSONResponse({"ok": False, "error_code": 500, "description": "gone"}, 500)
        if special is not None:
            self.calls.append(Call(method, params, str(special["error_code"]), time.monotonic()))
            return JSONResponse(special, special["error_code"])
        result = await getattr(self, method)(params)
        if method != "getUpdates":
            self.calls.append(Call(method, params, "ok", time.monotonic(), result))
        return JSONResponse({"ok": True, "result": result})

    async def getMe(self, params: dict[str, Any]) -> dict[str, Any]:
        return BOT

    async def getUpdates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = params.get("offset", 0)
        self.offsets.append(offset)
        end = time.monotonic() + params.get("timeout", 0)
        while True:
            with self.lock:
                found = [u for u in self.updates if u["update_id"] >= offset]
            if found or time.monotonic() >= end:
                return found
            await asyncio.sleep(0.02)

    async def sendMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.message_id += 1
            number = self.message_id
        message = {"message_id": number, "date": int(time.time()), "from": BOT, "text": params["text"],
                   "chat": {"id": params["chat_id"], "type": "private"}}
        if "business_connection_id" in params:
            message["business_connection_id"] = params["business_connection_id"]
        return message

    async def editMessageText(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"message_id": params["message_id"], "date": int(time.time()), "from": BOT, "text": params["text"],
                "chat": {"id": params["chat_id"], "type": "private"}}

    async def sendChatAction(self, params: dict[str, Any]) -> bool:
        return True

    async def answerCallbackQuery(self, params: dict[str, Any]) -> bool:
        return True

    async def getBusinessConnection(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.connections[params["business_connection_id"]]


def until(condition: Callable[[], Any], timeout: float = 60) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def text(user: dict[str, Any], words: str, **extra: Any) -> dict[str, Any]:
    """A message update from `user` in their private chat with the bot."""
    return {"message": {"message_id": 1, "date": int(time.time()), "from": user, "text": words,
                        "chat": {"id": user["id"], "type": "private", "first_name": user["first_name"]}, **extra}}


def business(user: dict[str, Any], contact: dict[str, Any], words: str, **extra: Any) -> dict[str, Any]:
    """A message in the owner's private chat with `contact`, written by `user` (the contact, or the owner)."""
    chat = {"id": contact["id"], "type": "private", "first_name": contact["first_name"],
            "last_name": contact.get("last_name", "")}
    return {"business_message": {"message_id": 1, "date": int(time.time()), "from": user, "chat": chat,
                                 "text": words, "business_connection_id": "bc1", **extra}}


CONNECTION = {"id": "bc1", "user": OWNER, "user_chat_id": 100, "date": 1_700_000_000, "is_enabled": True,
              "rights": {"can_reply": True}}


def tap(data: str, message_id: int) -> dict[str, Any]:
    return {"callback_query": {"id": f"cq-{data}", "from": OWNER, "chat_instance": "1", "data": data,
                               "message": {"message_id": message_id, "date": int(time.time()), "from": BOT,
                                           "chat": {"id": 100, "type": "private"}, "text": "…"}}}


class Running:
    """`serve` in a thread of its own, as `doppel bot` runs it; `stop` cancels it as Ctrl-C does."""

    def __init__(self, run: Any, cfg: BotConfig, loaded: Any, token: str = TOKEN) -> None:
        from doppel.bot.telegram import serve
        from doppel.run import Run

        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(serve(Run.open(run), token, cfg, Sampling(temperature=0), loaded))
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(30)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def api():
    server = FakeBotAPI()
    yield server
    server.close()


@pytest.fixture(scope="module")
def loaded(memorised):
    from doppel.run import open_model

    return open_model(memorised)


@pytest.fixture
def run(memorised, tmp_path):
    """A copy of the memorised run, so that each test's bot starts with no state."""
    return shutil.copytree(memorised, tmp_path / "run", ignore=shutil.ignore_patterns("bot"))


def config(api: FakeBotAPI, **options: Any) -> BotConfig:
    return BotConfig(base_url=api.url, pace=0, gather=0, poll_timeout=1, **options)


def state(run: Any) -> dict[str, Any]:
    return json.loads((run / "bot" / f"bot{BOT['id']}.json").read_text(encoding="utf-8"))


def test_who_is_who(run):
    """The owner's Telegram account comes from the export; a user is the run's speaker of their Telegram id, else of
    their name, else the most active other speaker."""
    from doppel.bot.people import people_of
    from doppel.errors import BotError
    from doppel.run import Run

    run = Run.open(run)
    people = people_of(run, BotConfig(allow=("202", "@Max_Orlov")))
    assert (people.owner_name, people.persona, people.owner_id, people.telegram) == \
        ("Me Owner", "Me Owner", 100, ((100, "Me Owner"), (201, "Max Orlov")))
    assert [people.allowed(*who) for who in ((100, None), (202, None), (5, "max_orlov"), (201, "eve"))] == \
        [True, True, True, False]
    assert people.speaker(201, "Maxim O.", "Me Owner") == "Max Orlov"  # by id, whatever the name
    assert people.speaker(100, "", "Max Orlov") == "Me Owner"
    assert people.speaker(5, "ME OWNER", "Max Orlov") == "Me Owner"  # by name
    assert people.speaker(5, "Somebody", "Me Owner") == "Max Orlov"  # the most active other
    by_name = people_of(run, BotConfig(owner="@me_owner", business=True))
    assert (by_name.owner_id, by_name.is_owner(7, "Me_Owner"), by_name.is_owner(100, None)) == (None, True, False)
    stats = run.path / "dataset_stats.json"
    data = json.loads(stats.read_text(encoding="utf-8"))
    data["owner"]["id"] = "wa:me"  # an export that does not know the owner's Telegram account
    stats.write_text(json.dumps(data), encoding="utf-8")
    for cfg, line in [(BotConfig(), "nobody may talk with the bot: give --allow ID_OR_USERNAME (or --owner YOUR_ID)"),
                      (BotConfig(business=True), "business mode answers only your own account, and the export does "
                                                 "not say which it is: give --owner YOUR_ID"),
                      (BotConfig(allow=("201",), persona="Max Orlov"), "--persona Max Orlov is played only for you, "
                       "and the export does not say which Telegram account is yours: give --owner YOUR_ID")]:
        with pytest.raises(BotError) as caught:
            people_of(run, cfg)
        assert str(caught.value) == line


def test_an_allowed_user_gets_the_persona_and_a_stranger_one_refusal_ever(api, run, loaded):
    api.push(text(MAX, "yo"), text(MAX, "gym later?"), text(EVE, "hi"), text(EVE, "hello?"))
    bot = Running(run, config(api, allow=("@max_orlov",)), loaded)
    until(lambda: len(api.sent(201)) == 2 and api.offsets[-1] == 5)
    assert api.sent(201) == REPLY  # both messages of Max were one turn, answered by two messages
    calls = [c for c in api.calls if c.params.get("chat_id") == 201]
    assert (calls[0].method, calls[0].params["action"]) == ("sendChatAction", "typing")  # before the model wrote
    assert api.sent(999) == [REFUSAL]
    assert state(run)["chats"]["201"]["history"] == [["Max Orlov", ["yo", "gym later?"]], ["Me Owner", REPLY]]
    bot.stop()
    bot = Running(run, config(api, allow=("@max_orlov",)), loaded)  # a restart remembers who was refused
    api.push(text(EVE, "still nothing?"))
    until(lambda: api.offsets and api.offsets[-1] == 6)
    bot.stop()
    assert api.sent(999) == [REFUSAL] and api.sent(201) == REPLY and state(run)["refused"] == [999]
    folder = run / "bot"
    assert (folder.stat().st_mode & 0o777, (folder / "bot4242.json").stat().st_mode & 0o777) == (0o700, 0o600)
    assert [p.name for p in folder.iterdir()] == ["bot4242.json"]  # written atomically: no temporary file left


def test_pace_types_before_each_message_as_long_as_a_person_would(api, run, loaded):
    api.push(text(MAX, "yo"), text(MAX, "gym later?"))
    bot = Running(run, BotConfig(base_url=api.url, pace=0.2, gather=0, poll_timeout=1, allow=("201",)), loaded)
    until(lambda: len(api.sent(201)) == 2)
    bot.stop()
    calls = [c for c in api.calls if c.params.get("chat_id") == 201]
    assert [c.method for c in calls][-3:] == ["sendMessage", "sendChatAction", "sendMessage"]
    first, second = calls[-3], calls[-1]
    assert (first.params["text"], second.params["text"]) == tuple(REPLY)
    assert second.at - first.at >= 0.9  # 0.2 s a character of "в 7 🙂", "typing…" meanwhile


def test_commands_and_who_may_play_whom(api, run, loaded):
    """Another persona than the owner is played only for the owner; /persona is the owner's alone."""
    api.push(text(MAX, "/start"), text(MAX, "/persona Max Orlov"), text(MAX, "/as Ann"),
             text(MAX, "/as Me Owner"), text(MAX, "/as max orlov"), text(MAX, "/reset"), text(MAX, "/help"),
             text(MAX, "yo"), text(MAX, "gym later?"), text(OWNER, "/as Max Orlv"), text(OWNER, "/persona Max Orlov"))
    bot = Running(run, config(api, allow=("201",), persona="Me Owner"), loaded)
    until(lambda: len(api.sent(201)) == 9 and len(api.sent(100)) == 2)
    bot.stop()
    assert api.sent(201) == [
        "Hi! I am a language model that writes like Me Owner, trained on their chats; I am not Me Owner in person. "
        "You are Max Orlov to me: /as NAME to change that, /reset to start over.",
        "(only the bot's owner can change who answers)",
        "(unknown speaker 'Ann'; known: Me Owner, Max Orlov)",
        "(Me Owner is who answers; /as someone else)",
        "(you are Max Orlov now)",
        "(a new conversation)",
        "(commands: /reset, /as NAME)",
        *REPLY]
    assert api.sent(100) == ["(unknown speaker 'Max Orlv'; did you mean 'Max Orlov'?)",
                             "(Max Orlov answers now; you are Me Owner)"]
    chats = state(run)["chats"]
    assert (chats["201"]["persona"], chats["100"]["persona"], chats["100"]["user"]) == \
        ("Me Owner", "Max Orlov", "Me Owner")


def test_a_persona_other_than_the_owner_is_played_only_for_the_owner(api, run, loaded):
    api.push(text(MAX, "yo"), text(MAX, "gym later?"))
    bot = Running(run, config(api, allow=("201",), persona="Max Orlov"), loaded)
    until(lambda: len(api.sent(201)) == 2)
    bot.stop()
    assert api.sent(201) == REPLY  # Me Owner's words: Max is not played to anyone but the owner
    assert state(run)["chats"]["201"]["persona"] == "Me Owner"


def test_business_drafts_reach_the_contact_only_when_the_owner_taps_send(api, run, loaded):
    api.push({"business_connection": CONNECTION}, business(MAX, MAX, "yo"), business(MAX, MAX, "gym later?"))
    bot = Running(run, config(api, business=True), loaded)
    until(lambda: len(api.sent(100)) == 2)
    assert api.sent(100) == [CONNECTED, DRAFT]
    draft = api.ok("sendMessage")[-1]
    assert draft.params["reply_markup"] == BUTTONS
    assert [c for c in api.calls if c.params.get("chat_id") == 201] == []  # no message, no "typing…"

    api.push(tap("send:1", draft_id := api.last_id(100)))
    until(lambda: len(api.sent(201)) == 2 and api.ok("editMessageText"))
    assert api.sent(201) == REPLY
    assert {c.params["business_connection_id"] for c in api.ok("sendMessage") if c.params["chat_id"] == 201} == \
        {"bc1"}
    assert api.ok("answerCallbackQuery")[0].params == {"callback_query_id": "cq-send:1", "text": "sent"}
    assert api.ok("editMessageText")[0].params == {"chat_id": 100, "message_id": draft_id,
                                                   "text": DRAFT + "\n\n✓ sent"}
    # what the bot sent comes back as the owner's messages, from the bot: no one's new words; a second tap is late
    api.push(*(business(OWNER, MAX, m, sender_business_bot=BOT) for m in REPLY), tap("send:1", draft_id))
    until(lambda: len(api.ok("answerCallbackQuery")) == 2)
    assert api.ok("answerCallbackQuery")[1].params["text"] == "already done"

    api.push(business(MAX, MAX, "yo"))  # the owner corrects the next draft and sends it
    until(lambda: len(api.sent(100)) == 3)
    assert api.sent(100)[2].startswith("Max Orlov:\nyo\n\nSuggested reply:\n")
    api.push(tap("edit:2", api.last_id(100)))
    until(lambda: len(api.sent(100)) == 4)
    assert api.sent(100)[3] == "Write the reply to Max Orlov, one message per line:"
    api.push(text(OWNER, "ok\nsee you at 7"))
    until(lambda: len(api.sent(201)) == 4 and len(api.ok("editMessageText")) == 2)
    assert api.sent(201)[2:] == ["ok", "see you at 7"]
    assert api.sent(100)[4] == "(sent to Max Orlov)"
    assert api.ok("editMessageText")[1].params["text"].endswith("\n\n✓ sent as you wrote it")

    api.push(business(MAX, MAX, "gym later?"))  # a skipped draft sends nothing
    until(lambda: len(api.sent(100)) == 6)
    api.push(tap("skip:3", api.last_id(100)))
    until(lambda: len(api.ok("editMessageText")) == 3)
    bot.stop()
    assert api.ok("editMessageText")[2].params["text"].endswith("\n\n✗ skipped") and len(api.sent(201)) == 4
    assert state(run)["chats"]["bc1:201"]["history"][:3] == [
        ["Max Orlov", ["yo", "gym later?"]], ["Me Owner", REPLY], ["Max Orlov", ["yo"]]]


def test_auto_answers_allowed_contacts_with_the_marker_and_keeps_out_when_the_owner_writes(api, run, loaded):
    api.push({"business_connection": CONNECTION}, business(MAX, MAX, "yo"), business(MAX, MAX, "gym later?"),
             business(ANN, ANN, "yo"))
    bot = Running(run, config(api, business=True, auto=True, allow=("201",), marker="🤖 "), loaded)
    until(lambda: len(api.sent(201)) == 2 and len(api.sent(100)) == 2)
    assert api.sent(201) == ["🤖 " + m for m in REPLY]
    typing = next(c for c in api.calls if c.method == "sendChatAction")
    assert typing.params == {"chat_id": 201, "action": "typing", "business_connection_id": "bc1"}
    assert api.sent(100)[1].startswith("Ann Lee:\nyo\n\nSuggested reply:\n")  # Ann is not allowed: a draft

    api.push(business(OWNER, MAX, "back home, will write later"), business(MAX, MAX, "ok"))
    until(lambda: len(api.sent(100)) == 3)  # the owner wrote in this chat just now: a draft, not an answer
    bot.stop()
    assert api.sent(100)[2].startswith("Max Orlov:\nok\n\nSuggested reply:\n") and len(api.sent(201)) == 2
    assert state(run)["chats"]["bc1:201"]["history"] == [  # the owner's words join the turn before, the bot's
        ["Max Orlov", ["yo", "gym later?"]], ["Me Owner", [*REPLY, "back home, will write later"]],
        ["Max Orlov", ["ok"]]]


def test_flood_limits_are_waited_out(api, run, loaded):
    flood = {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
             "parameters": {"retry_after": 1}}
    api.script = {"getUpdates": [flood], "sendMessage": [flood]}
    api.push(text(MAX, "yo"), text(MAX, "gym later?"))
    bot = Running(run, config(api, allow=("201",)), loaded)
    until(lambda: len(api.sent(201)) == 2)
    bot.stop()
    assert api.sent(201) == REPLY  # once each
    sends = [c for c in api.calls if c.method == "sendMessage"]
    assert [(c.outcome, c.params["text"]) for c in sends] == [("429", "го))"), ("ok", "го))"), ("ok", "в 7 🙂")]
    assert sends[1].at - sends[0].at >= 1


def test_a_crash_mid_reply_and_a_restart_neither_repeat_nor_drop_a_message(api, run, loaded):
    api.script = {"sendMessage": [None, "hang"]}  # the first message goes, the second never gets an answer
    api.push(text(MAX, "yo"), text(MAX, "gym later?"))
    proc = start_bot(api, run, "--allow", "201")
    try:
        until(lambda: any(c.outcome == "hung" for c in api.calls) or proc.poll() is not None, timeout=120)
    finally:
        proc.kill()  # killed while Telegram holds the second message
    assert proc.wait() == -signal.SIGKILL, proc.communicate()[1]
    assert api.sent(201) == ["го))"] and state(run)["offset"] == 3
    bot = Running(run, config(api, allow=("201",)), loaded)
    until(lambda: len(api.sent(201)) == 2)
    assert api.sent(201) == REPLY and api.offsets[-1] == 3  # the rest of the reply, and no update twice
    api.push(text(MAX, "yo"))  # the conversation goes on where it was
    until(lambda: len(state(run)["chats"]["201"]["history"]) == 4 and not state(run)["chats"]["201"]["outbox"])
    bot.stop()
    history = state(run)["chats"]["201"]["history"]
    assert history[:3] == [["Max Orlov", ["yo", "gym later?"]], ["Me Owner", REPLY], ["Max Orlov", ["yo"]]]
    assert api.sent(201) == REPLY + history[3][1]


def start_bot(api: FakeBotAPI, run: Any, *args: str) -> subprocess.Popen:
    """`doppel bot RUN ARGS` as a real process, against `api`."""
    return subprocess.Popen([sys.executable, "-m", "doppel", "bot", str(run), "--base-url", api.url, "--poll-timeout",
                             "1", "--pace", "0", "--gather", "0", "--temperature", "0", *args],
                            env={**os.environ, "DOPPEL_BOT_TOKEN": TOKEN}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_refused_token_an_unreachable_api_and_bad_options_are_one_line(api, memorised):
    api.bad_tokens.add("999:BAD")

    def bot(*args: str) -> Any:
        return CliRunner().invoke(main, ["bot", str(memorised), *args], catch_exceptions=False)

    result = bot("--token", "999:BAD", "--base-url", api.url)
    assert (result.exit_code, result.output) == (
        2, "doppel: error: the Bot API refused the token; copy it again from @BotFather\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    result = bot("--token", TOKEN, "--base-url", f"http://127.0.0.1:{closed}/bot")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"doppel: error: cannot reach the Bot API at 127.0.0.1:{closed} (")
    assert TOKEN not in result.output
    api.script = {"getUpdates": [{"ok": False, "error_code": 409, "description": "Conflict: can't use getUpdates "
                                  "method while webhook is active; use deleteWebhook to delete the webhook first"}]}
    result = bot("--token", TOKEN, "--base-url", api.url, "--allow", "201")
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        2, "doppel: error: another program gets this bot's updates (a second doppel bot, or a webhook): stop it, or "
           "delete the webhook")
    for args, line in [(("--auto",), "auto answers business chats: give --business too"),
                       (("--allow", "max orlov"), "'max orlov' is neither a Telegram user id (digits) nor a @username"),
                       (("--business", "--auto", "--marker", " "),
                        "marker is empty: --auto would pass the model's messages off as yours"),
                       (("--persona", "Max Orlv"), "unknown persona 'Max Orlv'; did you mean 'Max Orlov'?")]:
        result = bot("--token", TOKEN, "--base-url", api.url, *args)
        assert (result.exit_code, result.output) == (2, f"doppel: error: {line}\n")
    result = CliRunner().invoke(main, ["bot", str(memorised)], env={"DOPPEL_BOT_TOKEN": ""})
    assert result.exit_code == 2 and "Missing option '--token'" in result.output


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_the_process_cleanly(api, run, stop):
    proc = start_bot(api, run, "--allow", "201")
    try:
        until(lambda: api.offsets or proc.poll() is not None, timeout=120)
        proc.send_signal(stop)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err.splitlines() == ["doppel: @twin_bot: Me Owner answers you and 201 (memory: 3 entries); Ctrl-C stops",
                                "doppel: stopped"]
