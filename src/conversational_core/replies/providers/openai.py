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
- Tools as `tools` (`type: function`) and `tool_choice` only when the conversation has tools;
  calls stream back as `tool_calls` deltas (arguments in pieces, by index), results go as `tool`
  messages; images as `image_url` content parts (any other file type is refused: the reply
  fails with a readable error).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlparse

import httpx2
import msgspec
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient

from conversational_core.replies.providers.base import (
    CUT_OFF,
    MALFORMED,
    UNREADABLE,
    ChatMessage,
    CompletionRequest,
    Item,
    Piece,
    Provider,
    ProviderError,
    Stop,
    StreamEnd,
    Usage,
    each_item,
    endpoint_url,
    is_image,
    stream_events,
    unsupported,
)
from conversational_core.storage.models import (
    FILE,
    REASONING,
    TEXT,
    TOOL_CALL,
    TOOL_RESULT,
    Part,
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
        max_connections: int = 1000,
    ) -> None:
        self._max_tokens_param = (
            max_tokens_param if max_tokens_param != "auto" else default_max_tokens_param(base_url)
        )
        # Local servers (Ollama, llama.cpp, vLLM) take any key; the SDK insists on one.
        # The SDK's aiohttp transport (its `aiohttp` extra): a stream's bytes come in reads of
        # whatever has arrived, chunked coding undone in C, where its default (httpx) goes
        # through h11 and an anyio timeout per HTTP chunk — a server writes one per token, and
        # that was ~25 us of a token's worker CPU (bench/relay.py). Connections kept for every
        # reply a worker writes at once (WORKER_CONCURRENCY), not re-opened per reply.
        self._client = AsyncOpenAI(
            api_key=api_key or "not-needed",
            base_url=base_url,
            timeout=timeout,
            max_retries=0,  # the worker retries (before the first token only)
            http_client=DefaultAioHttpClient(
                timeout=timeout,
                limits=httpx2.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
            ),
        )

        # The endpoint as an absolute URL, made once: the SDK takes one as it is, where a path
        # is parsed and joined to the base URL on every request.
        self._url = endpoint_url(self._client, "/chat/completions")

    async def close(self) -> None:
        await self._client.close()

    def stream(self, request: CompletionRequest) -> AsyncIterator[Item]:
        return each_item(self.reads(request))

    async def reads(
        self, request: CompletionRequest, pace: Callable[[], float] = lambda: 0.0
    ) -> AsyncIterator[list[Item]]:
        messages: Any = openai_messages(request.messages)
        options: dict[str, Any] = {self._max_tokens_param: request.max_tokens}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.tools:
            options["tools"] = [
                {"type": "function", "function": {"name": t["name"],
                 "description": t.get("description", ""), "parameters": t["parameters"]}}
                for t in request.tools
            ]  # fmt: skip
            if request.tool_choice is not None:
                options["tool_choice"] = openai_tool_choice(request.tool_choice)
        body = {
            "model": request.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **options,
        }
        # Through the SDK's generic `post`, the events read raw (base.stream_events says why).
        end = StreamEnd()  # `[DONE]` (stream_events), or a choice's `finish_reason` (chunk_items)
        events = stream_events(
            self._client, self._url, body, openai, openai.OpenAIError, pace, end, decode_chunk
        )
        async with contextlib.aclosing(events):
            try:
                async for chunks in events:
                    items: list[Item] = []
                    try:
                        add_items(items, chunks, end)
                    except (ProviderError, *MALFORMED):
                        if items:
                            yield items  # the pieces before the failing chunk first
                        raise
                    if items:
                        yield items
            # JSON of another shape than a chunk's
            except MALFORMED:
                raise ProviderError(UNREADABLE, retryable=True) from None
        if not end.done:
            # The body ended with neither a finish reason nor `[DONE]`: cut short (a proxy
            # that closed it), or no answer at all.
            raise ProviderError(CUT_OFF, retryable=True)


_TOLD = ("length", "content_filter")  # finish reasons a user is told of (the others: an answer)


# A chunk as the fields a reply reads from it, decoded by msgspec straight from the event's
# JSON: the others (`id`, `object`, `created`, `model`, `logprobs`, ...) are skipped without
# being built, and no dict is made for the chunk, its choice or its delta. Against orjson's
# dicts read with `get`: ~0.8 against ~1.8 us a token in the worker (a vLLM chunk, measured),
# where every token is one chunk. The fields are as lenient as a dict's `get` was (`Any`); a
# chunk or choice that is not an object, a delta neither an object nor null, or `choices`
# neither an array nor null, fails the decode (UNDECODABLE), as it failed the reads before
# (MALFORMED; but for `choices: {}`, read before as none): UNREADABLE. No cycle can be made of
# decoded JSON, so the structs are left out of the garbage collector's tracking (gc=False).
class _Delta(msgspec.Struct, gc=False):
    content: Any = None
    reasoning_content: Any = None
    reasoning: Any = None
    tool_calls: Any = None


