"""The owner's corrections, RUN/feedback.jsonl: written by the bot's Send / Edit / Skip, by chat's /rewrite and by the
web page's endpoint, read back by the preference step; a damaged line is one clear line."""

import json
import logging
import shutil

import httpx
import pytest
from click.testing import CliRunner
from test_bot import (
    ANN,
    BOT,
    CONNECTION,
    EVE,
    MAX,
    OWNER,
    REPLY,
    FakeBotAPI,
    Running,
    business,
    config,
    state,
    tap,
    text,
    until,
)
from test_server import ASK, client, start

from doppel import feedback
from doppel.cli import main
from doppel.errors import RunError
from doppel.feedback import FeedbackPair
from doppel.records import Turn

ASKED = Turn("Max Orlov", "", ("yo", "gym later?"), False)
REPLIED = Turn("Me Owner", "", tuple(REPLY), False)


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
    """A copy of the memorised run: a bot with no state, and no feedback yet."""
    return shutil.copytree(memorised, tmp_path / "run", ignore=shutil.ignore_patterns("bot"))


def pairs(run):
    return feedback.read(run / "feedback.jsonl")


def mode(path):
    return path.stat().st_mode & 0o777


def owners_messages(*messages):
    """What the bot sent for the owner, back as the owner's messages from the bot: no one's new words."""
    return [business(OWNER, MAX, m, sender_business_bot=BOT) for m in messages]


# --- the file ---------------------------------------------------------------------------------------------------


def pair(n: int, source="chat") -> FeedbackPair:
    return FeedbackPair((ASKED,), "Me Owner", (f"ok {n}",), tuple(REPLY), source, 1_700_000_000 + n)


def test_pairs_are_appended_owner_readable_and_read_back(tmp_path):
    path = tmp_path / "feedback.jsonl"
    assert feedback.read(path) == []
    feedback.record(path, pair(1))
    feedback.record(path, FeedbackPair((), "Me Owner", tuple(REPLY), (), "bot-send", 5))
    assert mode(path) == 0o600
    assert feedback.read(path) == [pair(1), FeedbackPair((), "Me Owner", tuple(REPLY), (), "bot-send", 5)]
    assert path.read_text(encoding="utf-8").splitlines()[0] == (
        '{"context":[{"speaker":"Max Orlov","speaker_id":"","messages":["yo","gym later?"],"train":false}],'
        '"speaker":"Me Owner","chosen":["ok 1"],"rejected":["го))","в 7 🙂"],"source":"chat","time":1700000001}')


