"""Telegram exports as other projects published them: single chats of every kind, old ids, missing ids, polls."""

import json

import pytest
from click.testing import CliRunner
from conftest import ANN, MAX, ME, T0, dialogue, full_export, msg, personal

from doppel.cli import main
from doppel.readers.synthetic import message


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


GROUP_TALK = [msg(1, 0, MAX, "who's in?"), msg(2, 5, ANN, "me"), msg(3, 9, MAX, "great")]


@pytest.mark.parametrize(("chat", "expected"), [
    ({"name": "Crew", "type": "private_supergroup", "id": 7, "messages": GROUP_TALK},
     "this export is the group 'Crew'; groups are used only with --include-groups"),
    ({"name": "WeatherBot", "type": "bot_chat", "id": 9, "messages": GROUP_TALK},
     "this export is a bot chat ('WeatherBot'), which is not used by default; --chat 'WeatherBot' uses it"),
    ({"name": "News", "type": "public_channel", "id": 8, "messages": GROUP_TALK},
     "this export is a channel ('News'), which is not used by default; --chat 'News' uses it"),
    ({"name": "Max", "type": "personal_chat", "id": MAX, "messages": []},
     "the chat 'Max' has no messages to learn from (none, or only ones prepare leaves out: service messages, "
     "media without a caption, forwards)"),
])
def test_a_single_chat_that_is_not_used_says_what_it_is(write, tmp_path, chat, expected):
    result = run("prepare", write(chat), "-o", tmp_path / "data")
    assert (result.exit_code, result.output) == (2, f"doppel: error: {expected}\n")
    assert not (tmp_path / "data").exists()


def test_a_single_group_export_is_used_with_include_groups_and_me(write, tmp_path):
    group = {"name": "Crew", "type": "private_supergroup", "id": 7, "messages": GROUP_TALK}
    result = run("prepare", write(group), "-o", tmp_path / "data", "--include-groups", "--me", "Ann Lee",
                 "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["owner"] == {"id": f"user{ANN}",
                                                                                  "name": "Ann Lee"}


