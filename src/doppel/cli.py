"""Command-line interface: thin wrappers that build a config and call one library function."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from doppel import __version__, config
from doppel.config import BotConfig, EvalConfig, PrepareConfig, Sampling, ServeConfig, TrainConfig
from doppel.errors import DoppelError
from doppel.render import header_name, visible


class Failure(click.ClickException):
    """An expected failure: one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"doppel: error: {self.format_message()}", err=True)


@contextmanager
def failures() -> Iterator[None]:
    """Turn the library's expected errors into `Failure`."""
    try:
        yield
    except DoppelError as exc:
        raise Failure(str(exc)) from None
    except OSError as exc:
        raise Failure(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (silent when stderr is not a terminal)."""
    with progress_bars(description) as (bar,):
        yield bar


@contextmanager
def progress_bars(*descriptions: str) -> Iterator[list[Callable[[int, int], None]]]:
    """Progress bars on stderr, one per description, each shown from its first update; a description that ends
    in "bytes" counts bytes."""
    from rich.console import Console
    from rich.filesize import decimal
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), TextColumn("{task.fields[amount]}"),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        def updater(description: str) -> Callable[[int, int], None]:
            task: list[Any] = []
            size = decimal if description.endswith("bytes") else (lambda n: f"{n:,}")
            name = description.removesuffix(" bytes")

            def update(done: int, total: int) -> None:
                if not task:
                    task.append(bar.add_task(name, total=None, amount=""))
                bar.update(task[0], completed=done, total=total, amount=f"{size(done)}/{size(total)}")
            return update

        yield [updater(d) for d in descriptions]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="doppel")
def main() -> None:
    """doppel: turn a chat export into a model that writes like you and your friends.

    \b
    doppel prepare result.json -o data      # export → sessions dataset
    doppel inspect data                     # see what the model will learn from
    doppel train data -o run                # fine-tune (LoRA on the embedded model by default)
    doppel merge run -o model               # LoRA run → standalone model
    doppel chat run --persona Me --as Max   # talk with a persona
    doppel serve run                        # OpenAI-compatible API + web page
    doppel bot run --allow @max_orlov       # the persona in Telegram (a bot, or Business)
    doppel eval run                         # held-out loss and style, tuned vs base
    """
    # the libraries' own tqdm bars (GGUF loading, dataset maps) would interleave with doppel's
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message="Could not find a config file", module="peft")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    # bitsandbytes says on import, on CPUs with AVX512-BF16, that it has no hub kernel (doppel downloads none)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # the library's warnings (a damaged checkpoint skipped, …): one line each on stderr; assigned, not added, so
    # that many invocations in one process (tests) keep one handler
    logging.getLogger("doppel").handlers[:] = [_Warnings(logging.WARNING)]


class _Warnings(logging.Handler):
    """The library's warnings as one line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"doppel: warning: {record.getMessage()}", err=True)


@main.command()
@click.argument("exports", metavar="EXPORT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="dataset directory to write (replaced only when the new one is complete)")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML file with any of the options below")
@click.option("--show", type=int, default=0, help="print this many rendered sessions afterwards")
@config.click_options(PrepareConfig)
def prepare(exports: tuple[Path, ...], out: Path, config_file: Path | None, show: int, **flags: Any) -> None:
    """Read a chat export and write a sessions dataset: Telegram Desktop's JSON (result.json or its folder),
    WhatsApp's "Export chat" (.txt, or the .zip with media), DiscordChatExporter's JSON, Messenger or Instagram
    (Meta's JSON download), or plain JSONL (see the README). Several exports make one dataset; people are
    matched across them by name, or by --same-person.

    \b
    Examples:
        doppel prepare ~/Downloads/Telegram\\ Desktop/DataExport_2026-01-01/result.json -o data
        doppel prepare "WhatsApp Chat with Max Orlov.zip" -o data
        doppel prepare result.json "WhatsApp Chat with Max O.zip" --same-person "Max Orlov=Max O." -o data
    """
    from doppel.preparing.pipeline import prepare as build

    with failures():
        cfg = config.load(PrepareConfig, config_file, config.given(PrepareConfig, flags))
        with progress_bars("reading export bytes", "embedding memory") as (bar, memory_bar):
            stats = build(list(exports), out, cfg, progress=bar, memory_progress=memory_bar)
    for line in stats.summary():
        click.echo(line)
    click.echo(f"wrote {out}")
    if show:
        _show(out, show)


@main.command()
@click.argument("dataset_dir", metavar="DATASET", type=click.Path(path_type=Path))
@click.option("-n", "--count", type=int, default=3, help="how many sessions to print")
@click.option("--split", type=click.Choice(["train", "eval"]), default="train")
def inspect(dataset_dir: Path, count: int, split: str) -> None:
    """Print rendered sessions with the training targets highlighted.

    Text in bold green is what the model learns to write; dim text is context only.

    \b
    Example:
        doppel inspect data -n 5
    """
    from doppel.dataset import Dataset

    with failures():
        for line in Dataset.open(dataset_dir).stats.summary():
            click.echo(line)
        _show(dataset_dir, count, split)


@main.command()
@click.argument("dataset_dir", metavar="DATASET", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="run directory (adapter or weights, tokenizer, config.yaml, metrics.jsonl)")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="YAML file with any of the options below (see configs/)")
@config.click_options(TrainConfig)
def train(dataset_dir: Path, out: Path, config_file: Path | None, **flags: Any) -> None:
    """Fine-tune a chat model on a prepared dataset so it writes as each trained speaker.

    With no --model it trains the embedded SmolLM2-135M-Instruct, on CPU if there is no GPU.
    The same command runs on many GPUs under `accelerate launch --config_file configs/fsdp.yaml`.
    With --resume the saved config.yaml of the run is the starting point, then --config, then flags: an
    unfinished run goes on from its last checkpoint, and a finished one trains on to a larger --max-steps or
    --epochs.

    \b
    Examples:
        doppel train data -o runs/me --max-steps 60
        doppel train data -o runs/me --resume --max-steps 120
        doppel train data -o runs/me7b --config configs/lora-7b.yaml
        doppel train data -o runs/me-dpo --from runs/me --mode dpo --pairs 40
        accelerate launch --config_file configs/fsdp.yaml -m doppel train data -o runs/full \\
            --config configs/full-fsdp.yaml
    """
    from doppel.run import CONFIG_FILE
    from doppel.training import train as training

    with failures():
        given = config.given(TrainConfig, flags)
        saved = out / CONFIG_FILE
        resuming = given.get("resume") and saved.is_file()
        cfg = config.load(TrainConfig, config_file, given, base=saved if resuming else None)
        if cfg.mode == "dpo" and not resuming:
            from doppel.tuning.dpo import dpo_config

            cfg = dpo_config(config_file, given, cfg)
        try:
            if cfg.mode == "dpo":
                from doppel.tuning.dpo import train_dpo

                with progress_bar("generating preference pairs") as bar:
                    info = train_dpo(dataset_dir, out, cfg, progress=bar)
            else:
                info = training.train(dataset_dir, out, cfg)
        except KeyboardInterrupt:
            if not out.exists():
                raise Failure("interrupted before the first checkpoint; nothing was kept") from None
            raise Failure(f"interrupted; continue with: doppel train {dataset_dir} -o {out} --resume") from None
    if int(os.environ.get("RANK", "0")):
        return  # under accelerate launch, one process reports
    if info.from_run:
        click.echo(f"{info.plan['pairs']} preference pairs from {info.plan['generated']} generated turns "
                   f"(see {out / 'preferences.jsonl'})")
    click.echo(f"trained {info.steps} steps ({info.epochs:g} epochs), final train loss {info.train_loss:.4f}"
               + (f", eval loss {info.eval_loss:.4f}" if info.eval_loss else ""))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="directory for the merged model")
