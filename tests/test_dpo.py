"""The preference step (`doppel train DATA -o RUN2 --from RUN --mode dpo`) with the tiny model and real TRL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from conftest import MAX, ME, full_export, msg, personal
from test_train import run_cli

from doppel import feedback
from doppel.config import PrepareConfig, TrainConfig
from doppel.dataset import Dataset
from doppel.engines import TransformersEngine
from doppel.evaluation import report
from doppel.memory.index import Memory
from doppel.readers.synthetic import write_export
from doppel.records import Turn
from doppel.render import IM_END, IM_START, header_name, segment_ids, turn_ids
from doppel.run import Run
from doppel.training import packing
from doppel.tuning import dpo, preferences

WORDS = ("alpaca", "banjo", "cactus", "dynamo", "elbow", "fjord", "gizmo", "hummus")  # one per session
MAX_LENGTH, MEMORY_TOKENS = 128, 48


def _export() -> dict[str, Any]:
    """Eight sessions a day apart with Max, each with its own rare word; the newest two are held out."""
    talk = []
    for k, word in enumerate(WORDS):
        t = 86_400 * k
        talk += [msg(10 * k + 1, t, MAX, f"{word} yo"), msg(10 * k + 2, t + 20, ME, f"го)) {word}"),
                 msg(10 * k + 3, t + 40, MAX, "ok"), msg(10 * k + 4, t + 60, ME, "в 7 🙂")]
    return full_export([personal(MAX, talk)])


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """A tiny LoRA run trained with memory blocks, and its dataset beside it (`data`)."""
    from doppel.preparing import pipeline
    from doppel.training.train import train

    folder = tmp_path_factory.mktemp("dpo")
    export = write_export(folder / "result.json", _export())
    pipeline.prepare(export, folder / "data", PrepareConfig(eval_fraction=0.25))
    train(folder / "data", folder / "sft", TrainConfig(model=str(tiny), max_steps=1, max_length=MAX_LENGTH,
                                                       batch_size=2, memory_tokens=MEMORY_TOKENS, logging_steps=1,
                                                       save_steps=1000))
    return folder / "sft"


EDIT = feedback.FeedbackPair((Turn("Max Orlov", "", ("alpaca?",), False),), "Me Owner", ("го))",), ("Sure thing!",),
                             "bot-edit", 1_700_000_000)
SEND = feedback.FeedbackPair((Turn("Max Orlov", "", ("ok",), False),), "Me Owner", ("в 7 🙂",), (), "bot-send",
                             1_700_000_100)


@pytest.fixture(scope="module")
def tuned(sft: Path) -> Path:
    """`doppel train data -o dpo --from sft --mode dpo --feedback FILE`, through the CLI."""
    corrections = sft.parent / "feedback.jsonl"
    feedback.record(corrections, EDIT)
    feedback.record(corrections, SEND)
    result = run_cli("train", sft.parent / "data", "-o", sft.parent / "dpo", "--from", sft, "--mode", "dpo",
                     "--feedback", corrections, "--max-steps", 2, "--batch-size", 2, "--logging-steps", 1)
    assert result.exit_code == 0, result.output
    kept = sum(p.dropped is None for p in _pairs(sft.parent / "dpo"))
    assert kept == 18  # the random model never writes the real turn
    assert result.output.strip().splitlines()[-3:] == [
        f"{kept + dpo.FEEDBACK_WEIGHT} preference pairs from 18 generated turns "
        f"(see {sft.parent / 'dpo' / 'preferences.jsonl'})",
        "trained 2 steps (0.1818 epochs), final train loss 0.6931",  # ln 2: the policy starts as the reference
        f"wrote {sft.parent / 'dpo'}"]
    return sft.parent / "dpo"


def _pairs(run: Path) -> list[preferences.Preference]:
    decoder = msgspec.json.Decoder(preferences.Preference)
    return [decoder.decode(line) for line in (run / preferences.PREFERENCES_FILE).read_bytes().splitlines()]


def _train_sessions(data: Path) -> dict[str, Any]:
    return {s.id: s for s in Dataset.open(data).sessions("train")}


def test_pairs_are_training_windows_where_only_the_rejected_turn_differs(tuned, smollm2_tokenizer):
    """Every pair's prompt and chosen turn are a training row's ids (memory block included) up to and through
    that turn's targets; the rejected side is the same prompt with the generated turn rendered as a turn is."""
    tok, data = smollm2_tokenizer, tuned.parent / "data"
    dataset = Dataset.open(data)
    sessions = _train_sessions(data)
    memory = Memory.open(dataset.memory_path)
    rows = packing.tokenized(dataset, "train", tok, MAX_LENGTH, memory, MEMORY_TOKENS)
    blocks = dict(zip(sessions, packing.memory_blocks(list(sessions.values()), "train", tok, memory, MEMORY_TOKENS),
                      strict=True))
    pairs = _pairs(tuned)
    # every trained turn that answers one, of the six training sessions, once each
    assert sorted((p.session, p.turn) for p in pairs) == sorted((s, i) for s in sessions for i in (1, 2, 3))
    assert sum(bool(blocks[p.session][p.turn]) for p in pairs) == 15  # all but the first session recall an earlier one
    im_end = tok.convert_tokens_to_ids(IM_END)
    for pair in pairs:
        session = sessions[pair.session]
        turn = session.turns[pair.turn]
        assert (pair.speaker, pair.chosen) == (turn.speaker, turn.messages)
        found = preferences.pair_ids(session, pair.turn, blocks[pair.session], pair.rejected, tok, MAX_LENGTH)
        assert found is not None
        ids, labels = turn_ids(tok, turn)
        assert found.chosen_ids == [i for i, label in zip(ids, labels, strict=True) if label != -100]
        assert found.chosen_ids[-1] == im_end and found.rejected_ids[-1] == im_end
        head = segment_ids(tok, IM_START) + segment_ids(tok, f"{header_name(turn.speaker)}\n")
        block = blocks[pair.session][pair.turn]  # the block chat recalls before that reply
        assert found.prompt_ids[:len(block)] == block
        assert found.prompt_ids[-len(head):] == head
        start, end = len(found.prompt_ids), len(found.prompt_ids) + len(found.chosen_ids)
        assert any(row["input_ids"][:end] == found.prompt_ids + found.chosen_ids
                   and row["labels"][start:end] == found.chosen_ids for row in rows)
        rejected = preferences.targets(*turn_ids(tok, Turn(turn.speaker, "", pair.rejected, True)))
        assert found.rejected_ids == rejected