def test_a_cut_off_last_line_is_skipped_and_removed_by_the_next_record(tmp_path, caplog):
    path = tmp_path / "feedback.jsonl"
    for n in (1, 2):
        feedback.record(path, pair(n))
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:40])  # a crash in the middle of the third line
    with caplog.at_level(logging.WARNING):
        assert feedback.read(path) == [pair(1), pair(2)]
    assert caplog.messages == [f"{path}: 1 cut-off last line skipped (a crash while writing it)"]
    assert feedback.read_counting(path) == ([pair(1), pair(2)], 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        feedback.record(path, pair(3))
    assert caplog.messages == [f"{path}: its last line was cut off (40 bytes, a crash while writing it); removed"]
    assert feedback.read_counting(path) == ([pair(1), pair(2), pair(3)], 0)


GOOD = json.loads(feedback.msgspec.json.encode(pair(1)))


@pytest.mark.parametrize("line, why", [
    (b"not json", "JSON is malformed: invalid character (byte 4)"),
    (b'{"context": [], "speaker": "Me Owner", "chosen": ["ok"', "Input data was truncated"),
    (json.dumps({**GOOD, "chosen": "ok"}).encode(), "Expected `array`, got `str` - at `$.chosen`"),
    (json.dumps({**GOOD, "time": "now"}).encode(), "Expected `int`, got `str` - at `$.time`"),
    (json.dumps({**GOOD, "source": "email"}).encode(), "Invalid enum value 'email' - at `$.source`"),
    (json.dumps({**GOOD, "chosen": []}).encode(), "chosen must be one or more messages with text"),
    (json.dumps({**GOOD, "rejected": []}).encode(),
     "rejected is empty, which only a bot-send may be (this is a chat)"),
    (json.dumps({**GOOD, "context": [{"speaker": "Max Orlov"}]}).encode(),
     "Object missing required field `speaker_id` - at `$.context[0]`"),
    (json.dumps({**GOOD, "extra": 1}).encode(), "Object contains unknown field `extra`"),
])
def test_a_bad_line_is_one_line_naming_the_file_and_the_line(tmp_path, line, why):
    path = tmp_path / "feedback.jsonl"
    feedback.record(path, pair(1))
    path.write_bytes(path.read_bytes() + line + b"\n")
    feedback.record(path, pair(2))
    with pytest.raises(RunError) as error:
        feedback.read(path)
    assert str(error.value) == f"{path}, line 2: not a feedback pair ({why}); delete that line to go on"


# --- doppel bot --business --------------------------------------------------------------------------------------


def test_the_owners_send_edit_and_skip_land_in_feedback(api, run, loaded):
    api.push({"business_connection": CONNECTION}, business(MAX, MAX, "yo"), business(MAX, MAX, "gym later?"))
    bot = Running(run, config(api, business=True), loaded)
    until(lambda: len(api.sent(100)) == 2)
    api.push(tap("send:1", api.last_id(100)))  # Send: the draft was fine
    until(lambda: pairs(run))
    [sent] = pairs(run)
    assert (sent.context, sent.speaker, sent.chosen, sent.rejected, sent.source) == (
        (ASKED,), "Me Owner", tuple(REPLY), (), "bot-send")
    assert mode(run / "feedback.jsonl") == 0o600

    api.push(*owners_messages(*REPLY), business(MAX, MAX, "yo"))  # Edit: the owner's text preferred to the draft
    until(lambda: len(api.sent(100)) == 3)
    second = tuple(state(run)["drafts"]["2"]["messages"])
    assert api.sent(100)[2] == "Max Orlov:\nyo\n\nSuggested reply:\n" + "\n".join(second)
    api.push(tap("edit:2", api.last_id(100)))
    until(lambda: len(api.sent(100)) == 4)
    api.push(text(OWNER, "ok\nsee you at 7"))
    until(lambda: len(pairs(run)) == 2)
    edited = pairs(run)[1]
    yo = Turn("Max Orlov", "", ("yo",), False)
    assert (edited.context, edited.chosen, edited.rejected, edited.source) == (
        (ASKED, REPLIED, yo), ("ok", "see you at 7"), second, "bot-edit")

    api.push(*owners_messages("ok", "see you at 7"), business(MAX, MAX, "gym later?"))
    until(lambda: len(api.sent(100)) == 6)
    third = tuple(state(run)["drafts"]["3"]["messages"])
    api.push(tap("skip:3", api.last_id(100)), business(OWNER, MAX, "can't today"))  # Skip, then the owner's own words
    until(lambda: state(run)["drafts"]["3"].get("answer") == ["can't today"])
    bot.stop()
    assert len(pairs(run)) == 2  # the owner's turn is not over: it waits in the bot's state, across a restart
    bot = Running(run, config(api, business=True), loaded)
    api.push(business(OWNER, MAX, "tomorrow?"), business(MAX, MAX, "ok"))  # the contact's answer ends the turn
    until(lambda: len(pairs(run)) == 3)
    until(lambda: len(api.sent(100)) == 7)  # the contact's "ok" drafted
    bot.stop()
    skipped = pairs(run)[2]
    owner_edit = Turn("Me Owner", "", ("ok", "see you at 7"), False)
    assert (skipped.context, skipped.chosen, skipped.rejected, skipped.source) == (
        (ASKED, REPLIED, yo, owner_edit, Turn("Max Orlov", "", ("gym later?",), False)),
        ("can't today", "tomorrow?"), third, "bot-skip")
    drafts = state(run)["drafts"]
    assert [n for n, d in drafts.items() if "context" in d] == ["4"]  # kept only until what became of it is written


def test_nothing_is_recorded_outside_the_owners_business_chats(api, run, loaded):
    """Not for bot mode's conversations, not for a Business account that is not the owner's, not with
    --no-feedback."""
    api.push(text(MAX, "yo"))
    bot = Running(run, config(api, allow=("201",)), loaded)
    until(lambda: api.sent(201))
    bot.stop()
    others = {**CONNECTION, "id": "bc2", "user": ANN, "user_chat_id": 202}
    api.push({"business_connection": others}, business(MAX, MAX, "yo", business_connection_id="bc2"),
             text(EVE, "hi"))
    bot = Running(run, config(api, business=True), loaded)
    until(lambda: api.sent(999))
    bot.stop()
    assert not (run / "feedback.jsonl").exists() and state(run)["drafts"] == {}

    api.push({"business_connection": CONNECTION}, business(MAX, MAX, "yo"), business(MAX, MAX, "gym later?"))
    bot = Running(run, config(api, business=True, feedback=False), loaded)
    until(lambda: len(api.sent(100)) == 2)
    before = len(api.sent(201))  # bot mode's reply
    api.push(tap("send:1", api.last_id(100)))
    until(lambda: api.sent(201)[before:] == REPLY)
    bot.stop()
    assert not (run / "feedback.jsonl").exists() and "context" not in state(run)["drafts"]["1"]


# --- doppel chat --------------------------------------------------------------------------------------------------


def run_cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def said(result):
    """What chat told on stderr (its own lines, not the progress bars of loading the model)."""
    return [line for line in result.stderr.splitlines() if line.startswith(("doppel:", "("))]


def test_rewrite_puts_the_owners_words_in_place_of_the_reply(memorised):
    from doppel.config import Sampling
    from doppel.run import Run
    from doppel.serving.chat import Conversation

    model, tokenizer = Run(memorised).load()
    conversation = Conversation(model, tokenizer, "Me Owner", "Max Orlov", Sampling(temperature=0))
    assert conversation.reply(["yo", "gym later?"]).wait() == REPLY
    assert conversation.rewrite(["го", "в 8"]) == REPLIED
    conversation.add(["ok"])
    assert conversation.prompt() == ("<|im_start|>Max Orlov\n>>> yo\n>>> gym later?<|im_end|>\n"
                                     "<|im_start|>Me Owner\n>>> го\n>>> в 8<|im_end|>\n"
                                     "<|im_start|>Max Orlov\n>>> ok<|im_end|>\n<|im_start|>Me Owner\n")


def test_chat_rewrite_is_recorded_and_the_chat_goes_on(memorised, tmp_path):
    run = shutil.copytree(memorised, tmp_path / "run")
    script = "/rewrite too soon\n\nyo\ngym later?\n\n/rewrite го\nв 8 🙂\n\n/rewrite го\nв 8 🙂\n\nyo\n\n/quit\n"
    result = run_cli("chat", run, "--temperature", "0", input=script)
    assert result.exit_code == 0
    assert said(result) == [
        "doppel: nothing to rewrite: Me Owner has not answered the last turn",
        f"(Me Owner's last reply rewritten; recorded in {run / 'feedback.jsonl'})",
        "(Me Owner's last reply is already that; nothing recorded)"]
    assert result.stdout.startswith("Me Owner: го))\nMe Owner: в 7 🙂\n\nMe Owner: ")  # the chat went on
    [rewritten] = pairs(run)
    assert (rewritten.context, rewritten.speaker, rewritten.chosen, rewritten.rejected, rewritten.source) == (
        (ASKED,), "Me Owner", ("го", "в 8 🙂"), tuple(REPLY), "chat")
    assert mode(run / "feedback.jsonl") == 0o600

    off = run_cli("chat", run, "--temperature", "0", "--no-feedback", input="yo\ngym later?\n\n/rewrite го\n\n")
    assert said(off) == ["(Me Owner's last reply rewritten; not recorded: --no-feedback, or no trained run)"]
    assert len(pairs(run)) == 1


# --- doppel serve and the web page ------------------------------------------------------------------------------

KEY = {"Authorization": "Bearer s3cret"}
REPLIED_MESSAGES = [*ASK, {"role": "assistant", "content": "\n".join(REPLY)}]


@pytest.fixture(scope="module")
def served(memorised, tmp_path_factory):
    """`doppel serve` of a copy of the memorised run, as a real process: (url, its run)."""
    run = shutil.copytree(memorised, tmp_path_factory.mktemp("served") / "run")
    proc, url = start(run)
    yield url, run
    proc.terminate()
    proc.wait(timeout=30)


def test_the_feedback_endpoint_records_a_rewrite(served):
    url, run = served
    ask = {"model": "Me Owner", "messages": REPLIED_MESSAGES, "content": "го\n\nв 8 🙂\n"}
    assert httpx.post(f"{url}/doppel/feedback", json=ask).status_code == 401  # the API's key, as /v1/ asks
    answer = httpx.post(f"{url}/doppel/feedback", json=ask, headers=KEY)
    assert (answer.status_code, answer.json()) == (200, {"object": "doppel.feedback", "recorded": True,
                                                        "chosen": ["го", "в 8 🙂"], "rejected": REPLY})
    [rewritten] = pairs(run)
    assert (rewritten.context, rewritten.speaker, rewritten.chosen, rewritten.rejected, rewritten.source) == (
        (ASKED,), "Me Owner", ("го", "в 8 🙂"), tuple(REPLY), "page")
    assert mode(run / "feedback.jsonl") == 0o600
    same = httpx.post(f"{url}/doppel/feedback", json={**ask, "content": "\n".join(REPLY)}, headers=KEY).json()
    assert same["recorded"] is False and len(pairs(run)) == 1


@pytest.mark.parametrize("body, status, message", [
    ({"model": "Me Owner", "messages": ASK, "content": "го"}, 400,
     "The last message must be the persona's reply (role assistant) to rewrite"),
    ({"model": "Me Owner", "messages": REPLIED_MESSAGES, "content": " \n"}, 400,
     "content must hold the reply as you would write it, one message per line"),
    ({"model": "Nobody", "messages": REPLIED_MESSAGES, "content": "го"}, 404, "The model `Nobody` does not exist"),
    ({"model": "Me Owner", "messages": REPLIED_MESSAGES}, 400, "Invalid request: content: Field required"),
])
def test_the_feedback_endpoint_refuses_what_it_cannot_record(served, body, status, message):
    answer = httpx.post(f"{served[0]}/doppel/feedback", json=body, headers=KEY)
    assert (answer.status_code, answer.json()["error"]["message"]) == (status, message)


def test_a_form_posted_by_another_site_is_refused(served):
    """A page elsewhere can post a form to localhost without asking (no CORS preflight); only JSON is read."""
    url, run = served
    before = len(pairs(run))
    body = json.dumps({"model": "Me Owner", "messages": REPLIED_MESSAGES, "content": "го"})
    answer = httpx.post(f"{url}/doppel/feedback", content=body, headers={**KEY, "Content-Type": "text/plain"})
    assert (answer.status_code, answer.json()["error"]["message"]) == (
        400, "Invalid request: : Input should be a valid dictionary or object to extract fields from")
    assert len(pairs(run)) == before


def test_a_server_without_a_run_to_write_to_refuses_feedback(memorised):
    from doppel.run import Run

    model, tokenizer = Run(memorised).load()
    answer = client((model.eval(), tokenizer)).post("/doppel/feedback", json={
        "model": "Me Owner", "messages": REPLIED_MESSAGES, "content": "го"})
    assert (answer.status_code, answer.json()["error"]) == (403, {
        "message": "This server records no feedback: it was started without a trained run, or with --no-feedback",
        "type": "invalid_request_error", "param": None, "code": "feedback_off"})


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright

    if shutil.which("chromium") is None:
        pytest.skip("no Chromium installed (make test installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page()
        page.goto(served[0])
        page.fill("#key", "s3cret")
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelectorAll('#persona option').length == 2")
        yield page
        browser.close()


@pytest.mark.browser
def test_web_page_rewrites_the_last_reply(page, served):
    run = served[1]
    before = len(pairs(run))
    page.fill("#user", "Max Orlov")
    page.fill("#text", "yo\ngym later?")
    page.click("#go")
    page.wait_for_selector("button.rewrite", timeout=60_000)
    said = page.locator(".turn:not(.me) .msg").all_inner_texts()
    page.click("button.rewrite")
    assert page.input_value(".rewriting textarea") == "\n".join(said)
    page.fill(".rewriting textarea", "го\nв 8 🙂")
    page.click(".rewriting .save")
    page.wait_for_selector(".turn:not(.me) .note")
    assert page.locator(".turn:not(.me) .msg").all_inner_texts() == ["го", "в 8 🙂"]
    assert page.inner_text(".note") == "rewritten by you (recorded)" and page.locator("button.rewrite").count() == 0
    assert page.evaluate("history[history.length - 1].content") == "го\nв 8 🙂"
    recorded = pairs(run)[before:]
    assert [(p.context, p.chosen, p.rejected, p.source) for p in recorded] == [
        ((ASKED,), ("го", "в 8 🙂"), tuple(said), "page")]
