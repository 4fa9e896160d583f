"""Typed, validated configs for every stage: prepare, train, eval, chat sampling, serve.

One name per knob: the dataclass field `session_gap` is the YAML key `session_gap` and the flag
`--session-gap`. Precedence: field defaults, then `--config file.yaml`, then flags given on the
command line. The resolved config is written next to the stage's outputs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
import yaml

from doppel.errors import ConfigError


def knob(default: Any, help: str, **extra: Any) -> Any:
    """A config field with its help text (shown by `--help`); `alias`: a second, shorter flag."""
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class PrepareConfig:
    format: Literal["auto", "telegram", "whatsapp", "discord", "meta", "jsonl", "signal", "line",
                    "wechat", "imessage"] = knob(
        "auto", "the export's format (auto: told by the file: .txt or .zip WhatsApp or LINE, .jsonl JSONL, "
        "message_N.json Messenger/Instagram, DiscordChatExporter's JSON, signal-export's chat.md, data.json or folder, "
        ".csv WeChat, chat.db iMessage, else Telegram)")
    session_gap: float = knob(10.0, "minutes of silence that start a new session")
    include_groups: bool = knob(False, "also use group chats (off by default)")
    chat: tuple[str, ...] = knob((), "use only these chats (name or id; repeatable)")
    exclude_chat: tuple[str, ...] = knob((), "never use these chats (name or id; repeatable)")
    me: str | None = knob(None, "the account owner's id, e.g. user123 (overrides detection)")
    train_on: tuple[str, ...] = knob(("all",), "whose turns are targets: all, me, or names/ids")
    eval_fraction: float = knob(0.05, "share of each chat's newest sessions held out for eval")
    keep_service: bool = knob(False, "keep service messages (calls, pins…) as [action] lines")
    keep_forwarded: bool = knob(False, "keep forwarded messages (not the sender's own words)")
    keep_media: bool = knob(False, "keep media without a caption as [photo]-style lines")
    redact: bool = knob(False, "replace phone numbers, e-mails and card numbers by placeholders")
    pseudonymize: bool = knob(False, "replace people's names by consistent aliases")
    memory: bool = knob(True, "build the memory index of past sessions (DIR/memory/) that chat and training recall")
    same_person: tuple[str, ...] = knob((), "one person under two names in different exports, 'NAME=OTHER NAME' "
                                        "(repeatable; pairs chain in any order, A=B and B=C are one person; the "
                                        "same exact name is matched without it; never you with someone you talk to)")

    def __post_init__(self) -> None:
        if not 0 < self.session_gap <= 60 * 24 * 365:
            raise ConfigError(f"session_gap must be a positive number of minutes, at most a year (525600), got "
                              f"{self.session_gap:g}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.train_on:
            raise ConfigError("train_on needs at least one value: all, me, or a name/id")
        for pair in self.same_person:
            if pair.count("=") != 1 or not all(part.strip() for part in pair.split("=")):
                raise ConfigError(f"same_person must be 'NAME=OTHER NAME', got {pair!r}")


@dataclass(frozen=True)
class TrainConfig:
    model: str | None = knob(None, "base model: Hugging Face id or local path (default: embedded SmolLM2-135M)")
    mode: Literal["lora", "qlora", "full", "dpo"] = knob(
        "lora", "lora, qlora (4-bit NF4 base, bitsandbytes) or full; dpo: preference tuning of the run --from "
        "names, on its own wrong turns (tuning/dpo.py)")
    max_length: int = knob(1024, "tokens per training row; longer sessions are split at turn boundaries")
    packing: bool = knob(True, "pack short sessions into full rows (they never attend to each other)")
    batch_size: int | None = knob(None, "rows per device per micro-batch (default: 8 on a GPU; 1 on CPU, where "
                                  "micro-batches of about a thousand tokens train fastest)")
    gradient_accumulation: int = knob(1, "micro-batches per optimizer step")
    epochs: float = knob(3.0, "passes over the training sessions")
    max_steps: int | None = knob(None, "stop after this many optimizer steps (overrides epochs)")
    learning_rate: float | None = knob(None, "peak learning rate (default: 2e-4 lora/qlora, 2e-5 full)")
    warmup: float = knob(0.03, "share of the steps spent warming up the learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = knob("cosine", "learning-rate schedule")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: int = knob(32, "LoRA scaling numerator (alpha / r scales the update)")
    lora_dropout: float = knob(0.05, "dropout on the LoRA input")
    gradient_checkpointing: Literal["auto", "on", "off"] = knob(
        "auto", "recompute activations to save memory (auto: on for models over 1B parameters on GPU)")
    precision: Literal["auto", "bf16", "fp32"] = knob(
        "auto", "auto: bf16 where the hardware computes it natively (a GPU with bf16, a CPU with AVX512-BF16 or "
        "AMX), else fp32")
    attention: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2"] = knob(
        "auto", "attention kernel (auto: flash_attention_2 when installed on CUDA, else sdpa on CUDA, varlen on "
        "CPU; varlen: each packed session's attention alone, see doppel/training/attention.py)")
    liger: bool = knob(False, "fused Liger kernels (RMSNorm, SwiGLU, RoPE; CUDA, liger-kernel installed)")
    optim: Literal["auto", "adamw", "adamw_8bit"] = knob(
        "auto", "optimizer (auto: fused AdamW on GPU; adamw_8bit halves a full fine-tune's optimizer memory)")
    save_steps: int = knob(200, "save a checkpoint every this many steps")
    save_total_limit: int = knob(2, "keep only this many recent checkpoints")
    eval_steps: int | None = knob(None, "held-out loss every this many steps (default: save_steps)")
    logging_steps: int = knob(10, "log loss and tokens/s every this many steps")
    seed: int = knob(42, "random seed (data order, LoRA init)")
    resume: bool = knob(False, "continue the run in the output directory from its last checkpoint")
    memory: Literal["auto", "on", "off"] = knob(
        "auto", "open each training session with earlier sessions recalled from the dataset's memory index (auto: on "
        "when the dataset has one)")
    memory_tokens: int | None = knob(None, "tokens of a row the recalled memory may take (default: max_length / 4)")
    report_to: tuple[str, ...] = knob((), "also log to: tensorboard, trackio, wandb (repeatable)")
    from_run: Path | None = knob(None, "mode dpo: the finished LoRA run whose mistakes it learns from (its model, "
                                 "max_length and memory settings are kept unless --config or a flag gives them)",
                                 alias="--from")
    pairs: int | None = knob(None, "mode dpo: at most this many training turns to generate a pair from (default: all)")
    feedback: Path | None = knob(None, "mode dpo: also the owner's corrections, a feedback.jsonl (each pair counts "
                                 "three times)")
    beta: float = knob(0.1, "mode dpo: how far from the --from run the preferences may pull (DPO's beta)")

    def __post_init__(self) -> None:
        positive = ("max_length", "pairs", "batch_size", "gradient_accumulation", "lora_r", "lora_alpha",
                    "save_steps", "logging_steps", "save_total_limit")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 32:
            raise ConfigError(f"max_length must be at least 32 tokens, got {self.max_length}")
        if self.memory_tokens is not None and not 16 <= self.memory_tokens <= self.max_length // 2:
            raise ConfigError(f"memory_tokens must be between 16 and half of max_length ({self.max_length // 2}), "
                              f"got {self.memory_tokens}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.mode == "dpo" and self.from_run is None:
            raise ConfigError("mode dpo needs --from RUN: the finished run whose own turns it learns from")
        if self.mode != "dpo" and (self.from_run, self.pairs, self.feedback) != (None, None, None):
            raise ConfigError("from_run, pairs and feedback are options of mode dpo")
        if not 0 < self.beta <= 10:  # also refuses nan
            raise ConfigError(f"beta must be in (0, 10], got {self.beta}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            raise ConfigError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if not 0 <= self.warmup < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("warmup and lora_dropout must be in [0, 1)")
        unknown = set(self.report_to) - {"tensorboard", "trackio", "wandb"}
        if unknown:
            raise ConfigError(f"report_to: unknown {sorted(unknown)[0]!r}; use tensorboard, trackio or wandb")

    @property
    def memory_budget(self) -> int:
        return self.memory_tokens or self.max_length // 4

    @property
    def lr(self) -> float:
        # dpo: a quarter of LoRA's, as preference tuning moves a tuned model, not a base one
        return self.learning_rate or {"full": 2e-5, "dpo": 5e-5}.get(self.mode, 2e-4)


@dataclass(frozen=True)
class EvalConfig:
    dataset: Path | None = knob(None, "dataset whose eval split is used (default: the one the run trained on)")
    compare: str = knob("base", "'base' or another run directory to compare with")
    max_sessions: int = knob(40, "held-out sessions used, taken from every chat in turn so that each person has "
                             "some (more: narrower intervals, longer evaluation)")
    max_turns: int = knob(3, "generated turns per session")
    max_new_tokens: int = knob(48, "tokens per generated turn")
    probe_turns: int = knob(3, "generated turns per probe conversation")
    top_contacts: int = knob(2, "contacts the probes talk with, most active first")
    seed: int = knob(0, "random seed of generation")

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_turns", "max_new_tokens", "probe_turns"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.top_contacts < 0:
            raise ConfigError(f"top_contacts must be at least 0, got {self.top_contacts}")
        if self.compare != "base" and not Path(self.compare).is_dir():
            raise ConfigError(f"compare must be 'base' or a run directory, got {self.compare!r}")


GREEDY_BELOW = 0.01  # at 0.01 a logit gap of 0.1 is already e^10 odds; far below, logits / t overflow to inf


@dataclass(frozen=True)
class Sampling:
    temperature: float = knob(0.8, "0 (or under 0.01) is greedy")
    top_p: float = knob(0.9, "nucleus sampling: the smallest set of tokens with this much probability")
    repetition_penalty: float = knob(1.1, "above 1 makes repeating a token less likely")
    max_new_tokens: int = knob(200, "tokens per reply at most")
    seed: int | None = knob(None, "make sampling repeatable")

    def __post_init__(self) -> None:
        if not 0 <= self.temperature <= 100:  # also refuses nan
            raise ConfigError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:  # also refuses nan
            raise ConfigError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if self.repetition_penalty > 100:  # far above, logits * penalty overflow to inf
            raise ConfigError(f"repetition_penalty must be at most 100, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:
            raise ConfigError(f"seed must fit in 64 bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServeConfig:
    host: str = knob("127.0.0.1", "address to bind (loopback: this machine only; any other needs --api-key)")
    port: int = knob(8000, "port to listen on")
    api_key: str | None = knob(None, "require 'Authorization: Bearer KEY' on the API", envvar="DOPPEL_API_KEY")
    insecure: bool = knob(False, "allow a non-loopback --host without --api-key (anyone who reaches it can use it)")
    allowed_host: tuple[str, ...] = knob((), "also accept requests whose Host header names this (repeatable; '*': "
                                         "any); by default only the bound address, or loopback names on loopback")
    max_body_bytes: int = knob(1 << 20, "largest request body accepted (413 beyond)")
    max_messages: int = knob(1000, "most messages in one request")
    max_prompt_tokens: int = knob(4096, "most prompt tokens (older turns are left out to fit; a newest turn "
                                  "longer than this is refused)")
    memory: Literal["auto", "on", "off"] = knob("auto", "recall earlier conversations from the run's memory index "
                                                "(auto: when the run trained with it)")
    remember: bool = knob(False, "remember the conversations served, for later ones (RUN/memory/)")
    feedback: bool = knob(True, "record the web page's rewrites of the persona's replies in RUN/feedback.jsonl, for "
                          "the preference step (docs/security.md)")

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty, which would turn authentication off; give a key or none")
        for name in ("max_body_bytes", "max_messages", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.loopback and self.api_key is None and not self.insecure:
            raise ConfigError(f"--host {self.host} is reachable from other machines: give --api-key KEY (or "
                              "DOPPEL_API_KEY), or --insecure to serve without one")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK or self.host.startswith("127.")


TELEGRAM_NAME = r"@?[A-Za-z][A-Za-z0-9_]{2,31}"  # a username, with or without its @


@dataclass(frozen=True)
class BotConfig:
    persona: str | None = knob(None, "who answers (default: you, the export's owner); another persona is played only "
                               "in your own chat with the bot")
    allow: tuple[str, ...] = knob((), "who may talk with the bot: a Telegram id or @username (repeatable; you always "
                                  "may); with --business --auto: the contacts it answers on its own")
    owner: str | None = knob(None, "your Telegram id or @username (default: the export owner's id, when the export "
                             "is Telegram's)")
    business: bool = knob(False, "answer your own private chats through Telegram Business: suggested replies that "
                          "you send, edit or skip (see --auto)")
    auto: bool = knob(False, "business mode: answer --allow'ed contacts without asking, each message opened with "
                      "--marker, unless you wrote in that chat in the last --quiet-minutes")
    marker: str = knob("🤖 ", "what opens every message --auto sends, so that the contact knows it is not you")
    quiet_minutes: float = knob(30.0, "--auto keeps out of a chat for this long after you wrote in it")
    pace: float = knob(0.05, "seconds of typing per character of each message, at most 8 a message (0: at once)")
    gather: float = knob(2.0, "seconds to wait for more messages before answering: they make one turn")
    max_context: int | None = knob(None, "tokens of history kept per chat (default: the model's context)")
    memory: Literal["auto", "on", "off"] = knob("auto", "recall earlier conversations from the run's memory index "
                                                "(auto: when the run trained with it)")
    feedback: bool = knob(True, "business mode: record what you do with each draft (Send, Edit, Skip and what you "
                          "wrote instead) in RUN/feedback.jsonl, for the preference step (docs/security.md)")
    base_url: str = knob("https://api.telegram.org/bot", "the Bot API's address, the token appended (or put where "
                         "{token} is): a local Bot API server")
    poll_timeout: int = knob(30, "seconds one long poll for updates waits")

    def __post_init__(self) -> None:
        import re

        for value in self.allow + ((self.owner,) if self.owner is not None else ()):
            if not (value.isdigit() or re.fullmatch(TELEGRAM_NAME, value)):
                raise ConfigError(f"{value!r} is neither a Telegram user id (digits) nor a @username")
        if self.auto and not self.business:
            raise ConfigError("auto answers business chats: give --business too")
        if self.auto and not self.marker.strip():
            raise ConfigError("marker is empty: --auto would pass the model's messages off as yours")
        for name, most in (("pace", 10), ("gather", 60), ("quiet_minutes", 60 * 24 * 365), ("poll_timeout", 600)):
            if not 0 <= getattr(self, name) <= most:  # also refuses nan
                raise ConfigError(f"{name} must be between 0 and {most}, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 1:
            raise ConfigError(f"max_context must be at least 1, got {self.max_context}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must be an http:// or https:// address, got {self.base_url!r}")


C = TypeVar("C")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Check and convert one YAML value to the field's type."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(name, args[0], v) for v in items)
    if origin is Literal:
        if isinstance(value, bool) and "on" in args:  # YAML reads a bare on/off as a boolean
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is Path and isinstance(value, str):
        return Path(value)
    if (kind in (int, str) and not isinstance(value, kind)) or (isinstance(value, bool) and kind is int):
        raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


def load(cls: type[C], path: Path | None, overrides: Mapping[str, Any],
         base: Path | None = None) -> C:
    """Build a config: defaults < `base` YAML (a saved config) < YAML file < overrides. Raises `ConfigError`."""
    values: dict[str, Any] = {}
    if base is not None:
        values.update(dataclasses.asdict(load(cls, base, {})))  # type: ignore[call-overload]
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:  # its own message spans lines; one line says what and where
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config {path} is not valid YAML: {getattr(exc, 'problem', None) or exc}{where}") \
                from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of option: value")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    values.update(overrides)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}; valid: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def dump(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML."""
    data = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(cfg).items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def click_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding one flag per config field (`session_gap` → `--session-gap`)."""
    hints = typing.get_type_hints(cls)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            args = typing.get_args(kind)
            # the flag's own default is None ("not given"), so that a YAML file's value is not overridden;
            # the field's default is shown in the help
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f" [default: {default}]" if default not in (None, False) else ""
            extra: dict[str, Any] = {"default": None, "help": f"{f.metadata.get('help')}{shown}",
                                     "envvar": f.metadata.get("envvar")}
            if kind is bool:
                decl = [f"{flag}/--no-{flag[2:]}", f.name]
            else:
                decl = [flag, *([f.metadata["alias"]] if "alias" in f.metadata else []), f.name]
                union = typing.get_origin(kind) in (types.UnionType, typing.Union)
                inner = next((a for a in args if a is not type(None)), kind) if union else kind
                if typing.get_origin(kind) is tuple:
                    extra.update(multiple=True, default=())
                    inner = args[0]
                if typing.get_origin(inner) is Literal:
                    extra["type"] = click.Choice([str(a) for a in typing.get_args(inner)])
                elif inner in (int, float):
                    extra["type"] = inner
                elif inner is Path:
                    extra["type"] = click.Path(path_type=Path)
            func = click.option(*decl, **extra)(func)
        return func

    return decorate


def given(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """The flags the user actually gave (unset flags are None or an empty tuple)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in params.items() if k in names and v is not None and v != ()}
