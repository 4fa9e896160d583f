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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import pytest
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

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
MAX_SESSIONS = ["201:21"]  # what a prompt of Max's recalls of the memorised run's sessions with him
ERROR_PAGE = ("Internal Server Error (500). Parsing the server response b'<html><body>" + "Internal error. " * 8
              + "…")  # cut at 200 characters
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
            special = self._scripted(method, params)
        if special == "hang":
            self.calls.append(Call(method, params, "hung", time.monotonic()))
            while not self.released.is_set():
                await asyncio.sleep(0.05)
            return JSONResponse({"ok": False, "error_code": 500, "description": "gone"}, 500)
        if special is not None:
            self.calls.append(Call(method, params, str(special["error_code"]), time.monotonic()))
            if "raw" in special:  # a body that is not JSON (a proxy's error page)
                return Response(special["raw"], special["error_code"], media_type="text/html")
            return JSONResponse(special, special["error_code"])
        result = await getattr(self, method)(params)
        if method != "getUpdates":
            self.calls.append(Call(method, params, "ok", time.monotonic(), result))
        return JSONResponse({"ok": True, "result": result})

    def _scripted(self, method: str, params: dict[str, Any]) -> Any:
        """The script's next answer to this call (None: answered as usual): its first entry that is for any chat, or
        for this call's chat (`only_chat`, left out of the answer)."""
        queue = self.script.get(method) or []
        for i, answer in enumerate(queue):
            if not isinstance(answer, dict) or answer.get("only_chat") in (None, params.get("chat_id")):
                del queue[i]
                return {k: v for k, v in answer.items() if k != "only_chat"} if isinstance(answer, dict) else answer
        return None

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
    until(lambda: len(api.sent(201)) == 4 and len(api.ok("editMessageText")) == 2 and len(api.sent(100)) == 5)
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


IMPOSTOR = {"id": 301, "is_bot": False, "first_name": "Max", "last_name": "Orlov"}  # Max's name, not his account


@pytest.fixture
def recalled(monkeypatch):
    """What each prompt of the bot's conversations recalled, in order: (the writer's speaker, the sessions)."""
    from doppel.bot import telegram
    from doppel.serving.chat import Conversation

    seen: list[tuple[str, list[str]]] = []

    class Recording(Conversation):
        def prompt_ids(self) -> list[int]:
            ids = super().prompt_ids()
            seen.append((self.user, [e.session for e in self.recalled]))
            return ids

    monkeypatch.setattr(telegram, "Conversation", Recording)
    return seen


def test_a_name_does_not_open_someone_elses_memory(api, run, loaded, recalled):
    """A user named like a contact plays that contact, but recalls nothing of theirs: in anyone's chat but the
    owner's, the memory holds only conversations among the Telegram ids of that chat, as the export has them."""
    api.push(text(IMPOSTOR, "yo"), text(IMPOSTOR, "gym later?"))
    bot = Running(run, config(api, allow=("201", "301")), loaded)
    until(lambda: recalled and not state(run)["chats"]["301"]["outbox"])
    api.push(text(MAX, "yo"), text(MAX, "gym later?"))
    until(lambda: len(api.sent(201)) == 2)
    bot.stop()
    assert recalled == [("Max Orlov", []), ("Max Orlov", MAX_SESSIONS)]
    assert api.sent(201) == REPLY and state(run)["chats"]["301"]["user"] == "Max Orlov"


def test_as_chooses_whom_the_writer_plays_not_whose_memory_they_read(api, run, loaded, recalled):
    api.push(text(ANN, "/as Max Orlov"), text(ANN, "yo"), text(ANN, "gym later?"))
    bot = Running(run, config(api, allow=("202",)), loaded)
    until(lambda: recalled and not state(run)["chats"]["202"]["outbox"])
    api.push(text(OWNER, "yo"))  # the owner's own chat recalls from every conversation
    until(lambda: len(recalled) == 2 and not state(run)["chats"]["100"]["outbox"])
    bot.stop()
    assert api.sent(202)[0] == "(you are Max Orlov now)"
    assert recalled == [("Max Orlov", []), ("Max Orlov", MAX_SESSIONS)]