class _Choice(msgspec.Struct, gc=False):
    delta: _Delta | None = None
    finish_reason: Any = None


class Chunk(msgspec.Struct, gc=False):
    """A chat-completion chunk, as read (see above)."""

    choices: list[_Choice] | None = None
    usage: Any = None
    error: Any = None


decode_chunk = msgspec.json.Decoder(Chunk).decode


def add_items(items: list[Item], chunks: list[Chunk], end: StreamEnd | None = None) -> None:
    """Add to `items` what the chunks of a read hold for the reply, as chunk_items does each,
    in order (those before a chunk that fails are added). Most chunks are one choice adding
    text and nothing else: those are read here, a call and a list less a token (a worker's
    instructions a token read in bulk: ~12,800 against ~14,700; callgrind)."""
    for chunk in chunks:
        choices = chunk.choices
        if choices and len(choices) == 1 and not (chunk.usage or chunk.error):
            choice = choices[0]
            delta = choice.delta
            if delta is not None and not (
                choice.finish_reason
                or delta.tool_calls
                or delta.reasoning_content
                or delta.reasoning
            ):
                if delta.content:
                    items.append(delta.content)
                continue
        items += chunk_items(chunk, end)


def chunk_items(chunk: Chunk, end: StreamEnd | None = None) -> list[Item]:
    """What one chat-completion chunk holds for the reply; a choice that says why it finished
    marks `end` done. A chunk with an `error` (vLLM reports a failure during the stream so)
    fails the reply."""
    if chunk.error:
        raise ProviderError("The AI provider failed while answering.", retryable=True)
    items: list[Item] = []
    for choice in chunk.choices or ():
        delta = choice.delta
        finish = choice.finish_reason
        if finish:
            if end is not None:
                end.done = True
            if finish in _TOLD:
                items.append(Stop(finish))
        if delta is None:
            continue
        # DeepSeek, vLLM and llama.cpp's server stream the model's thinking as
        # `reasoning_content` (newer vLLM: `reasoning`), beside the answer.
        thought = delta.reasoning_content or delta.reasoning
        if isinstance(thought, str) and thought:
            items.append(Piece(REASONING, thought, key="reasoning"))
        content = delta.content
        if content:
            items.append(content)
        for call in delta.tool_calls or ():
            fn = call.get("function") or {}
            # Calls are told apart by `index`; servers that send none (Gemini's compatible
            # endpoint) start each call with its `id`, and a piece with neither continues the
            # last call (assembly).
            key = call.get("index")
            if key is None and call.get("id"):
                key = ("id", call["id"])
            items.append(
                Piece(
                    TOOL_CALL,
                    fn.get("arguments") or "",
                    key=key,
                    id=call.get("id"),
                    name=fn.get("name"),
                )
            )
    usage = chunk.usage
    if usage:
        items.append(Usage(int(usage.get("prompt_tokens") or 0),
                           int(usage.get("completion_tokens") or 0)))  # fmt: skip
    return items


def openai_tool_choice(choice: str) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _image_url(part: Part) -> dict[str, Any]:
    if not is_image(part):
        raise unsupported(f"files of type {part.get('mime_type') or 'unknown'}", "openai")
    return {"type": "image_url", "image_url": {"url": part["url"]}}


def openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The chat-completions messages of a prompt. Reasoning is not sent back (DeepSeek refuses
    it, and the others ignore it); a tool message becomes one `tool` message per result (a
    tool message of plain text, written before tool calls existed, a user message)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        parts = message.all_parts()
        if message.role == "tool":
            for part in parts:
                if part["type"] == TOOL_RESULT:
                    output = part["output"]
                    if part["is_error"]:
                        output = f"Error: {output}"
                    out.append(
                        {"role": "tool", "tool_call_id": part["tool_call_id"], "content": output}
                    )
                elif part["type"] == TEXT:
                    out.append({"role": "user", "content": f"[tool output]\n{part['text']}"})
            continue
        if message.role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": message.content or None}
            calls = [
                {"id": p["id"], "type": "function",
                 "function": {"name": p["name"], "arguments": p["arguments"] or "{}"}}
                for p in parts if p["type"] == TOOL_CALL
            ]  # fmt: skip
            if calls:
                turn["tool_calls"] = calls
            if turn["content"] is not None or calls:
                out.append(turn)
            continue
        files = [p for p in parts if p["type"] == FILE]
        if not files:
            out.append({"role": message.role, "content": message.content})
            continue
        if message.role != "user":
            raise unsupported(f"files in {message.role} messages", "openai")
        content = [
            {"type": "text", "text": p["text"]} if p["type"] == TEXT else _image_url(p)
            for p in parts
            if p["type"] in (TEXT, FILE)
        ]
        out.append({"role": "user", "content": content})
    return out
