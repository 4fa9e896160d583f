"""`doppel eval`: style measures, per-speaker masked loss, the report, tuned beating base."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from doppel.cli import main
from doppel.evaluation import style
from doppel.records import Session, Turn
from doppel.render import IGNORE, turn_ids


def test_style_measures_on_hand_made_turns():
    turns = [("привет))", "как дела?"), ("ok 🙂🙂",), ("Fine. Thanks!", "see you :)", "(yes)")]
    assert style.measure(turns) == {
        "messages_per_turn": 2.0,  # 6 messages in 3 turns
        "chars_per_message": 8.3333,  # 8 + 9 + 5 + 13 + 10 + 5 = 50 characters
        "question_rate": 0.1667,  # "как дела?"
        "emoji_rate": 0.3333,  # two emoji in six messages
        "bracket_smiley_rate": 0.1667,  # "привет))"; not ":)", not "(yes)"
        "lowercase_start_rate": 0.8333,  # п к o s y lowercase, F not
        "final_punctuation_rate": 0.3333,  # "?" and "!"
        "cyrillic_share": 0.3824,  # 13 Cyrillic letters of 34
        "latin_share": 0.6176,  # 21 Latin letters of 34
    }
    assert style.measure([]) == dict.fromkeys(style.MEASURES, 0.0)
    assert style.vocabulary_overlap([("Hi there",)], [("hi you",)]) == pytest.approx(1 / 3, abs=1e-4)


def test_distance_is_zero_for_the_same_style_and_grows_with_differences():
    real = style.measure([("го))",), ("да", "ок))")])
    assert style.distance(real, real, 1.0) == 0.0
    other = style.measure([("Hello, how are you doing today?",)])
    assert 0.5 < style.distance(real, other, 0.0) <= 1.0


def test_per_speaker_loss_is_the_masked_loss_by_hand(tiny, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    from doppel.evaluation.evaluate import speaker_losses

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    session = Session("1:1", {"id": 1, "name": "Max", "type": "personal_chat"}, 0, 9, (
        Turn("Max Orlov", "u1", ("yo", "gym later?"), True), Turn("Lena Volkova", "u2", ("го))",), True),
        Turn("Max Orlov", "u1", ("ok",), True)))
    losses = speaker_losses(model, smollm2_tokenizer, [session], 1024)
    pieces = [turn_ids(smollm2_tokenizer, t) for t in session.turns]
    ids = [i for p in pieces for i in p[0]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    for speaker in ("Max Orlov", "Lena Volkova"):
        labels = [lab if t.speaker == speaker else IGNORE for p, t in zip(pieces, session.turns, strict=True)
                  for lab in p[1]]
        target = torch.tensor(labels[1:])
        expected = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum").item()
        assert losses[speaker][0] == pytest.approx(expected, rel=1e-5)
        assert losses[speaker][1] == int((target != IGNORE).sum())
    assert losses["Lena Volkova"][1] == len(smollm2_tokenizer(">>> го))<|im_end|>", add_special_tokens=False)
                                            ["input_ids"])


def test_report_of_a_converged_model_beats_its_base(memorised, tmp_path):
    from doppel.config import PrepareConfig
    from doppel.preparing import pipeline

    held_out = tmp_path / "data"  # the memorised conversation again, its newest session held out
    pipeline.prepare(memorised.parent / "result.json", held_out, PrepareConfig(eval_fraction=0.34))
    result = CliRunner().invoke(main, ["eval", str(memorised), "--dataset", str(held_out), "--max-new-tokens", "16"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Me Owner (you), held-out loss: base ") and lines[-1] == f"wrote {memorised / 'eval'}"
    folder = memorised / "eval"
    assert sorted(p.name for p in folder.iterdir()) == ["judge.png", "loss.png", "probes.md", "report.json",
                                                        "report.md", "style.png", "training.png"]
    report = json.loads((folder / "report.json").read_text())
    assert [s["name"] for s in report["speakers"]] == ["Me Owner", "Max Orlov"]
    assert (report["judge"], report["confusion"]) == (None, {})
    assert report["noise"]["owner_loss"][0] < 0  # tuned below base on every draw: not within noise
    assert "within noise" not in lines[0]
    for speaker in report["speakers"]:
        assert set(speaker["tuned"]) == {"loss", "perplexity", *style.MEASURES, "vocabulary_overlap",
                                         "style_distance", "samples", "memory", "loss_ci", "style_distance_ci",
                                         "judge"}
        assert speaker["tuned"]["loss"] < 0.5 < 5 < speaker["base"]["loss"]
        # one held-out session: every draw of the bootstrap is that session, the interval a point
        assert speaker["tuned"]["loss_ci"] == [speaker["tuned"]["loss"]] * 2
        assert speaker["tuned"]["judge"] is None and speaker["judge_ceiling"] is None  # too few turns for a judge
        # trained with memory: its loss is the one with memory; no word of the held-out session is rare
        memory = speaker["tuned"]["memory"]
        assert memory["loss_with"] == speaker["tuned"]["loss"] and memory["loss_without"] < 0.5
        assert (memory["recall_turns"], memory["recall_loss_with"], memory["recall_loss_without"]) == (0, None, None)
        assert speaker["base"]["memory"]["loss_without"] == speaker["base"]["loss"]
    me = report["speakers"][0]
    assert me["real"]["bracket_smiley_rate"] == 0.5 and me["tuned"]["samples"][0] == ["го))", "в 7 🙂"]
    assert report["overall"]["tuned"]["style_distance"] < report["overall"]["base"]["style_distance"]
    assert len(report["probes"]["tuned"]) == 2  # owner facing Max and Max facing the owner, in English
    assert (folder / "probes.md").read_text().startswith("# Probe conversations\n\n## base: model as Me Owner")


def test_eval_needs_a_finished_run_with_held_out_sessions(memorised, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and result.output == f"doppel: error: {tmp_path} is not a doppel run (no run.json, " \
                                                      "no config.yaml)\n"
    result = CliRunner().invoke(main, ["eval", str(memorised)])  # trained with no eval split
    assert result.exit_code == 2 and "has no held-out sessions; prepare it with eval_fraction above 0" in \
        result.output


def test_eval_dataset_must_be_an_existing_dataset_directory(tmp_path):
    from doppel.config import EvalConfig
    from doppel.errors import DatasetError
    from doppel.evaluation.evaluate import evaluate
    from doppel.run import RunInfo

    run = tmp_path / "run"
    run.mkdir()
    info = RunInfo(None, "lora", 1, 1.0, 1.0, None, str(tmp_path / "gone"))
    (run / "run.json").write_text(json.dumps(info.to_json()))
    with pytest.raises(DatasetError) as err:
        evaluate(run, EvalConfig())
    assert str(err.value) == f"{tmp_path / 'gone'}: no such dataset directory"
    with pytest.raises(DatasetError) as err:
        evaluate(run, EvalConfig(dataset=tmp_path / "nonexistent"))
    assert str(err.value) == f"{tmp_path / 'nonexistent'}: no such dataset directory"
    with pytest.raises(DatasetError) as other:
        evaluate(run, EvalConfig(dataset=tmp_path))
    assert str(other.value) == f"{tmp_path} is not a doppel dataset (no stats.json); run doppel prepare"


def test_a_held_out_turn_too_long_for_the_context_is_skipped(memorised):
    """It used to be dropped from the prompt silently (the model answered an empty prompt); now it cannot be
    sent, so eval leaves that turn out and goes on."""
    from doppel.evaluation.evaluate import EvalConfig, generate_turns
    from doppel.run import Run

    model, tokenizer = Run(memorised).load()
    chat = {"id": 1, "name": "Max", "type": "personal_chat"}
    long = Session("1:1", chat, 0, 1, (Turn("Max Orlov", "user201", ("word " * 2100,), False),
                                      Turn("Me Owner", "user100", ("ok",), True)))
    short = Session("1:2", chat, 2, 3, (Turn("Max Orlov", "user201", ("yo", "gym later?"), False),
                                       Turn("Me Owner", "user100", ("го))", "в 7 🙂"), True)))
    steps = []
    out = generate_turns(model.eval(), tokenizer, [long, short], EvalConfig(max_new_tokens=16),
                         lambda: steps.append(1))
    assert len(steps) == 2 and list(out) == ["Me Owner"] and len(out["Me Owner"]) == 1
