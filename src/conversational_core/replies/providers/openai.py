"""Any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp's server,
LM Studio) through the official `openai` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
from openai import AsyncOpenAI

from conversational_core.replies.providers.base import (
    CONNECTION_ERROR,
    TIMEOUT_ERROR,
    CompletionRequest,
    Provider,
    ProviderError,
    Usage,
    error_for_status,
    retry_after_seconds,
)


def _translate(exc: openai.OpenAIError) -> ProviderError:
    if isinstance(exc, openai.APIStatusError):
        return error_for_status(exc.status_code, retry_after_seconds(exc.response.headers))
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(TIMEOUT_ERROR, retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(CONNECTION_ERROR, retryable=True)
    return ProviderError("The AI provider sent a response that could not be read.", retryable=True)


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
            raise _translate(exc) from None
        try:
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
                if chunk.usage is not None:
                    yield Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        except openai.OpenAIError as exc:
            raise _translate(exc) from None
        finally:
            await stream.close()