def test_a_personal_chat_whose_peer_id_is_not_the_chat_id_is_told_by_its_name(write, tmp_path):
    # the chat's id is not any sender's (a converted or hand-made export): its name is the peer's first name
    talk = [msg(1, 0, ANN, "hi!"), msg(2, 5, ME, "hey)) how are you?"), msg(3, 9, ANN, "good")]
    chat = {"name": "Ann", "type": "personal_chat", "id": 555, "messages": talk}
    result = run("prepare", write(chat), "-o", tmp_path / "data", "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["owner"]["id"] == f"user{ME}"
    # with no name to go by, doppel asks rather than guesses
    unnamed = {**chat, "name": None}
    result = run("prepare", write(unnamed, "unnamed.json"), "-o", tmp_path / "other")
    assert result.exit_code == 2 and result.output == (
        "doppel: error: cannot tell which of the people of this personal chat is you; set me to your id or name, "
        f"one of: user{ANN} Ann Lee (2 messages); user{ME} Me Owner (1 messages)\n")


def test_me_must_name_someone_in_the_export(write, tmp_path):
    path = write(full_export([personal(MAX, dialogue())]))
    result = run("prepare", path, "-o", tmp_path / "data", "--me", "user999")
    assert result.exit_code == 2 and result.output == (
        f"doppel: error: me 'user999' is not a speaker in this export; one of: user{MAX} Max Orlov (2 messages); "
        f"user{ME} Me Owner (1 messages)\n")


def _old_export() -> dict:
    """Before v2.7.2: integer from_id, chat ids shifted by 2^32 (users) and 2^33 (chats and channels)."""
    def old(mid: int, ts: int, who: int, name: str, text: str, shift: int = 1 << 32) -> dict:
        out = message(mid, T0 + ts, who, name, text)
        out["from_id"] = who + shift
        return out

    talk = [old(1, 0, MAX, "Max Orlov", "yo"), old(2, 5, MAX, "Max Orlov", "gym later?"),
            old(3, 30, ME, "Me Owner", "го))")]
    channel = [old(4, 0, 1500, "News", "post one", 1 << 33), old(5, 5, ME, "Me Owner", "nice"),
               old(6, 9, 1500, "News", "post two", 1 << 33)]
    return full_export([{"name": "Max", "type": "personal_chat", "id": MAX + (1 << 32), "messages": talk},
                        {"name": "News", "type": "public_channel", "id": 1500 + (1 << 33), "messages": channel}],
                       owner=None)


def test_old_exports_accept_ids_as_the_file_shows_them(write, tmp_path):
    path = write(_old_export())
    shifted_max, shifted_me = MAX + (1 << 32), ME + (1 << 32)
    result = run("prepare", path, "-o", tmp_path / "data", "--chat", shifted_max, "--me", shifted_me,
                 "--train-on", shifted_me, "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    (session,) = read_jsonl(tmp_path / "data" / "sessions.train.jsonl")
    assert session["chat"]["id"] == MAX
    assert [(t["speaker_id"], t["train"]) for t in session["turns"]] == [(f"user{MAX}", False), (f"user{ME}", True)]
    # the channel's own posts are the channel's, as newer exports say
    result = run("prepare", path, "-o", tmp_path / "news", "--chat", "News", "--me", ME, "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    (post,) = read_jsonl(tmp_path / "news" / "sessions.train.jsonl")
    assert [t["speaker_id"] for t in post["turns"]] == ["channel1500", f"user{ME}", "channel1500"]


def test_messages_without_an_id_are_told_apart_by_name(write, tmp_path):
    talk = [msg(1, 0, MAX, "yo"), msg(2, 5, ME, "го))"), msg(3, 9, MAX, "ok")]
    for m in talk:
        del m["from_id"]
    talk[1]["from"] = "Me Owner"
    result = run("prepare", write(personal(MAX, talk)), "-o", tmp_path / "data", "--me", "Me Owner",
                 "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    (session,) = read_jsonl(tmp_path / "data" / "sessions.train.jsonl")
    assert [(t["speaker"], t["speaker_id"]) for t in session["turns"]] == [
        ("Max Orlov", "name:Max Orlov"), ("Me Owner", "name:Me Owner"), ("Max Orlov", "name:Max Orlov")]


def test_dropped_single_speaker_sessions_are_counted_in_messages(write, tmp_path):
    alone = [msg(1, 0, MAX, "one"), msg(2, 5, MAX, "two"), msg(3, 9, MAX, "three")]
    path = write(full_export([personal(MAX, alone + dialogue(start=90000, first_id=10))]))
    result = run("prepare", path, "-o", tmp_path / "data")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["dropped"] == {"single-speaker session": 3}


def test_saved_messages_are_named_and_poll_questions_kept(write, tmp_path):
    poll = msg(12, 20, ME, "", poll={"question": "Which crag on Sunday?", "closed": False, "total_voters": 0,
                                     "answers": [{"text": "Sintra", "voters": 0, "chosen": False}]})
    saved = {"type": "saved_messages", "id": ME,
             "messages": [msg(10, 0, ME, "note to self"), msg(11, 5, MAX, "a forward kept", forwarded_from="Max"),
                          poll]}
    path = write(full_export([saved]))
    result = run("prepare", path, "-o", tmp_path / "data", "--chat", "saved messages", "--keep-forwarded",
                 "--eval-fraction", "0")
    assert result.exit_code == 0, result.output
    (session,) = read_jsonl(tmp_path / "data" / "sessions.train.jsonl")
    assert session["chat"]["name"] == "Saved Messages"
    assert [t["messages"] for t in session["turns"]] == [["note to self"], ["a forward kept"],
                                                          ["Which crag on Sunday?"]]


def test_a_session_gap_beyond_a_year_says_the_limit(write, tmp_path):
    result = run("prepare", write(personal(MAX, dialogue())), "-o", tmp_path / "d", "--session-gap", 1000000)
    assert result.exit_code == 2 and result.output == (
        "doppel: error: session_gap must be a positive number of minutes, at most a year (525600), got 1e+06\n")


def test_bench_prepare_keep_creates_its_folder_and_measures_every_format(tmp_path):
    from doppel.bench import bench_prepare

    result = bench_prepare(2000, 4, tmp_path / "new" / "folder", ("telegram", "whatsapp", "discord"))
    assert sorted(p.name for p in (tmp_path / "new" / "folder").iterdir()) == [
        "Direct Messages - Friend 1.json", "WhatsApp Chat with Friend 1.txt", "result.json"]
    assert set(result) == {"telegram", "whatsapp", "discord"}
    assert "read_lines_s" in result["whatsapp"] and "json_load_s" in result["discord"]
    assert result["whatsapp"]["sessions"] > 100 and result["discord"]["sessions"] > 100