def merge(run: Path, out: Path) -> None:
    """Merge a LoRA run into its base model and write a standalone model (safetensors).

    \b
    Example:
        doppel merge runs/me -o models/me
    """
    from doppel.run import Run

    with failures():
        found = Run.open(run)
        if not found.finished:
            raise Failure(f"{run} is not a finished doppel run (no run.json)")
        found.merge(out)
    click.echo(f"wrote {out}")


def engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--engine and --gguf: what generates (run.open_model)."""
    command = click.option("--gguf", "gguf", type=click.Path(path_type=Path, dir_okay=False),
                           help="the GGUF file llama.cpp runs (default: the run's latest doppel export)")(command)
    return click.option("--engine", type=click.Choice(["auto", "transformers", "llama.cpp"]), default="auto",
                        show_default=True, help="auto: llama.cpp when the run has a GGUF export and "
                        "llama-cpp-python is installed")(command)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="directory for the GGUF files")
@click.option("--gguf", "kinds", multiple=True, default=("q8_0",), show_default=True,
              type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]),
              help="quantization, repeatable; k-quants need llama-cpp-python. The Modelfiles use the first")
@click.option("--persona", "personas", multiple=True, metavar="NAME",
              help="a persona to write a Modelfile for, repeatable, each with its --as (default: you)")
@click.option("--as", "users", multiple=True, metavar="NAME",
              help="who talks to the persona of the same position (default: your top three contacts)")
@click.option("--name", help="the files' name (default: the run directory's)")
@config.click_options(Sampling)
def export(run: Path, out: Path, kinds: tuple[str, ...], personas: tuple[str, ...], users: tuple[str, ...],
           name: str | None, **flags: Any) -> None:
    """Export a run as GGUF files for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile per persona pair.

    A LoRA run is merged into its base first; a full run or a merged model directory is converted as it is.
    The sampling options go into the Modelfiles. DIR/README.md says how to run each.

    \b
    Examples:
        doppel export runs/me -o export --gguf q8_0 --gguf f16
        doppel export runs/me -o export --persona "Lena Volkova" --as "Max Orlov"
    """
    from doppel.exporting.gguf import export as write

    with failures():
        if len(personas) != len(users) and personas:
            raise Failure("give each --persona its --as (or --as alone, for you as the persona)")
        sampling = config.load(Sampling, None, config.given(Sampling, flags))
        pairs = list(zip(personas, users, strict=True))
        if users and not personas:
            from doppel.run import Run

            owner = Run.open(run).owner if (run / "run.json").is_file() else None
            pairs = [(owner or "Me", user) for user in users]
        done = write(run, out, kinds, pairs, sampling, name, progress=lambda step: click.echo(f"doppel: {step}",
                                                                                                err=True))
    for kind, file in done.files.items():
        click.echo(f"{kind:7} {out / file}  ({(out / file).stat().st_size / 1e6:,.1f} MB)")
    for modelfile in done.modelfiles:
        click.echo(f"ollama  {out / modelfile}")
    click.echo(f"wrote {out} (see {out / 'README.md'})")


@main.command()
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option("--persona", help="who the model plays (default: you, the export's owner)")
@click.option("--as", "as_", metavar="NAME", help="who you are (default: the most active other speaker)")
@click.option("--list", "list_", is_flag=True, help="list the run's speakers and exit")
@click.option("--max-context", type=int, help="tokens of history kept (default: the model's context)")
@click.option("--memory", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="recall earlier conversations from the run's memory index (auto: when the run trained with it)")
@click.option("--remember", is_flag=True, help="remember this conversation, for later chats (RUN/memory/)")
@click.option("--feedback/--no-feedback", default=True, show_default=True,
              help="record each /rewrite in RUN/feedback.jsonl, for the preference step (docs/security.md)")
@engine_options
@config.click_options(Sampling)
def chat(run: Path | None, persona: str | None, as_: str | None, list_: bool, max_context: int | None, memory: str,
         remember: bool, feedback: bool, engine: str, gguf: Path | None, **flags: Any) -> None:
    """Chat with a persona of a trained run (or, with no RUN, the untuned embedded model).

    Type one message per line; an empty line sends your turn. The persona answers with one or more
    messages. Commands: /reset, /as NAME, /persona NAME, /rewrite TEXT, /memory, /quit. /rewrite puts your
    text in place of the persona's last reply ("that is not how I'd say it"), one message per line up to an
    empty line, and records the pair in RUN/feedback.jsonl. From a pipe, the script's blocks
    (separated by empty lines) are your turns and the replies are printed.

    \b
    Examples:
        doppel chat runs/me --persona "Lena Volkova" --as "Max Orlov"
        printf 'hey\\nwhat'"'"'s up?\\n' | doppel chat runs/me --as "Max Orlov"
    """
    from doppel.errors import ContextTooLong
    from doppel.feedback import FEEDBACK_FILE
    from doppel.run import Run, open_model
    from doppel.serving import chat as chatting

    with failures():
        found = Run(run) if run is not None and (run / "run.json").is_file() else None
        known = found.speakers if found else []
        if list_:
            click.echo("\n".join(map(header_name, known)) if known else
                       "this model has no speaker list: any name works")
            return
        _check_exists(run)
        persona, user = chatting.pick_people(known, found.owner if found else None, persona, as_)
        sampling = config.load(Sampling, None, config.given(Sampling, flags))
        if sys.stdin is None or sys.stdin.closed:
            raise Failure("standard input is closed: type in a terminal, or pipe the turns in")
        recall = chatting.open_memory(found if found is not None and found.finished else None, memory, remember)
        loaded = open_model(run, engine, gguf)
        conversation = chatting.Conversation(loaded.engine, loaded.tokenizer, persona, user, sampling, max_context,
                                             memory=recall)
        recorded = found.path / FEEDBACK_FILE if feedback and found is not None and found.finished else None
        interactive = sys.stdin.isatty()
        if interactive:
            click.echo(f"{header_name(persona)} is listening; you are {header_name(user)}. One message per line, an "
                       "empty line sends; "
                       "/reset /as NAME /persona NAME /rewrite TEXT /memory /quit"
                       + (f" (memory: {len(recall.memory.entries):,} entries)" if recall else ""))
        for turn in _turns(interactive, f"{user}> "):
            if turn[0].startswith("/"):
                if not _command(conversation, turn, known, recorded):
                    return
                continue
            try:
                for message in conversation.reply(turn):
                    speaker = header_name(conversation.persona)
                    message = visible(message)  # a model can write ESC too: never a terminal's command
                    click.echo(click.style(f"{speaker}: ", fg="green", bold=True) + message
                               if interactive else f"{speaker}: {message}")
            except ContextTooLong as exc:  # that turn is left out; the chat goes on
                click.echo(f"doppel: {exc}; not sent", err=True)
            if not interactive:
                click.echo()


def _check_exists(run: Path | None) -> None:
    if run is not None and not run.exists():
        raise Failure(f"{run}: no such run or model directory")


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise Failure(f"cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}") from None


def _turns(interactive: bool, prompt: str) -> Iterator[list[str]]:
    """The user's turns: blocks of lines ended by an empty line (or a lone /command; /rewrite's text is a block)."""
    lines: list[str] = []

    def read() -> Iterator[str]:
        if not interactive:
            yield from (text.rstrip("\n") for text in sys.stdin)
            return
        while True:
            yield input(prompt if not lines else " " * len(prompt))

    try:
        for line in read():
            if line.startswith("/") and not lines and line.split(" ", 1)[0] != "/rewrite":
                yield [line.strip()]
            elif line.strip():
                lines.append(line)
            elif lines:
                yield lines
                lines = []
    except (EOFError, KeyboardInterrupt):
        pass
    if lines:
        yield lines


def _command(conversation: Any, turn: list[str], known: list[str], feedback: Path | None) -> bool:
    """Apply a /command (`turn`: its line, and for /rewrite the lines of its text after it); False to quit."""
    from doppel.errors import ChatError
    from doppel.serving.chat import check_name

    name, _, arg = turn[0].strip().partition(" ")
    try:
        if name in ("/quit", "/exit"):
            return False
        if name == "/memory":
            _show_memory(conversation)
            return True
        if name == "/rewrite" and (messages := [m.strip() for m in [arg, *turn[1:]] if m.strip()]):
            _rewrite(conversation, messages, feedback)
            return True
        if name == "/reset":
            conversation.reset()
        elif name == "/as" and arg:
            conversation.user = check_name(arg.strip(), known, "speaker")
        elif name == "/persona" and arg:
            conversation.persona = check_name(arg.strip(), known, "persona")
        else:
            click.echo("commands: /reset, /as NAME, /persona NAME, /rewrite TEXT (the persona's last reply as you "
                       "would write it, one message per line), /memory, /quit", err=True)
            return True
        click.echo(f"({header_name(conversation.persona)} ← {header_name(conversation.user)}, "
                   f"{len(conversation.history)} turns of history)",
                   err=True)
    except ChatError as exc:
        click.echo(f"doppel: {exc}", err=True)
    return True


def _rewrite(conversation: Any, messages: list[str], feedback: Path | None) -> None:
    """Put `messages` in place of the persona's last reply, and record the pair in `feedback` (None: not recorded)."""
    import time

    from doppel.feedback import FeedbackPair, record

    context = tuple(conversation.history[:-1])
    replaced = conversation.rewrite(messages)  # a ChatError when there is no reply to rewrite
    persona = header_name(conversation.persona)
    if list(replaced.messages) == messages:
        click.echo(f"({persona}'s last reply is already that; nothing recorded)", err=True)
        return
    if feedback is None:
        click.echo(f"({persona}'s last reply rewritten; not recorded: --no-feedback, or no trained run)", err=True)
        return
    try:
        record(feedback, FeedbackPair(context, conversation.persona, tuple(messages), replaced.messages, "chat",
                                      int(time.time())))
    except OSError as exc:  # the chat goes on, with the reply rewritten
        click.echo(f"doppel: cannot write {feedback} ({exc.strerror or exc}); the rewrite is not recorded", err=True)
        return
    click.echo(f"({persona}'s last reply rewritten; recorded in {feedback})", err=True)


