"""docs/cli.md, the CLI reference: every command's own `--help`, walked from the click group.

    python -m doppel.docs_cli            # rewrite docs/cli.md (or: make docs)
    python -m doppel.docs_cli --check    # exit 1 when docs/cli.md differs from what it would write

A new command or subcommand appears by itself (hidden ones, such as the old `bench memory`, are left out). The help
is rendered at one fixed width, so the file is the same on every machine; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click
from click.testing import CliRunner

from doppel.cli import main

PROG = "doppel"
# the width a terminal of at least `max_content_width` columns shows (click leaves two columns free)
WIDTH = int(main.context_settings.get("max_content_width", 80)) - 2
TARGET = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
HEADER = f"""# CLI reference

<!-- Generated from each command's `--help` by `python -m doppel.docs_cli` (or `make docs`): do not edit by hand.
     tests/test_docs.py fails when this file differs from what the generator writes. -->

Every command of `{PROG}` and its `--help`, as printed at {WIDTH} columns. `{PROG} COMMAND -h` prints the same.
"""


def commands(group: click.Group = main, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every visible command under `group` (the group itself first, then its commands in the order
    cli.py defines them: prepare, inspect, train, …)."""
    yield path
    for name, command in group.commands.items():
        if command.hidden:
            continue
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


def help_text(path: tuple[str, ...]) -> str:
    """`doppel PATH --help`, run in-process at the fixed width."""
    result = CliRunner().invoke(main, [*path, "--help"], prog_name=PROG, terminal_width=WIDTH,
                                env={"COLUMNS": str(WIDTH + 2)})
    if result.exit_code != 0:
        raise RuntimeError(f"{PROG} {' '.join(path)} --help exited {result.exit_code}: {result.output}")
    return result.output.rstrip() + "\n"


def render() -> str:
    """The whole of docs/cli.md: a contents list, then one section per command."""
    paths = list(commands())
    names = [" ".join((PROG, *path)) for path in paths]
    contents = "".join(f"- [`{name}`](#{name.replace(' ', '-')})\n" for name in names)
    sections = "".join(f"\n## {name}\n\n```\n{help_text(path)}```\n" for name, path in zip(names, paths, strict=True))
    return f"{HEADER}\n{contents}{sections}"


def run(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = TARGET.read_text(encoding="utf-8") if TARGET.is_file() else ""
        if current != text:
            print(f"{TARGET} is stale: run python -m doppel.docs_cli", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
