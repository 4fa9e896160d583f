"""`doppel serve`: the OpenAI-compatible API in-process and as a real process, and the web page in Chromium."""

import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

REPLY = "го))\nв 7 🙂"
ASK = [{"role": "user", "name": "Max Orlov", "content": "yo\ngym later?"}]


@pytest.fixture(scope="module")
def loaded(memorised):
    from doppel.models import load_run

    model, tokenizer, _ = load_run(memorised)
    return model.eval(), tokenizer


def client(loaded, api_key=None):
    from doppel.server import create_app

    return TestClient(create_app(*loaded, ["Me Owner", "Max Orlov"], "Max Orlov", api_key))


def test_models_and_a_plain_completion(loaded):
    api = client(loaded)
    assert [m["id"] for m in api.get("/v1/models").json()["data"]] == ["Me Owner", "Max Orlov"]
    body = api.post("/v1/chat/completions", json={"model": "Me Owner", "messages": ASK, "temperature": 0}).json()
    assert body["object"] == "chat.completion" and body["model"] == "Me Owner"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    tokens = [len(loaded[1](text, add_special_tokens=False)["input_ids"]) for text in (
        "<|im_start|>Max Orlov\n>>> yo\n>>> gym later?<|im_end|>\n<|im_start|>Me Owner\n",
        ">>> го))\n>>> в 7 🙂<|im_end|>")]
    assert [body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]] == tokens == [20, 12]
    stopped = api.post("/v1/chat/completions", json={"model": "Me Owner", "messages": ASK, "temperature": 0,
                                                     "stop": ["7"], "frequency_penalty": 0.5}).json()
    assert stopped["choices"][0]["message"]["content"] == "го))\nв"  # unknown fields are ignored


def test_streaming_sends_one_chunk_per_message(loaded):
    with client(loaded).stream("POST", "/v1/chat/completions",
                               json={"model": "Me Owner", "messages": ASK, "temperature": 0, "stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [c["delta"].get("content") for c in chunks] == ["", "го))", "\nв 7 🙂", None]
    assert chunks[0]["delta"]["role"] == "assistant" and chunks[-1]["finish_reason"] == "stop"


def test_a_reply_cut_by_max_tokens_finishes_with_length(loaded):
    api = client(loaded)
    ask = {"model": "Me Owner", "messages": ASK, "temperature": 0, "max_tokens": 4}
    body = api.post("/v1/chat/completions", json=ask).json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
    assert body["choices"][0]["message"]["content"] == loaded[1].decode(
        loaded[1](">>> го))\n>>> в 7 🙂", add_special_tokens=False)["input_ids"][:4]).removeprefix(">>> ")
    with api.stream("POST", "/v1/chat/completions", json={**ask, "stream": True}) as r:
        events = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("request_body", "status", "error"), [
    ({"model": "Me Owner", "messages": ASK, "n": 2}, 400, {"message": "Only n=1 is supported", "param": "n"}),
    ({"model": "Nobody", "messages": ASK}, 404, {"message": "The model `Nobody` does not exist",
                                                 "code": "model_not_found"}),
    ({"model": "Me Owner", "messages": [{"role": "assistant", "content": "hi"}]}, 400,
     {"message": "The last message must be a user message with content"}),
    ({"model": "Me Owner", "messages": []}, 400, {"param": "messages"}),
    ({"model": "Me Owner", "messages": ASK, "temperature": 5}, 400, {"param": "temperature"}),
])
def test_bad_requests_get_openai_shaped_errors(loaded, request_body, status, error):
    response = client(loaded).post("/v1/chat/completions", json=request_body)
    assert response.status_code == status
    body = response.json()["error"]
    assert body["type"] == "invalid_request_error" and error.items() <= body.items()


def test_api_key(loaded):
    api = client(loaded, api_key="s3cret")
    assert api.get("/v1/models").status_code == 401
    assert api.get("/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == \
        "invalid_api_key"
    assert api.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert api.get("/").status_code == 200  # the page itself is public; it sends the key it is given


@pytest.fixture(scope="module")
def server(memorised):
    """`doppel serve` as a real process on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "doppel", "serve", str(memorised), "--port", str(port),
                             "--api-key", "s3cret"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail(proc.communicate()[1][-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_official_openai_client(server):
    import openai

    api = openai.OpenAI(base_url=f"{server}/v1", api_key="s3cret")
    assert [m.id for m in api.models.list()] == ["Me Owner", "Max Orlov"]
    answer = api.chat.completions.create(model="Me Owner", messages=ASK, temperature=0)
    assert answer.choices[0].message.content == REPLY
    stream = api.chat.completions.create(model="Me Owner", messages=ASK, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == REPLY
    with ThreadPoolExecutor(4) as pool:  # four clients at once, one model: all answered correctly
        answers = list(pool.map(lambda _: api.chat.completions.create(
            model="Me Owner", messages=ASK, temperature=0).choices[0].message.content, range(4)))
    assert answers == [REPLY] * 4
    with pytest.raises(openai.BadRequestError, match="Only n=1 is supported"):
        api.chat.completions.create(model="Me Owner", messages=ASK, n=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong").models.list()
    assert api.chat.completions.create(model="Me Owner", messages=ASK, temperature=0).choices[0].message.content \
        == REPLY  # still serving after the errors


@pytest.mark.browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium installed (make test installs it)")
def test_web_page_in_headless_chromium(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page()
        page.goto(server)
        page.fill("#key", "s3cret")
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.querySelectorAll('#persona option').length == 2")
        assert page.input_value("#persona") == "Me Owner"
        page.fill("#user", "Max Orlov")
        page.fill("#text", "yo\ngym later?")
        page.click("#go")
        page.wait_for_selector(".turn:not(.me) .msg", timeout=60_000)
        page.wait_for_function("!document.getElementById('go').disabled", timeout=60_000)
        assert page.locator(".turn.me .msg").all_inner_texts() == ["yo", "gym later?"]
        replies = page.locator(".turn:not(.me) .msg").all_inner_texts()
        assert len(replies) >= 1 and all(text.strip() for text in replies)
        assert page.inner_text("#error") == ""
        browser.close()


def test_serve_refuses_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "doppel", "serve", str(tmp_path / "nope")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"doppel: error: {tmp_path / 'nope'}: no such run or model directory\n"


def test_serve_says_when_the_port_is_taken(memorised):
    """Before the model loads: a port another program listens on, and one that cannot exist."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "doppel", "serve", str(memorised), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (2, f"doppel: error: cannot listen on 127.0.0.1:{port}: Address "
                                                 "already in use\n")
    proc = subprocess.run([sys.executable, "-m", "doppel", "serve", "--port", "70000"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == \
        "Error: Invalid value for '--port': 70000 is not in the range 1<=x<=65535."
