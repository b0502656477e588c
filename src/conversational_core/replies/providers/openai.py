"""Any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp's server,
llama-cpp-python's server, LM Studio) through the official `openai` SDK.

What a request carries is what every one of those servers accepts (checked against their code):
- Only parameters that were configured. An unset one is left out, never sent as `null`:
  llama-cpp-python's server rejects `"temperature": null` (as an HTTP 500), and so did
  llama.cpp's server for a while in 2026; OpenAI's reasoning models reject any temperature.
- The output limit under one name only: OpenAI wants `max_completion_tokens` (its reasoning
  models refuse `max_tokens`, and both at once is an error), while llama-cpp-python and Ollama
  know only `max_tokens` and silently drop the other, which would leave the output unbounded.
  LLM_MAX_TOKENS_PARAM picks it; `auto` means `max_completion_tokens` for OpenAI's own API and
  `max_tokens` for everything else (llama.cpp's server and vLLM accept both).
- `stream_options.include_usage`, which every one of them accepts (llama-cpp-python ignores
  it and reports no usage: the worker then estimates it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import openai
from openai import AsyncOpenAI

from conversational_core.replies.providers.base import (
    CompletionRequest,
    Provider,
    Usage,
    translate_sdk_error,
)


def default_max_tokens_param(base_url: str | None) -> str:
    """`max_completion_tokens` for OpenAI's own API (and Azure OpenAI), `max_tokens` for the
    OpenAI-compatible servers, some of which know no other name."""
    host = (urlparse(base_url).hostname or "") if base_url else "api.openai.com"
    if host == "openai.com" or host.endswith((".openai.com", ".openai.azure.com")):
        return "max_completion_tokens"
    return "max_tokens"


class OpenAIProvider(Provider):
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout: float,
        max_tokens_param: str = "auto",
    ) -> None:
        self._max_tokens_param = (
            max_tokens_param if max_tokens_param != "auto" else default_max_tokens_param(base_url)
        )
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
        options: dict[str, Any] = {self._max_tokens_param: request.max_tokens}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        try:
            stream = await self._client.chat.completions.create(
                model=request.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **options,
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