def test_a_telegram_message_of_two_lines_is_one_message(api, run, loaded, monkeypatch):
    """The API's rule seen from the bot: a Telegram message is a message, its newline kept inside it, as a text part
    is through serve (tests/test_server.py) and a message is in training."""
    from doppel.bot import telegram
    from doppel.serving.chat import Conversation

    prompts: list[str] = []

    class Recording(Conversation):
        def prompt_ids(self) -> list[int]:
            prompts.append(self.prompt())
            return super().prompt_ids()

    monkeypatch.setattr(telegram, "Conversation", Recording)
    api.push(text(IMPOSTOR, "hey\nwhat's up?"))  # not Max's account: no memory in the prompt
    bot = Running(run, config(api, allow=("301",)), loaded)
    until(lambda: prompts and not state(run)["chats"]["301"]["outbox"])
    bot.stop()
    assert prompts[0] == "<|im_start|>Max Orlov\n>>> hey\nwhat's up?<|im_end|>\n<|im_start|>Me Owner\n"


def test_a_huge_flood_wait_is_cut_short_and_other_chats_go_on(api, run, loaded, monkeypatch, caplog):
    from doppel.bot import api as bot_api

    monkeypatch.setattr(bot_api, "MAX_FLOOD_WAIT", 2.0)  # an hour in `doppel bot`

    def flood(seconds: int) -> dict[str, Any]:
        return {"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {seconds}",
                "parameters": {"retry_after": seconds}, "only_chat": 201}

    api.script = {"sendMessage": [flood(10**16), flood(10**9)]}  # a timedelta overflows, and a wait of 31 years
    api.push(text(MAX, "yo"), text(MAX, "gym later?"), text(ANN, "yo"), text(ANN, "gym later?"))
    bot = Running(run, config(api, allow=("201", "202")), loaded)
    until(lambda: len(api.sent(201)) == 2)
    bot.stop()
    sends = [c for c in api.calls if c.method == "sendMessage" and c.params["chat_id"] == 201]
    assert [(c.outcome, c.params["text"]) for c in sends] == [("429", "го))"), ("429", "го))"), ("ok", "го))"),
                                                              ("ok", "в 7 🙂")]
    assert 2 <= sends[1].at - sends[0].at < 4 and 2 <= sends[2].at - sends[1].at < 4
    ann = [c for c in api.ok("sendMessage") if c.params["chat_id"] == 202]
    assert api.sent(202) == REPLY and ann[-1].at < sends[2].at  # served while Max's chat waited
    assert [r.getMessage() for r in caplog.records if r.name.startswith("doppel")] == [
        "the Bot API asks to wait 10000000000000000 s; waiting 2 s (the most doppel waits), then trying again",
        "the Bot API asks to wait 1000000000 s; waiting 2 s (the most doppel waits), then trying again"]


def test_a_crash_repeats_at_most_one_message_however_many_chats_are_active(api, run, loaded):
    """The outbox calls go to Telegram one at a time: a crash leaves at most one whose answer is unknown."""
    strangers = [{"id": 1000 + i, "is_bot": False, "first_name": f"Stranger {i}"} for i in range(30)]
    api.script = {"sendMessage": [None] * 10 + ["hang"] * 30}  # ten refusals go, then Telegram answers no more
    api.push(*(text(s, "hi") for s in strangers))
    proc = start_bot(api, run, "--allow", "201")
    try:
        until(lambda: any(c.outcome == "hung" for c in api.calls) or proc.poll() is not None, timeout=120)
        time.sleep(1)  # the other chats' refusals would be on their way by now
    finally:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL, proc.communicate()[1]
    hung = [c.params["chat_id"] for c in api.calls if c.outcome == "hung"]
    assert (len(api.ok("sendMessage")), len(hung)) == (10, 1)
    api.script = {}
    bot = Running(run, config(api, allow=("201",)), loaded)
    until(lambda: len(api.ok("sendMessage")) == 30)
    bot.stop()
    tries = Counter(c.params["chat_id"] for c in api.calls if c.method == "sendMessage")
    assert sorted(tries.values()) == [1] * 29 + [2] and tries[hung[0]] == 2  # the one unanswered, again
    assert [api.sent(s["id"]) for s in strangers] == [[REFUSAL]] * 30 and state(run)["refused"] == \
        [s["id"] for s in strangers]


def test_an_error_page_from_the_bot_api_is_one_warning_and_retried(api, run):
    page = {"error_code": 500, "raw": "<html><body>" + "Internal error. " * 40 + "</body></html>"}
    api.script = {"sendMessage": [page, page]}
    api.push(text(MAX, "yo"), text(MAX, "gym later?"))
    proc = start_bot(api, run, "--allow", "201")
    try:
        until(lambda: len(api.sent(201)) == 2 or proc.poll() is not None, timeout=120)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert api.sent(201) == REPLY
    sends = [c for c in api.calls if c.method == "sendMessage"]
    assert [c.outcome for c in sends] == ["500", "500", "ok", "ok"]
    assert sends[1].at - sends[0].at >= 1 and sends[2].at - sends[1].at >= 2  # a growing delay
    assert err.splitlines() == [
        "doppel: @twin_bot: Me Owner answers you and 201 (memory: 3 entries); Ctrl-C stops",
        f"doppel: warning: cannot reach the Bot API ({ERROR_PAGE}); trying again",
        "doppel: warning: the Bot API answers again",
        "doppel: stopped"]