def _show_memory(conversation: Any) -> None:
    """What the last reply recalled."""
    from doppel.render import memory_text

    if conversation.memory is None:
        click.echo("(memory is off)")
    elif not conversation.recalled:
        click.echo("(nothing recalled for the last reply)")
    else:
        click.echo(visible(memory_text(conversation.recalled)))


@main.command()
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option("--as", "as_", metavar="NAME", help="who writes when a user message has no name")
@engine_options
@config.click_options(ServeConfig)
def serve(run: Path | None, as_: str | None, engine: str, gguf: Path | None, **flags: Any) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models) and a web chat page at /.

    The request's `model` is the persona; a user message's `name` says who writes. It binds 127.0.0.1;
    another --host needs --api-key (or --insecure). Requests are limited in size, messages and prompt
    tokens (the --max-* options). The page's "rewrite" on the persona's last reply posts to /doppel/feedback,
    which records it in RUN/feedback.jsonl (--no-feedback: refused).

    \b
    Example:
        doppel serve runs/me --port 8000
        curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"model": "Lena Volkova", "messages": [{"role": "user", "name": "Max Orlov", "content": "hey"}]}'
    """
    import uvicorn

    from doppel.feedback import FEEDBACK_FILE
    from doppel.run import Run, open_model
    from doppel.serving import chat as chatting
    from doppel.serving.server import create_app

    with failures():
        cfg = config.load(ServeConfig, None, config.given(ServeConfig, flags))
        _check_exists(run)
        _check_port(cfg.host, cfg.port)  # before the model loads, so a taken port fails at once
        found = Run(run) if run is not None and (run / "run.json").is_file() else None
        personas = found.personas() if found else []
        me = found.owner if found else None
        _, user = chatting.pick_people(personas, me, None, as_)
        recall = chatting.open_memory(found if found is not None and found.finished else None, cfg.memory,
                                      cfg.remember)
        loaded = open_model(run, engine, gguf)
        feedback = found.path / FEEDBACK_FILE if cfg.feedback and found is not None and found.finished else None
        app = create_app(loaded.engine, loaded.tokenizer, personas, user, cfg, default_persona=me, memory=recall,
                         feedback=feedback)
    if not cfg.loopback and cfg.api_key is None:
        click.secho(f"doppel: WARNING: serving on {cfg.host} without an API key (--insecure): anyone who can reach "
                    "this address can use the model", err=True, fg="red", bold=True)
    click.echo(f"doppel: serving {run or 'the embedded model'} on http://{cfg.host}:{cfg.port} "
               f"(personas: {', '.join(personas) or 'any name'}; engine: {loaded.engine.name}; "
               "memory: "
               f"{f'{len(recall.memory.entries):,} entries' if recall else 'off'})", err=True)
    # a request still generating when the server is asked to stop is cut after a few seconds
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--token", envvar="DOPPEL_BOT_TOKEN", required=True,
              help="the bot's token from @BotFather (better: DOPPEL_BOT_TOKEN, which other users cannot read)")
@config.click_options(BotConfig)
@engine_options
@config.click_options(Sampling)
def bot(run: Path, token: str, engine: str, gguf: Path | None, **flags: Any) -> None:
    """Put a persona in Telegram: the people you allow write to your bot, and your persona answers.

    Only you may have another persona answer, and only in your own chat with the bot. With --business the bot
    is your Telegram Business chatbot: for each message in your private chats it sends you a suggested reply with
    Send / Edit / Skip, and nothing reaches the contact before you tap Send; --auto answers --allow'ed contacts
    itself, every message opened with --marker. What you do with each draft (Send, Edit, Skip and what you wrote
    instead) goes to RUN/feedback.jsonl, for the preference step (--no-feedback: nothing). Commands in the chat:
    /reset, /as NAME, /persona NAME (you only).
    Long polling; Ctrl-C stops, and a restart goes on where it stopped (RUN/bot/).

    \b
    Examples:
        export DOPPEL_BOT_TOKEN=123456:ABC...    # from @BotFather
        doppel bot runs/me --allow 201 --allow @max_orlov
        doppel bot runs/me --business
        doppel bot runs/me --business --auto --allow @max_orlov --marker "🤖 "
    """
    import asyncio

    from doppel.run import Run

    with failures():
        try:
            from doppel.bot.telegram import serve as serve_bot
        except ModuleNotFoundError as exc:
            if exc.name != "telegram":
                raise
            raise Failure("doppel bot needs python-telegram-bot: pip install 'doppel[bot]'") from None
        cfg = config.load(BotConfig, None, config.given(BotConfig, flags))
        sampling = config.load(Sampling, None, config.given(Sampling, flags))
        found = Run.open(run)
        found.info  # noqa: B018 (a finished run, or a RunError that says how to finish it)

        async def until_stopped() -> None:
            import signal

            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # as Ctrl-C does
            await serve_bot(found, token, cfg, sampling, ready=lambda line: click.echo(f"doppel: {line}", err=True),
                            engine=engine, gguf=gguf)

        try:
            asyncio.run(until_stopped())
        except (KeyboardInterrupt, asyncio.CancelledError):
            click.echo("doppel: stopped", err=True)


@main.command("eval")
@click.argument("run", type=click.Path(path_type=Path))
@config.click_options(EvalConfig)
def eval_(run: Path, **flags: Any) -> None:
    """Measure how much a run sounds like each person, against its base model.

    Held-out loss and perplexity per speaker, style of generated turns against the real ones,
    probe conversations ("hey" / "what's up?") in both directions. Writes RUN/eval/: report.json,
    report.md, probes.md and plots.

    \b
    Example:
        doppel eval runs/me --max-sessions 50
    """
    from doppel.evaluation import evaluate, report

    with failures():
        cfg = config.load(EvalConfig, None, config.given(EvalConfig, flags))
        with progress_bar("generating turns") as bar:
            result = evaluate.evaluate(run, cfg, progress=bar)
    for line in report.headline(result):
        click.echo(line)
    click.echo(f"wrote {run / 'eval'}")


@main.group()
def bench() -> None:
    """Benchmarks that print figures (speed, memory)."""


@bench.command("prepare")
@click.option("--messages", type=int, default=1_000_000, show_default=True, help="messages in the synthetic export")
@click.option("--chats", type=int, default=500, show_default=True)
@click.option("--keep", type=click.Path(path_type=Path), help="directory to keep (and reuse) the export in")
@click.option("--format", "formats", type=click.Choice(["telegram", "whatsapp", "discord"]), multiple=True,
              help="export formats to measure (repeatable; default: all three)")
def bench_prepare(messages: int, chats: int, keep: Path | None, formats: tuple[str, ...]) -> None:
    """`doppel prepare` against `json.load` (WhatsApp: reading the text into lines) on synthetic exports of
    Telegram, WhatsApp and Discord: time and peak memory.

    \b
    Example:
        doppel bench prepare --messages 1000000
    """
    from doppel.bench import PREPARE_FORMATS
    from doppel.bench import bench_prepare as run

    chosen = formats or PREPARE_FORMATS
    with failures():
        figures = run(messages, chats, keep, chosen)
    for kind, values in ({chosen[0]: figures} if len(chosen) == 1 else figures).items():
        click.echo(kind)
        for key, value in values.items():
            click.echo(f"{key:>24}: {value}")


@bench.command("train")
@click.option("--dataset", "dataset_dir", type=click.Path(path_type=Path), required=True)
@click.option("--model", help="base model (default: embedded SmolLM2-135M; random:mistral-7b needs no download)")
@click.option("--mode", type=click.Choice(["lora", "qlora", "full"]), default="lora", show_default=True)
@click.option("--tokens", type=int, default=None, help="target tokens to train on (default: 4,000 CPU, 200,000 GPU)")
@click.option("--batch-size", type=int, help="doppel's rows per micro-batch (default: 8 GPU, 1 CPU)")
@click.option("--max-length", type=click.IntRange(min=32), default=1024, show_default=True,
              help="tokens per row (both recipes): longer sessions are split at turns")
@click.option("--gradient-checkpointing", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True)
@click.option("--attention", type=click.Choice(["auto", "varlen", "sdpa", "eager", "flash_attention_2"]),
              default="auto", show_default=True, help="doppel's attention kernel (the reference's is sdpa)")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True,
              help="both recipes' precision (auto: bf16 where the hardware computes it natively)")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the figures as JSON here")
def bench_train(dataset_dir: Path, model: str | None, mode: str, tokens: int | None, batch_size: int | None,
                max_length: int, gradient_checkpointing: str, attention: str, precision: str,
                json_out: Path | None) -> None:
    """doppel's training path against the reference recipe, on the same sessions and model.

    The reference pads each micro-batch of 8 (full: 2) to its longest row, groups by length and does
    not pack. `tokens_per_s` counts target (trained) tokens.

    \b
    Examples:
        doppel bench train --dataset runs/demo/data --json bench.json
        doppel bench train --dataset data --model random:mistral-7b --mode qlora
    """
    import torch

    from doppel.bench import bench_train as run
    from doppel.training.plan import default_rows

    with failures():
        cuda = torch.cuda.is_available()
        budget = tokens or (200_000 if cuda else 4_000)
        result = run(dataset_dir, model, mode, budget, batch_size or default_rows(cuda), gradient_checkpointing,
                     max_length, attention, precision)
    text = json.dumps(result, indent=2)
    click.echo(text)
    if json_out:
        json_out.write_text(text + "\n", encoding="utf-8")


@bench.command("recall")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--locomo", "locomo", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="LoCoMo conversations, one a file (the files after it too): evidence recall of each retrieval")
@click.option("--messages", type=int, default=None,
              help="messages in the synthetic export whose index is timed (default: 1000000; with --locomo: none)")
@click.option("--keep", type=click.Path(path_type=Path), help="directory to keep (and reuse) the export in")
@click.option("--tokens", type=int, default=64, show_default=True, help="new tokens per timed reply (at most)")
@click.option("--repeats", type=int, default=3, show_default=True, help="timed replies each way (after one warm-up)")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="write the figures as JSON here")
def bench_recall(files: tuple[Path, ...], locomo: tuple[Path, ...], messages: int | None, keep: Path | None,
                 tokens: int, repeats: int, json_out: Path | None) -> None:
    """Memory: recall@1/@5 of dense, BM25 and hybrid retrieval on a labelled Russian/English fixture; the time to
    build the memory of a synthetic export's sessions and to build it again, and a reply with memory against
    without; with --locomo, the evidence recall over LoCoMo conversations (docs/benchmarks.md): per category, at
    k entries, at 1,000 and 2,000 characters and in chat's memory block, for doppel's retrieval, plain BM25 and
    dense alone, as a table.

    \b
    Examples:
        doppel bench recall --messages 1000000
        doppel bench recall --locomo locomo/26.json locomo/30.json --json locomo.json
    """
    from rich.console import Console

    from doppel.bench import bench_recall as measure
    from doppel.evaluation.locomo import table

    if files and not locomo:
        raise click.UsageError("the files are LoCoMo conversations: give them after --locomo")
    locomo = locomo + files
    with failures(), progress_bar("LoCoMo conversations") as bar:
        result = measure(messages if messages is not None else 0 if locomo else 1_000_000, keep, tokens, repeats,
                         locomo, bar)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if json_out:
        json_out.write_text(text + "\n", encoding="utf-8")
    click.echo(json.dumps({k: v for k, v in result.items() if k != "locomo"}, indent=2, ensure_ascii=False))
    if locomo:
        Console(highlight=False, width=None if sys.stdout.isatty() else 110).print(table(result["locomo"]))


_memory = copy.copy(bench_recall)  # `bench memory`, the old name: hidden, kept for one release
_memory.name, _memory.hidden, _memory.deprecated = "memory", True, "Use doppel bench recall."
bench.add_command(_memory, "memory")


@bench.command("chat")
@click.argument("run", required=False, type=click.Path(path_type=Path))
@click.option("--tokens", type=int, default=64, show_default=True, help="new tokens per reply")
@click.option("--repeats", type=int, default=5, show_default=True, help="timed replies (after one warm-up)")
@click.option("--engine", "engines", multiple=True, type=click.Choice(["transformers", "llama.cpp"]),
              default=("transformers", "llama.cpp"), show_default=True, help="engines to compare, repeatable")
@click.option("--gguf", "files", multiple=True, type=click.Path(path_type=Path, dir_okay=False),
              help="GGUF files for llama.cpp, repeatable (default: every file of the run's export)")
def bench_chat(run: Path | None, tokens: int, repeats: int, engines: tuple[str, ...], files: tuple[Path, ...]) -> None:
    """Generation speed of `doppel chat` on each engine side by side: time to first token and tokens/s (median of
    the repeats, each from a cold prompt).

    \b
    Examples:
        doppel bench chat                        # the embedded model on transformers
        doppel bench chat runs/me                # transformers, and llama.cpp on each file of its export
    """
    from doppel.bench import bench_chat as measure

    with failures():
        _check_exists(run)
        click.echo(json.dumps(measure(run, tokens, repeats, engines, files), indent=2))


def _show(dataset_dir: Path, count: int, split: str = "train") -> None:
    from itertools import islice

    from rich.console import Console
    from rich.text import Text

    from doppel import dataset, render

    console = Console(highlight=False, soft_wrap=True)
    with failures():
        for session in islice(dataset.Dataset.open(dataset_dir).sessions(split), count):  # type: ignore[arg-type]
            # the chat's name as text, one line: rich markup (`[red]`) and escape sequences in it are shown as typed
            console.rule(Text(f"{session.id} · {render.header_name(session.chat.name)} · {len(session.turns)} turns"))
            out = Text()
            for piece, target in render.segments(session):
                style = "bold green" if target else "dim"
                if piece in (render.IM_START, render.IM_END):
                    out.append(piece, style=style)
                    continue
                # a marker typed inside a message is plain text to the model: shown escaped and struck through, so
                # that it does not look like a turn of its own, with colours or without
                for n, part in enumerate(re.split(r"(<\|im_start\|>|<\|im_end\|>)", piece)):
                    out.append(render.escaped(part) if n % 2 else render.visible(part),
                               style=style + (" strike" if n % 2 else ""))
            console.print(out, end="")
    if not sys.stdout.isatty():
        click.echo(f"(targets are the bodies of trained turns and their {render.IM_END}; a marker typed in a message "
                   f"is shown as {render.escaped(render.IM_END)})")
