"""The errors doppel expects: bad input, a missing package or GPU, a run that cannot go on.

Every one is a `DoppelError` whose message says what is wrong and what to do, in one line; the CLI prints it
as `doppel: error: MESSAGE` with exit code 2, and a library caller catches the one base class.
"""

from __future__ import annotations


class DoppelError(Exception):
    """An expected failure; the message is shown to the user as is."""


class ConfigError(DoppelError, ValueError):
    """A config value or file is invalid."""


class ExportError(DoppelError):
    """The input is not a readable chat export."""


class DatasetError(DoppelError):
    """A directory is not a usable doppel dataset."""


class ModelError(DoppelError):
    """A model or tokenizer cannot be found or loaded offline."""


class RunError(DoppelError):
    """A directory is not a usable doppel run."""


class TrainError(DoppelError):
    """The run cannot start or continue."""


class ChatError(DoppelError):
    """A persona or setting the model cannot use."""


class ContextTooLong(ChatError):
    """The newest turn alone does not fit the context with room for the reply."""


class GenerationFailed(ChatError):
    """The model raised while generating; the conversation is as it was before the turn."""


class EvalError(DoppelError):
    """The evaluation cannot run."""


class MemoryIndexError(DoppelError):
    """A memory index (or its remembered conversations) is missing or damaged."""


class BotError(DoppelError):
    """The Telegram bot cannot start or go on: a refused token, an unreachable Bot API, an unusable setting."""
