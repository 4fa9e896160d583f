"""Talking with a persona: the conversation (terminal chat) and the OpenAI-compatible server with its page."""
