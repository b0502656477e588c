"""Any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp's server,
LM Studio) through the official `openai` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
from openai import AsyncOpenAI

from conversational_core.replies.providers.base import (
    CompletionRequest,
    Provider,
    Usage,
    translate_sdk_error,
)


class OpenAIProvider(Provider):
    name = "openai"

    def __init__(self, *, api_key: str | None, base_url: str | None, timeout: float) -> None:
        # Local servers (Ollama, llama.cpp, vLLM) take any key; the SDK insists on one.
        self._client = AsyncOpenAI(
            api_key=api_key or "not-needed",
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the worker retries (before the first token only)
        )

    async def close(self) -> None:
        await self._client.close()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[str | Usage]:
        messages: Any = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            stream = await self._client.chat.completions.create(
                model=request.model,
                messages=messages,
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.OpenAIError as exc:
            raise translate_sdk_error(exc, openai) from None
        try:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
                if chunk.usage is not None:
                    yield Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        except openai.OpenAIError as exc:
            raise translate_sdk_error(exc, openai) from None
        finally:
            await stream.close()
