"""Memory: the index prepare writes, exact retrieval, no leakage, the block in training and chat, --remember."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from doppel.dataset import Dataset
from doppel.memory.index import Memory, build, entries_of
from doppel.memory.recall import Recall, for_sessions, recall_turns
from doppel.memory.text import keywords
from doppel.records import ChatRef, Session, Turn
from doppel.render import IGNORE, memory_ids, memory_segments

CHAT = ChatRef(1, "Max Orlov", "personal_chat")
OTHER = ChatRef(2, "Ann Lee", "personal_chat")


def session(sid: str, start: int, *lines: tuple[str, str], chat: ChatRef = CHAT) -> Session:
    turns = tuple(Turn(who, who, (text,), True) for who, text in lines)
    return Session(sid, chat, start, start + 60, turns)


FACTS = [
    session("cat", 100, ("Max", "у меня кот Персик заболел"), ("Me", "ой(( вези к ветеринару")),
    session("trip", 200, ("Max", "we fly to Lisbon on the 12th"), ("Me", "ура))")),
    session("thesis", 300, ("Ann", "the thesis is due March 3"), ("Me", "good luck!"), chat=OTHER),
    session("gym", 400, ("Max", "gym later?"), ("Me", "го))")),
]


@pytest.fixture(scope="module")
def memory(tmp_path_factory) -> Memory:
    folder = tmp_path_factory.mktemp("memory")
    built = build(((s, "train") for s in FACTS), folder)
    assert (built.entries, built.embedded, built.reused) == (4, 4, 0)
    return Memory.open(folder)


def test_keywords_are_stemmed_in_each_script_and_skip_stop_words():
    assert keywords("Как там кота? Is the CAT running") == ["кот", "cat", "run"]
    assert keywords("котом") == keywords("кот") == ["кот"]


def test_exact_retrieval_by_meaning_and_by_keywords(memory):
    def ids(query: str, **kw) -> list[str]:
        return [e.id for e in memory.search(query, **kw)]

    assert ids("how is your cat Persik?")[0] == "cat"  # across languages: the vectors
    assert ids("как там кота лечат?")[0] == "cat"  # another form of the word: the stems
    assert ids("когда летите в Лиссабон?")[0] == "trip"
    assert ids("when is the thesis due?")[0] == "thesis"
    # only sessions that ended before, of the splits asked, not excluded
    assert ids("how is your cat Persik?", before=261) == ["cat", "trip"]
    assert ids("how is your cat Persik?", before=100) == []
    assert ids("how is your cat Persik?", exclude={"cat"}) == ["gym", "thesis", "trip"]
    assert ids("how is your cat Persik?", splits={"eval"}) == []


def test_the_same_people_come_first_among_equals(memory):
    assert [e.id for e in memory.search("hello")] == ["gym", "trip", "cat", "thesis"]
    assert [e.id for e in memory.search("hello", people={"Ann", "Me"})] == ["gym", "thesis", "trip", "cat"]


def test_a_long_session_is_remembered_in_windows():
    long = session("long", 0, *[("Max", f"message number {i} " + "x" * 90) for i in range(12)])
    windows = entries_of(long, "train")
    assert [(e.id, len(e.lines)) for e in windows] == [("long#0", 4), ("long#1", 4), ("long#2", 4)]
    assert all(e.session == "long" and e.start == 0 and e.end == 60 for e in windows)


def test_training_never_recalls_itself_a_later_session_or_a_held_out_one(sample_data, smollm2_tokenizer):
    dataset = Dataset.open(sample_data)
    memory = Memory.open(dataset.memory_path)
    train = list(dataset.sessions("train"))
    ends = {e.session: (e.end, e.split) for e in memory.entries}
    blocks = for_sessions(memory, train, smollm2_tokenizer, 128, {"train"})
    recalled = 0
    for s, (ids, entries) in zip(train, blocks, strict=True):
        assert ids == memory_ids(smollm2_tokenizer, entries) and len(ids) <= 128
        for entry in entries:
            assert entry.session != s.id and ends[entry.session] == (entry.end, "train") and entry.end < s.start
            recalled += 1
    assert recalled > len(train)  # nearly every session recalls one or two earlier ones


def test_the_memory_block_is_never_a_training_target(sample_data, smollm2_tokenizer):
    from doppel.training.packing import tokenized

    dataset = Dataset.open(sample_data)
    memory = Memory.open(dataset.memory_path)
    rows = tokenized(dataset, "train", smollm2_tokenizer, 256, memory, 128)
    start, end = (smollm2_tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    header = smollm2_tokenizer("memory\n", add_special_tokens=False)["input_ids"]
    opened = 0
    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
        if ids[1:1 + len(header)] == header:
            opened += 1
            close = ids.index(end)
            assert ids[0] == start and set(labels[:close + 2]) == {IGNORE}  # the block and its line break
    assert opened >= len(rows) // 2


def test_training_and_chat_render_the_same_block(sample_data, smollm2_tokenizer, tiny):
    from doppel.models import load_model
    from doppel.serving.chat import Conversation

    dataset = Dataset.open(sample_data)
    memory = Memory.open(dataset.memory_path)
    train = list(dataset.sessions("train"))
    first_eval = min(s.start for s in dataset.sessions("eval"))  # before it, every entry that ended is a training one
    target = next(s for s in train[10:] if len({t.speaker for t in s.turns}) == 2 and s.start < first_eval)
    ids, entries = for_sessions(memory, [target], smollm2_tokenizer, 128, {"train"})[0]
    assert entries
    persona, user = target.turns[1].speaker, target.turns[0].speaker
    chat = Conversation(load_model(str(tiny)), smollm2_tokenizer, persona, user, max_context=2048,
                        memory=Recall(memory, 128, before=target.start))
    chat.add(list(target.turns[0].messages))
    prompt, prompt_ids = chat.prompt(), chat.prompt_ids()
    block = "".join(piece for piece, _ in memory_segments(entries))
    assert chat.recalled == entries
    assert prompt.startswith(block) and prompt_ids[:len(ids)] == ids
    assert prompt.startswith("<|im_start|>memory\n")


def test_recall_turns_mention_a_rare_word_told_before(memory):
    later = session("later", 500, ("Me", "how's Persik? and Lisbon?"), ("Max", "Персик здоров"))
    other = session("other", 500, ("Me", "did the thesis go well?"), ("Ann", "yes"), chat=OTHER)
    fresh = session("fresh", 50, ("Me", "Персик?"), ("Max", "who?"))  # before anything was told
    assert recall_turns(memory, [later, other, fresh], rare_share=0.5) == {"later": {0, 1}, "other": {0}}


def test_remembered_conversations_persist_and_are_found_again(tmp_path):
    folder = tmp_path / "memory"
    build(((s, "train") for s in FACTS), folder)
    remembered = tmp_path / "run" / "remembered.jsonl"
    recall = Recall(Memory.open(folder, remembered), 128, remember=True)
    recall.keep([Turn("Max", "", ("my new bike is a red Bianchi",), False), Turn("Me", "", ("круто))",), False)])
    recall.keep([Turn("Max", "", ("my new bike is a red Bianchi",), False), Turn("Me", "", ("круто))",), False),
                 Turn("Max", "", ("rode it to Sintra",), False)])  # the same conversation, grown: replaced
    lines = remembered.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["lines"][-1] == ["Max", "rode it to Sintra"]
    # a new process: the saved index and the remembered file
    code = ("import sys; from pathlib import Path; from doppel.memory.index import Memory; "
            "m = Memory.open(Path(sys.argv[1]), Path(sys.argv[2])); "
            "print(len(m.entries), [e.split for e in m.search('what bike did you buy?')][:1])")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(remembered)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "5 ['remembered']"


def test_prepare_again_embeds_only_what_is_new(sample, tmp_path):
    from doppel.config import PrepareConfig
    from doppel.preparing.pipeline import prepare

    first = prepare(sample, tmp_path / "data", PrepareConfig())
    again = prepare(sample, tmp_path / "data", PrepareConfig())
    assert first.memory["entries"] == first.memory["embedded"] == 102
    assert (again.memory["embedded"], again.memory["reused"]) == (0, 102)
    assert prepare(sample, tmp_path / "data", PrepareConfig(memory=False)).memory == {}
    assert not (tmp_path / "data" / "memory").exists()


def test_a_missing_or_damaged_index_is_one_line(sample_data, tmp_path, tiny):
    import shutil

    from doppel.config import TrainConfig
    from doppel.training.train import train

    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    train(data, tmp_path / "run", TrainConfig(model=str(tiny), max_steps=1, max_length=256, save_steps=1000))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["memory"] == {"tokens": 64}
    doppel = [sys.executable, "-m", "doppel", "chat", str(tmp_path / "run"), "--max-new-tokens", "2"]
    out = subprocess.run(doppel, input="how's persik?\n\n/memory\n", capture_output=True, text=True)
    shown = out.stdout.split("\n\n", 1)[1]  # after the reply: what /memory printed
    assert out.returncode == 0 and shown.startswith("20") and " · " in shown.splitlines()[0]
    # --remember: the conversation is kept in the run and recalled by a later chat, another process
    told = subprocess.run([*doppel, "--remember"], input="my new bike is a red Bianchi\n", capture_output=True,
                          text=True)
    assert told.returncode == 0 and (tmp_path / "run" / "memory" / "remembered.jsonl").is_file()
    asked = subprocess.run(doppel, input="what bike did you get?\n\n/memory\n", capture_output=True, text=True)
    assert "Max Orlov: my new bike is a red Bianchi" in asked.stdout.split("\n\n", 1)[1]
    (data / "memory" / "vectors.npy").write_bytes(b"\x93NUMPY broken")
    out = subprocess.run(doppel, input="hey\n", capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"doppel: error: {data / 'memory'}: the memory index is damaged (")
    shutil.rmtree(data / "memory")
    out = subprocess.run(doppel, input="hey\n", capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr == (f"doppel: error: {data / 'memory'}: no memory index (the run's "
                                                  "dataset was moved, or prepared without memory); prepare it again, "
                                                  "or chat with --memory off\n")
    out = subprocess.run([*doppel, "--memory", "off"], input="hey\n", capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("\n") >= 1


def test_the_server_reports_what_it_recalled(sample_data, tiny, smollm2_tokenizer):
    from fastapi.testclient import TestClient

    from doppel.models import load_model
    from doppel.serving.server import create_app

    memory = Memory.open(Dataset.open(sample_data).memory_path)
    app = create_app(load_model(str(tiny)), smollm2_tokenizer, ["Max Orlov", "Lena Volkova"], "Lena Volkova",
                     memory=Recall(memory, 128))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        body = {"model": "Max Orlov", "max_tokens": 2,
                "messages": [{"role": "user", "name": "Lena Volkova", "content": "how's persik?"}]}
        answer = client.post("/v1/chat/completions", json=body).json()
        assert "doppel" in answer, answer
        recalled = answer["doppel"]["memory"]
        assert answer["object"] == "chat.completion" and 1 <= len(recalled) <= 4
        assert any("persik" in line["text"] for entry in recalled for line in entry["lines"])
        assert set(recalled[0]) == {"id", "chat", "speakers", "start", "end", "lines"}
        stream = client.post("/v1/chat/completions", json={**body, "stream": True}).text
        first = json.loads(stream.split("\n\n")[0].removeprefix("data: "))
        assert first["doppel"]["memory"] == recalled


def test_a_run_trained_without_memory_chats_as_before(sample_data, tmp_path, tiny):
    from doppel.config import TrainConfig
    from doppel.serving.chat import open_memory
    from doppel.training.train import train

    info = train(sample_data, tmp_path / "run", TrainConfig(model=str(tiny), max_steps=1, max_length=128,
                                                          save_steps=1000, memory="off"))
    assert info.memory_tokens is None and json.loads((tmp_path / "run" / "run.json").read_text())["memory"] is None
    assert open_memory(tmp_path / "run") is None  # auto: as it was trained
    assert open_memory(tmp_path / "run", "on") is not None  # asked for: the dataset's index, a quarter of 128
    out = subprocess.run([sys.executable, "-m", "doppel", "chat", str(tmp_path / "run"), "--max-new-tokens", "2"],
                         input="hey\n\n/memory\n", capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.endswith("\n(memory is off)\n")
