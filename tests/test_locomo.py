"""`doppel bench recall --locomo`: a LoCoMo-shaped conversation written here (LoCoMo's own data is not the project's)
read, prepared and asked, with the exact evidence recall of each retrieval; a file that is not one, one line."""

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import MAX, dialogue, full_export, personal

from doppel.cli import main
from doppel.errors import ExportError
from doppel.evaluation import locomo


def _turns(session: int, turns: list[tuple[str, str]]) -> list[dict]:
    return [{"speaker": speaker, "dia_id": f"D{session}:{i}", "text": text} for i, (speaker, text) in
            enumerate(turns, 1)]


def conversation() -> dict:
    """Two sessions (of eight entries: a long turn, or two short ones, each), and questions of every category."""
    first = _turns(1, [
        ("Ada", "Guess what, I adopted a kitten yesterday! Her name is Pixel and she is grey with white paws."),
        ("Ben", "No way, congratulations! Where did you find her?"),
        ("Ada", "At the shelter on Maple Street, they had a whole litter of them looking for homes."),
        ("Ben", "I started pottery classes last week, my first bowl came out lopsided but I love it."),
        ("Ada", "That sounds like fun, you should bring it to the picnic in June."),
        ("Ben", "Maybe! My teacher says I'm a natural at the wheel, which I doubt."),
        ("Ada", "Anyway I have to run, my sister Clara is visiting from Lisbon tonight."),
        ("Ben", "Say hi to her, talk soon!")])
    second = _turns(2, [
        ("Ben", "How is Pixel settling in?"),
        ("Ada", "She knocked my plant off the shelf this morning, but she sleeps on my feet every night."),
        ("Ben", "Ha, classic kitten. I finished my second pottery piece, a mug for my dad."),
        ("Ada", "Your dad will love it. Clara flew back to Lisbon on Sunday.")])
    second[2]["blip_caption"] = "a photo of a blue ceramic mug"
    second[2]["img_url"] = ["https://example.com/mug.jpg"]
    qa = [("What is the name of Ada's kitten?", ["D1:1"], 4),
          ("What colour is the mug Ben made?", ["D2:3"], 4),
          ("What pottery pieces has Ben made?", ["D1:4", "D2:3"], 1),
          ("Where did Ada find the pet that knocked her plant off the shelf?", ["D1:3", "D:2:2"], 1),
          ("When did Clara fly back to Lisbon?", ["D2:4"], 2),
          ("Would Ada be considered an animal lover?", ["D1:1", "D1:99"], 3),  # D1:99 names no turn
          ("What is Ben's dog called?", ["D1:1"], 5),  # adversarial: not asked
          ("Who is Clara?", ["D"], 4)]  # no evidence that names a turn: not asked
    return {"speaker_a": "Ada", "speaker_b": "Ben",
            "session_1_date_time": "1:56 pm on 8 May, 2023", "session_1": first,
            "session_2_date_time": "10:03 am on 20 May, 2023", "session_2": second,
            "qa": [{"question": q, "answer": "…", "evidence": e, "category": c} for q, e, c in qa]}


@pytest.fixture
def conversation_file(tmp_path):
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(conversation()), encoding="utf-8")
    return path


