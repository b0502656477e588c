"""Conversational Core: conversations, messages and streamed AI replies on Redis."""

__version__ = "0.1.0"
