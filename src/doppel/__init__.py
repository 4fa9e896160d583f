"""doppel: a language model that writes like you and the people you talk to, from a Telegram export."""

__version__ = "0.1.0"