def test_a_conversation_becomes_the_jsonl_readers_input(conversation_file, tmp_path):
    read = locomo.read(conversation_file)
    assert (read.owner, read.partner, len(read.turns), read.skipped) == ("Ada", "Ben", 12, 2)
    assert [(q.category, q.evidence) for q in read.questions] == [
        (4, ("D1:1",)), (4, ("D2:3",)), (1, ("D1:4", "D2:3")), (1, ("D1:3", "D2:2")), (2, ("D2:4",)), (3, ("D1:1",))]
    locomo.write_export(read, tmp_path / "export.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "export.jsonl").read_text().splitlines()]
    assert lines[:2] == [  # 8 May 2023 13:56 UTC, then 5 seconds later; the owner's messages say "me"
        {"chat": "Ben", "sender": "Ada", "time": 1683554160, "text": read.turns[0].text, "me": True},
        {"chat": "Ben", "sender": "Ben", "time": 1683554165, "text": read.turns[1].text}]
    assert read.turns[1] == locomo.Said("D1:2", "Ben", 1683554165, "No way, congratulations! Where did you find her?")
    assert lines[10] == {"chat": "Ben", "sender": "Ben", "time": 1684576990, "text": (
        "Ha, classic kitten. I finished my second pottery piece, a mug for my dad. [shares a photo of a blue ceramic "
        "mug]")}


def test_evidence_recall_of_each_retrieval(conversation_file):
    result = locomo.measure([conversation_file], budget=64, ks=(1, 2), chars=(150, 400))
    assert {k: v for k, v in result.items() if k != "recall"} == {
        "conversations": 1, "entries": 8, "block_tokens": 64, "evidence_in_index": "6/6",
        "questions": {"multi-hop": 2, "temporal": 1, "open-domain": 1, "single-hop": 2, "overall": 6}, "not_asked": 2}
    # per retrieval, per category: (@1, @2, 150 characters, 400 characters, the block of 64 tokens)
    figures = {name: {category: tuple(row.values()) for category, row in rows.items()}
               for name, rows in result["recall"].items()}
    assert figures == {
        "doppel": {"multi-hop": (0.25, 0.5, 0.25, 1.0, 0.25), "temporal": (1.0, 1.0, 1.0, 1.0, 1.0),
                   "open-domain": (1.0, 1.0, 1.0, 1.0, 1.0), "single-hop": (0.5, 1.0, 0.5, 1.0, 0.5),
                   "overall": (0.583, 0.833, 0.583, 1.0, 0.583)},
        "bm25": {"multi-hop": (0.25, 0.5, 0.25, 0.75, 0.25), "temporal": (1.0, 1.0, 1.0, 1.0, 1.0),
                 "open-domain": (1.0, 1.0, 1.0, 1.0, 1.0), "single-hop": (0.5, 1.0, 0.5, 1.0, 0.5),
                 "overall": (0.583, 0.833, 0.583, 0.917, 0.583)},
        "dense": {"multi-hop": (0.0, 0.5, 0.0, 0.5, 0.0), "temporal": (0.0, 0.0, 0.0, 0.0, 0.0),
                  "open-domain": (1.0, 1.0, 1.0, 1.0, 1.0), "single-hop": (0.5, 1.0, 0.5, 1.0, 0.5),
                  "overall": (0.333, 0.667, 0.333, 0.667, 0.333)}}
    assert list(result["recall"]["doppel"]["overall"]) == ["at_1", "at_2", "chars_150", "chars_400", "block"]


def test_the_matching_rule():
    assert locomo.holds(["I love  it", "Yes!"], "I love it")
    assert not locomo.holds(["Yes! I went there"], "Yes!")  # a line, not a piece of one
    assert locomo.holds(["a long line cut sh…"], "a long line cut short by the index")
    assert not locomo.holds(["a long line cut sh…"], "a long line")


def test_the_command_prints_the_table_and_writes_json(conversation_file, tmp_path):
    out = tmp_path / "figures.json"
    run = CliRunner().invoke(main, ["bench", "recall", "--locomo", str(conversation_file), "--json", str(out)])
    assert run.exit_code == 0, run.output
    figures = json.loads(out.read_text())
    assert sorted(figures) == ["locomo", "machine", "recall"]  # no --messages: no synthetic export timed
    assert figures["locomo"]["block_tokens"] == 256
    assert "LoCoMo evidence recall: 1 conversation, 6 questions, 8 entries, block 256 tokens" in run.output
    assert "│ overall     │         6 │ doppel    │" in run.output


def test_a_file_that_is_not_locomo_is_one_line(tmp_path, write):
    export = write(full_export([personal(MAX, dialogue())]))  # a Telegram export
    expected = (f"{export}: not a LoCoMo conversation (no 'speaker_a'); give one conversation per file, with "
                "speaker_a, speaker_b, session_N, session_N_date_time and qa")
    proc = subprocess.run([sys.executable, "-m", "doppel", "bench", "recall", "--locomo", str(export)],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"doppel: error: {expected}\n")
    (tmp_path / "latin1.json").write_bytes(b'{"speaker_a": "Ren\xe9"}')
    with pytest.raises(ExportError) as err:
        locomo.read(tmp_path / "latin1.json")
    assert str(err.value).startswith(f"{tmp_path / 'latin1.json'}: not a LoCoMo conversation (not UTF-8 text); ")
    data = conversation()
    data["session_2_date_time"] = "yesterday"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ExportError) as err:
        locomo.read(bad)
    assert str(err.value) == (f"{bad}: not a LoCoMo conversation (session_2_date_time is not a date like '1:56 pm on "
                              "8 May, 2023'); give one conversation per file, with speaker_a, speaker_b, session_N, "
                              "session_N_date_time and qa")


def test_bench_memory_is_the_old_name_hidden():
    runner = CliRunner()
    names = re.findall(r"^  (\S+) ", runner.invoke(main, ["bench", "--help"]).output, re.MULTILINE)
    assert "recall" in names and "memory" not in names
    old = runner.invoke(main, ["bench", "memory", "notes.json"])  # the same command, told that it is renamed
    assert old.exit_code == 2 and "the files are LoCoMo conversations: give them after --locomo" in old.output
    assert "DeprecationWarning: The command 'memory' is deprecated. Use doppel bench recall." in old.output
