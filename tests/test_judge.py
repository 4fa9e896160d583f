"""The authorship judge and the bootstrap intervals of `doppel eval`."""

from __future__ import annotations

import random

import pytest

from doppel.evaluation import judge
from doppel.records import ChatRef, Session, Turn

CHAT = ChatRef(1, "friends", "private_group")
STYLES = {  # three people anyone would tell apart: the judge must too
    "Lena": (["ага", "го", "ну да", "ща буду", "ок", "давай", "не знаю", "круто"], lambda w: f"{w}))"),
    "Sophie": (["That sounds lovely", "See you on Saturday", "Thank you so much", "I will bring snacks",
                "Perfect timing", "Have a nice evening"], lambda w: f"{w}. 🙂"),
    "Max": (["yo", "lol", "bet", "nah", "wait what", "omg", "cant today", "im starving"], lambda w: w.upper()),
}


def _turns(rng: random.Random, speaker: str, count: int) -> list[Turn]:
    words, shape = STYLES[speaker]
    return [Turn(speaker, speaker, tuple(shape(rng.choice(words)) for _ in range(rng.randint(1, 3))), True)
            for _ in range(count)]


def _sessions(count: int, turns: int, seed: int = 0) -> list[Session]:
    rng = random.Random(seed)
    out = []
    for k in range(count):
        said = [t for name in STYLES for t in _turns(rng, name, turns)]
        rng.shuffle(said)
        out.append(Session(f"1:{k}", CHAT, k * 1000, k * 1000 + 60, tuple(said)))
    return out


@pytest.fixture(scope="module")
def trained() -> judge.Judge:
    found = judge.Judge.train(_sessions(10, 3))  # 30 training turns each
    assert found is not None
    return found


def test_the_judge_knows_the_speakers_with_enough_turns_and_tells_them_apart(trained):
    assert trained.speakers == ["Lena", "Max", "Sophie"]
    held_out = _sessions(4, 2, seed=1)
    for name in STYLES:
        turns = [t.messages for s in held_out for t in s.turns if t.speaker == name]
        assert judge.accuracy(trained, name, turns) == (8, 8)  # the ceiling: every real turn is theirs


def test_turns_written_by_hand_in_a_style_go_to_that_speaker(trained):
    assert trained.attribute([("ну что, идём))",), ("I found the book you mentioned. 🙂",), ("OK WAIT",)]) == [
        "Lena", "Sophie", "Max"]
    assert judge.confusion(trained, {"Lena": [("да))",), ("пока))",)], "Max": [("LOL",)], "Nobody": [("hi",)]}) == {
        "Lena": {"Lena": 2}, "Max": {"Max": 1}}


def test_no_judge_without_two_speakers_with_enough_turns():
    sessions = _sessions(10, 3)
    assert judge.Judge.train(sessions, min_turns=31) is None
    only_lena = [Session(s.id, s.chat, s.start, s.end, tuple(t for t in s.turns if t.speaker == "Lena"))
                 for s in sessions]
    assert judge.Judge.train(only_lena) is None


def test_the_bootstrap_interval_of_a_constant_is_a_point():
    assert judge.interval([0, 1, 2, 3], lambda draw: 0.25) == [0.25, 0.25]
    assert judge.interval([], lambda draw: 1.0) is None
    assert judge.interval([0, 1], lambda draw: None) is None


def test_the_bootstrap_interval_of_a_mean_is_around_it_and_repeatable():
    values = [0.0, 1.0] * 10  # sessions whose figure is 0 or 1: the mean is 0.5

    def mean(draw: list[int]) -> float:
        return sum(values[k] for k in draw) / len(draw)

    low, high = judge.interval(list(range(20)), mean, seed=3)
    assert 0.25 < low < 0.5 < high < 0.75
    assert judge.interval(list(range(20)), mean, seed=3) == [low, high]
    assert judge.within_noise([low - 0.5, high - 0.5]) and not judge.within_noise([0.1, 0.2])


def test_held_out_sessions_are_taken_from_every_chat_in_turn():
    from doppel.evaluation.evaluate import pick_sessions

    def chat(ident: int, count: int) -> list[Session]:
        return [Session(f"{ident}:{k}", ChatRef(ident, str(ident), None), k, k + 1, ()) for k in range(count)]

    sessions = chat(1, 5) + chat(2, 1) + chat(3, 2)
    assert [s.id for s in pick_sessions(sessions, 4)] == ["1:0", "1:1", "2:0", "3:0"]
    assert [s.id for s in pick_sessions(sessions, 20)] == [s.id for s in sessions]