def test_no_held_out_session_is_ever_used(tuned, smollm2_tokenizer):
    """Neither a pair nor any prompt's memory block comes from the eval split: its sessions' words never show."""
    dataset = Dataset.open(tuned.parent / "data")
    held_out = {s.id for s in dataset.sessions("eval")}
    assert len(held_out) == 2 and not held_out & {p.session for p in _pairs(tuned)}
    sessions = _train_sessions(tuned.parent / "data")
    memory = Memory.open(dataset.memory_path)
    blocks = packing.memory_blocks(list(sessions.values()), "train", smollm2_tokenizer, memory, MEMORY_TOKENS)
    said = "".join(smollm2_tokenizer.decode(b) for turns in blocks for b in turns)
    assert "alpaca" in said and "dynamo" in said  # earlier sessions are recalled …
    assert "gizmo" not in said and "hummus" not in said  # … the two held out never


class Counting:
    """The run's transformers engine, counting the turns it is asked to write."""

    def __init__(self, model: Any) -> None:
        self.engine = TransformersEngine(model)
        self.context = self.engine.context
        self.calls = 0

    def tokens(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.engine.tokens(*args, **kwargs)


def test_a_resumed_generation_makes_each_pair_once(sft, smollm2_tokenizer, tmp_path):
    sessions = _train_sessions(sft.parent / "data")
    chosen = preferences.contexts(list(sessions.values()), 3, seed=0)
    blocks: dict[str, Any] = {s: None for s in sessions}
    model, tok = Run.open(sft).load()
    path = tmp_path / preferences.PREFERENCES_FILE
    engine = Counting(model)
    first = preferences.make(path, engine, tok, chosen, sessions, blocks, MAX_LENGTH, 0)
    assert engine.calls == 3 and [(p.session, p.turn) for p in first] == [(s.id, i) for s, i in chosen]
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # stopped while writing the last line
    again = preferences.make(path, engine, tok, chosen, sessions, blocks, MAX_LENGTH, 0)
    assert engine.calls == 4  # only the cut line is made again …
    assert [p.rejected for p in again] == [p.rejected for p in first]  # … and, seeded per context, the same
    assert path.read_bytes().count(b"\n") == 3
    preferences.make(path, engine, tok, chosen, sessions, blocks, MAX_LENGTH, 0)
    assert engine.calls == 4 and path.read_bytes().count(b"\n") == 3  # a complete file: nothing new


def test_a_bad_preferences_line_is_one_line_and_exit_2(tuned, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    shutil.copyfile(tuned / "config.yaml", out / "config.yaml")
    good = (tuned / preferences.PREFERENCES_FILE).read_bytes().splitlines()[0]
    (out / preferences.PREFERENCES_FILE).write_bytes(good + b"\n{\"session\": 3}\n")
    result = run_cli("train", tuned.parent / "data", "-o", out, "--resume")
    assert (result.exit_code, result.output) == (2, (
        f"doppel: error: {out / preferences.PREFERENCES_FILE} line 2: not a preference pair (Expected `str`, got "
        "`int` - at `$.session`); delete the line, or the file to generate the pairs again\n"))


def test_stacking_two_adapters_gives_the_same_logits_as_applying_both(tiny):
    """`stack`: base + first + second adapter, at once, is the base with the first merged and the second on it."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    def randomized(model: Any, r: int, alpha: int, seed: int) -> Any:
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
        torch.manual_seed(seed)
        state = {k: torch.randn_like(v) * 0.05 for k, v in get_peft_model_state_dict(peft).items()}
        set_peft_model_state_dict(peft, state)
        return peft, state

    ids = torch.tensor([[5, 17, 300, 42, 7, 1000]])
    first, first_state = randomized(AutoModelForCausalLM.from_pretrained(tiny), 4, 8, 1)
    first_config = first.peft_config["default"].to_dict()
    second, second_state = randomized(first.merge_and_unload(), 2, 6, 2)
    with torch.no_grad():
        expected = second(ids).logits
    tensors, config = dpo.stack(first_state, first_config, second_state, 2, 6)
    assert (config["r"], config["lora_alpha"]) == (6, 6)
    stacked = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                             LoraConfig(r=6, lora_alpha=6, target_modules="all-linear"))
    set_peft_model_state_dict(stacked, tensors)
    with torch.no_grad():
        got = stacked(ids).logits
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, AutoModelForCausalLM.from_pretrained(
        tiny)(ids).logits, atol=1e-3)
    assert isinstance(stacked, PeftModel)


def test_the_tuned_run_is_a_normal_run(tuned, sft):
    run = Run.open(tuned)
    info = run.info
    assert (info.mode, info.from_run, info.steps, info.memory_tokens) == ("dpo", str(sft.resolve()), 2,
                                                                          MEMORY_TOKENS)
    assert info.plan["generated"] == 18 and info.plan["attention"] == "sdpa"
    adapter = json.loads((tuned / dpo.ADAPTER_CONFIG).read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (32, 32)  # the run's 16 and the preference step's 16
    model, _ = run.load()
    assert type(model).__name__ == "PeftModelForCausalLM"
    result = run_cli("chat", tuned, "--as", "Max Orlov", "--max-new-tokens", 4, "--seed", 0)
    assert result.exit_code == 0, result.output


def test_feedback_pairs_are_the_owners_text_against_the_draft(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    path = tmp_path / feedback.FEEDBACK_FILE
    feedback.record(path, EDIT)
    feedback.record(path, SEND)
    (pair,) = preferences.feedback_pairs(path, tok, None, MAX_LENGTH)  # a Send has nothing to prefer it over
    context = turn_ids(tok, Turn("Max Orlov", "", ("alpaca?",), False))[0]
    head = segment_ids(tok, IM_START) + segment_ids(tok, "Me Owner\n")
    assert pair.prompt_ids == context + head
    assert tok.decode(pair.chosen_ids) == ">>> го))<|im_end|>"
    assert tok.decode(pair.rejected_ids) == ">>> Sure thing!<|im_end|>"


def test_the_owners_corrections_count_feedback_weight_times(tuned):
    kept = sum(p.dropped is None for p in _pairs(tuned))
    assert Run.open(tuned).info.plan["pairs"] == kept + dpo.FEEDBACK_WEIGHT


@pytest.mark.parametrize(("args", "line"), [
    (["--mode", "dpo"], "mode dpo needs --from RUN: the finished run whose own turns it learns from"),
    (["--pairs", "3"], "from_run, pairs and feedback are options of mode dpo"),
    (["--mode", "dpo", "--from", "nowhere"], "--from nowhere: not a doppel run (no config.yaml)"),
])
def test_impossible_preference_settings_are_one_line_and_exit_2(sft, tmp_path, args, line):
    result = run_cli("train", sft.parent / "data", "-o", tmp_path / "run", *args)
    assert (result.exit_code, result.output) == (2, f"doppel: error: {line}\n")
    assert not (tmp_path / "run").exists()


def test_eval_against_the_sft_run_says_whether_the_step_helped(tuned, sft):
    result = run_cli("eval", tuned, "--compare", sft, "--max-sessions", 2, "--max-turns", 1, "--max-new-tokens", 4,
                     "--probe-turns", 1)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    # (stderr's "Loading weights" bar ends without a line end: the first line is glued to it)
    loss = next(line for line in lines if "Me Owner (you), held-out loss: " in line).split("Me Owner (you)")[1]
    loss = "Me Owner (you)" + loss
    assert loss.startswith(f"Me Owner (you), held-out loss: {sft} ") and f" → {tuned} " in loss
    assert lines[-2].startswith(f"against {sft}: ") and lines[-1] == f"wrote {tuned / 'eval'}"
    saved = json.loads((tuned / "eval" / "report.json").read_text())
    assert saved["compare"] == str(sft)
    assert f"In the tables, base is {sft} and tuned is {tuned}." in (tuned / "eval" / "report.md").read_text()


@pytest.mark.parametrize(("loss", "distance", "judged", "said"), [
    ([-0.2, -0.1], [-0.1, 0.05], [0.1, 0.3], "it helped (better: the owner's held-out loss, the judge's share; "
                                             "within noise: style distance)"),
    ([0.01, 0.05], [-0.1, 0.05], [-0.1, 0.2], "it did worse (worse: the owner's held-out loss; within noise: style "
                                              "distance, the judge's share)"),
    ([0.01, 0.05], [-0.3, -0.1], [-0.1, 0.2], "mixed (better: style distance; worse: the owner's held-out loss; "
                                              "within noise: the judge's share)"),
    ([-0.1, 0.1], [-0.1, 0.1], [-0.1, 0.1], "no difference outside the noise (within noise: the owner's held-out "
                                            "loss, style distance, the judge's share)"),
])
def test_the_verdict_counts_only_differences_outside_the_noise(loss, distance, judged, said):
    result = {"compare": "runs/me", "noise": {"owner_loss": loss, "style_distance": distance},
              "judge": {"difference_ci": judged}}
    assert report.verdict(result) == f"against runs/me: {said}"
