"""The built-in development provider: a deterministic, clearly labelled reply, streamed at a
configurable pace, so that the service works out of the box with no model configured.

With tools, it calls one when the user's last message names a declared tool (or tool_choice
names one, or is `required`): a short text, then the call, its arguments in two pieces — so that
a whole tool round-trip works without a model. After tool results it sums them up.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uuid_utils

from conversational_core.replies.context import estimate_tokens
from conversational_core.replies.providers.base import (
    CompletionRequest,
    Item,
    Piece,
    Provider,
    Usage,
)
from conversational_core.storage.models import TOOL_CALL, TOOL_RESULT


def _quoted(text: str, limit: int = 120) -> str:
    quoted = " ".join(text.split())
    return quoted if len(quoted) <= limit else quoted[: limit - 3] + "..."


def _tool_to_call(request: CompletionRequest, last: str) -> dict[str, Any] | None:
    tools = request.tools or []
    choice = request.tool_choice or "auto"
    if not tools or choice == "none":
        return None
    named = {t["name"]: t for t in tools}
    if choice in named:
        return named[choice]
    for tool in tools:
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(tool['name'])}(?![A-Za-z0-9_])", last):
            return tool
    return tools[0] if choice == "required" else None


def _arguments(tool: dict[str, Any], last: str) -> bytes:
    """The user's text for each required string parameter (the first property when none is
    required): arguments that fit the usual one-argument tool."""
    schema = tool.get("parameters") or {}
    properties: dict[str, Any] = schema.get("properties") or {}
    names = [n for n in schema.get("required") or [] if n in properties] or list(properties)[:1]
    args = {n: _quoted(last) for n in names if properties[n].get("type", "string") == "string"}
    return orjson.dumps(args)


class DevProvider(Provider):
    name = "dev"

    def __init__(self, delay_seconds: float = 0.03) -> None:
        self._delay = delay_seconds

    @staticmethod
    def reply_for(request: CompletionRequest) -> str:
        previous = request.messages[-1] if request.messages else None
        sent = len(request.messages)
        counted = f"({sent} message{'' if sent == 1 else 's'} sent to it)"
        if previous is not None and previous.role == "tool":
            results = [p for p in previous.all_parts() if p["type"] == TOOL_RESULT]
            said = "; ".join(
                f"{p['tool_call_id']}{' (error)' if p['is_error'] else ''}: "
                + _quoted(p["output"], 80)
                for p in results
            )
            return (
                f"[development reply] The tools answered: {said}. This answer comes from the "
                f"built-in development provider {counted}; set LLM_PROVIDER to reach a real model."
            )
        last = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        return (
            f'[development reply] You said: "{_quoted(last)}". This answer comes from the built-in '
            f"development provider {counted}; set LLM_PROVIDER to reach a real model."
        )

    async def title(self, first_message: str, model: str) -> str:
        """The first words of the first message (no model to ask)."""
        words = first_message.split()
        title = " ".join(words[:6])
        if len(words) > 6 or len(title) > 60:
            title = title[:60].rstrip(" ,.;:") + "…"
        return title

    async def _pace(self) -> None:
        if self._delay:
            await asyncio.sleep(self._delay)  # the pace of a real model's tokens

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Item]:
        prompt = sum(estimate_tokens(m.content) for m in request.messages)
        previous = request.messages[-1] if request.messages else None
        last = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        tool = None
        if previous is None or previous.role != "tool":
            tool = _tool_to_call(request, last)
        if tool is not None:
            text = f"[development reply] Calling {tool['name']}."
            await self._pace()
            yield text
            args = _arguments(tool, last).decode()
            call_id = f"call_{uuid_utils.uuid4().hex[:24]}"
            await self._pace()
            yield Piece(TOOL_CALL, "", key=0, id=call_id, name=tool["name"])
            half = len(args) // 2
            for piece in (args[:half], args[half:]):
                await self._pace()
                yield Piece(TOOL_CALL, piece, key=0)
            yield Usage(prompt, 3 + len(args) // 4)
            return
        text = self.reply_for(request)
        words = text.split(" ")
        pieces = [w + " " for w in words[:-1]] + [words[-1]]
        pieces = pieces[: max(1, request.max_tokens)]
        for piece in pieces:
            await self._pace()
            yield piece
        yield Usage(prompt, len(pieces))
