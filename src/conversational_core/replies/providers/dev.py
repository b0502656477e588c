"""The built-in development provider: a deterministic, clearly labelled reply, streamed at a
configurable pace, so that the service works out of the box with no model configured."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from conversational_core.replies.context import estimate_tokens
from conversational_core.replies.providers.base import CompletionRequest, Provider, Usage


class DevProvider(Provider):
    name = "dev"

    def __init__(self, delay_seconds: float = 0.03) -> None:
        self._delay = delay_seconds

    @staticmethod
    def reply_for(request: CompletionRequest) -> str:
        last = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        quoted = " ".join(last.split())
        if len(quoted) > 120:
            quoted = quoted[:117] + "..."
        sent = len(request.messages)
        return (
            f'[development reply] You said: "{quoted}". This answer comes from the built-in '
            f"development provider ({sent} message{'' if sent == 1 else 's'} sent to it); "
            "set LLM_PROVIDER to reach a real model."
        )

    async def title(self, first_message: str, model: str) -> str:
        """The first words of the first message (no model to ask)."""
        words = first_message.split()
        title = " ".join(words[:6])
        if len(words) > 6 or len(title) > 60:
            title = title[:60].rstrip(" ,.;:") + "…"
        return title

    async def stream(self, request: CompletionRequest) -> AsyncIterator[str | Usage]:
        text = self.reply_for(request)
        words = text.split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]
        pieces = pieces[: max(1, request.max_tokens)]
        for piece in pieces:
            if self._delay:
                await asyncio.sleep(self._delay)  # the pace of a real model's tokens
            yield piece
        prompt = sum(estimate_tokens(m.content) for m in request.messages)
        yield Usage(prompt, len(pieces))