def test_a_message_too_long_to_draft_is_told_to_the_owner(api, run, loaded):
    words = "yo " * 33_333 + "!"
    api.push({"business_connection": CONNECTION}, business(MAX, MAX, words))
    bot = Running(run, config(api, business=True), loaded)
    until(lambda: len(api.sent(100)) == 2)
    bot.stop()
    assert api.sent(100) == [
        CONNECTED, "(a message from Max Orlov was too long to draft (100,000 characters); answer it yourself)"]
    assert api.sent(201) == [] and state(run)["chats"]["bc1:201"]["inbox"] == []


GOOD_STATE = {"offset": 3, "refused": [], "chats": {}, "drafts": {}, "next_draft": 1, "editing": None,
              "connections": {}}
CHAT = {"chat_id": 201, "business": None, "persona": "Me Owner", "user": "Max Orlov", "contact": {"id": 201},
        "owner_at": 0.0, "history": [], "inbox": [], "outbox": []}


@pytest.mark.parametrize("damaged, why", [
    (b'{"offset": 3, "chats": {', "Input data was truncated"),
    (json.dumps({**GOOD_STATE, "chats": []}).encode(), "Expected `object`, got `array` - at `$.chats`"),
    (json.dumps({**GOOD_STATE, "offset": "3"}).encode(), "Expected `int`, got `str` - at `$.offset`"),
    (json.dumps([GOOD_STATE]).encode(), "Expected `object`, got `array`"),
    (json.dumps({**GOOD_STATE, "chats": {"201": {**CHAT, "inbox": [{"text": 5, "owner": False}]}}}).encode(),
     "Expected `str`, got `int` - at `$.chats[...].inbox[0].text`"),
    (json.dumps({**GOOD_STATE, "chats": {"201": {**CHAT, "history": [["Max Orlov"]]}}}).encode(),
     "Expected `array` of length 2 - at `$.chats[...].history[0]`"),
    (json.dumps({**GOOD_STATE, "chats": {"201": {**CHAT, "outbox": [{"op": "sned"}]}}}).encode(),
     "Invalid enum value 'sned' - at `$.chats[...].outbox[0].op`"),
    (json.dumps({**GOOD_STATE, "drafts": {"1": {"chat": "bc1:201", "control": "100", "name": "Max Orlov",
                                                "messages": [], "text": "", "status": "open", "message_id": None}}}
                ).encode(), "draft 1 names chat 'bc1:201', which is not in the file"),
    (json.dumps({k: v for k, v in GOOD_STATE.items() if k != "next_draft"}).encode(),
     "Object missing required field `next_draft`"),
])
def test_a_damaged_state_file_is_one_line_and_left_as_it_is(api, run, damaged, why):
    path = run / "bot" / "bot4242.json"
    path.parent.mkdir()
    path.write_bytes(damaged)
    done = subprocess.run([sys.executable, "-m", "doppel", "bot", str(run), "--base-url", api.url, "--allow", "201"],
                          env={**os.environ, "DOPPEL_BOT_TOKEN": TOKEN}, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (
        2, f"doppel: error: {path} is damaged ({why}); move it away to start over (replies not yet sent are lost "
           "then)\n")
    assert path.read_bytes() == damaged


def test_a_refused_getupdates_stops_the_bot_with_one_line(api, run):
    """Asking again would be refused again, as fast as Telegram answers: the bot stops instead."""
    api.script = {"getUpdates": [{"ok": False, "error_code": 400, "description": "Bad Request: wrong offset"}] * 3}
    done = subprocess.run([sys.executable, "-m", "doppel", "bot", str(run), "--base-url", api.url, "--allow", "201"],
                          env={**os.environ, "DOPPEL_BOT_TOKEN": TOKEN}, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        "doppel: @twin_bot: Me Owner answers you and 201 (memory: 3 entries); Ctrl-C stops",
        "doppel: warning: Telegram refused get_updates: Wrong offset",  # PTB capitalises it
        "doppel: error: the Bot API refuses getUpdates (the warning above says why)"])
    assert api.offsets == []  # the refused calls are not counted; none was asked again
