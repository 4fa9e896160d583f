"""`doppel chat`: prompts in both directions, message splitting, streamed replies from a trained model."""

from click.testing import CliRunner

from doppel import chat
from doppel.cli import main
from doppel.sessions import Turn


def run_cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def test_split_messages():
    assert chat.split_messages(">>> го))\n>>> в 7 🙂") == ["го))", "в 7 🙂"]
    assert chat.split_messages(">>> two\nlines\n>>> next\n") == ["two\nlines", "next"]
    assert chat.split_messages("no prefix") == ["no prefix"]
    assert chat.split_messages("") == []


def test_prompt_in_both_directions(memorised):
    from doppel.models import load_run

    model, tokenizer, _ = load_run(memorised)
    as_owner = chat.Conversation(model, tokenizer, "Me Owner", "Max Orlov")
    as_owner.history.append(Turn("Max Orlov", "", ("hey", "what's up?"), False))
    assert as_owner.prompt() == ("<|im_start|>Max Orlov\n>>> hey\n>>> what's up?<|im_end|>\n"
                                 "<|im_start|>Me Owner\n")
    as_friend = chat.Conversation(model, tokenizer, "Max Orlov", "Me Owner", max_context=220)
    as_friend.history += [Turn("Me Owner", "", ("hey",), False), Turn("Max Orlov", "", ("yo",), False),
                          Turn("Me Owner", "", ("what's up?",), False)]
    assert as_friend.prompt().endswith("<|im_start|>Me Owner\n>>> what's up?<|im_end|>\n<|im_start|>Max Orlov\n")
    # a short context keeps the newest whole turns: 220 - 200 new - 5 header tokens = 15, one turn of 12
    assert as_friend.prompt() == "<|im_start|>Me Owner\n>>> what's up?<|im_end|>\n<|im_start|>Max Orlov\n"


def test_reply_is_streamed_as_separate_messages(memorised):
    from doppel.models import load_run

    model, tokenizer, _ = load_run(memorised)
    conversation = chat.Conversation(model, tokenizer, "Me Owner", "Max Orlov", chat.Sampling(temperature=0))
    assert list(conversation.reply(["yo", "gym later?"])) == ["го))", "в 7 🙂"]
    assert conversation.history[-1] == Turn("Me Owner", "", ("го))", "в 7 🙂"), False)


def test_pipe_script_with_commands(memorised):
    script = "yo\ngym later?\n\n/reset\nyo\ngym later?\n\n/persona me owner\n/quit\nnever read\n"
    result = run_cli("chat", memorised, "--temperature", "0", input=script)
    assert result.exit_code == 0
    assert result.stdout == "Me Owner: го))\nMe Owner: в 7 🙂\n\n" * 2
    assert "(Me Owner ← Max Orlov, 0 turns of history)" in result.stderr


def test_list_and_unknown_names(memorised):
    assert run_cli("chat", memorised, "--list").output == "Me Owner\nMax Orlov\n"
    result = run_cli("chat", memorised, "--persona", "Max Orlv")
    assert result.exit_code == 2
    assert result.output == "doppel: error: unknown persona 'Max Orlv'; did you mean 'Max Orlov'?\n"
    assert run_cli("chat", memorised.parent / "nope").output == \
        f"doppel: error: {memorised.parent / 'nope'}: no such run or model directory\n"
    assert run_cli("bench", "chat", memorised.parent / "nope").output == \
        f"doppel: error: {memorised.parent / 'nope'}: no such run or model directory\n"


def test_a_folder_that_is_no_run_or_model(sample_data):
    """A dataset folder given where a run belongs (an easy slip: both come out of doppel)."""
    expected = f"doppel: error: {sample_data} is neither a doppel run nor a model directory (no run.json, " \
               "no config.json)\n"
    assert run_cli("chat", sample_data).output == expected
    assert run_cli("bench", "chat", sample_data).output == expected
