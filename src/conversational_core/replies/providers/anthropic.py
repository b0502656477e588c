"""Anthropic's Messages API through the official `anthropic` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
from anthropic import AsyncAnthropic

from conversational_core.replies.providers.base import (
    ChatMessage,
    CompletionRequest,
    Provider,
    Usage,
    translate_sdk_error,
)


def _alternating(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The Messages API wants user/assistant turns alternating and starting with the user:
    consecutive turns of one role are joined."""
    turns: list[dict[str, str]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + message.content
        else:
            turns.append({"role": role, "content": message.content})
    if turns and turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": "(conversation continues)"})
    return turns


class AnthropicProvider(Provider):
    name = "anthropic"

    def __init__(self, *, api_key: str | None, base_url: str | None, timeout: float) -> None:
        self._client = AsyncAnthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the worker retries (before the first token only)
        )

    async def close(self) -> None:
        await self._client.close()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[str | Usage]:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        kwargs: dict[str, object] = {}
        if system:
            kwargs["system"] = system
        if request.temperature is not None:
            kwargs["temperature"] = min(request.temperature, 1.0)  # Anthropic's range is 0-1
        try:
            async with self._client.messages.stream(
                model=request.model,
                max_tokens=request.max_tokens,
                messages=_alternating(request.messages),  # type: ignore[arg-type]
                **kwargs,  # type: ignore[arg-type]
            ) as stream:
                async for text in stream.text_stream:
                    if text:
                        yield text
                final = await stream.get_final_message()
                yield Usage(final.usage.input_tokens, final.usage.output_tokens)
        except anthropic.AnthropicError as exc:
            raise translate_sdk_error(exc, anthropic) from None
