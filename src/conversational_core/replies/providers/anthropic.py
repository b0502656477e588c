"""Anthropic's Messages API through the official `anthropic` SDK.

Parts map to content blocks: text, images (`image` with a URL or base64 source, from `file`
parts; PDFs as `document`), `tool_use` / `tool_result` for tool calls and results, and `thinking`
blocks for reasoning this provider wrote (with their signature, which Anthropic wants back on the
next turn of a tool round). Reasoning another provider wrote is not sent (it has no signature).
LLM_REASONING_BUDGET_TOKENS > 0 turns extended thinking on.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx2
import orjson
from anthropic import AsyncAnthropic, DefaultAioHttpClient

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

NAME = "anthropic"


def _file_block(part: Part) -> dict[str, Any]:
    url: str = part["url"]
    mime = part.get("mime_type") or ""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        media = header[5:].split(";", 1)[0]
        kind = "image" if media.startswith("image/") else "document"
        if kind == "document" and media != "application/pdf":
            raise unsupported(f"files of type {media or 'unknown'}", NAME)
        return {"type": kind, "source": {"type": "base64", "media_type": media, "data": data}}
    if is_image(part):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if mime == "application/pdf" or url.split("?", 1)[0].lower().endswith(".pdf"):
        return {"type": "document", "source": {"type": "url", "url": url}}
    raise unsupported(f"files of type {mime or 'unknown'}", NAME)


def _arguments(text: str) -> Any:
    try:
        value = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {}  # what the model wrote was not JSON; the call is still shown to it
    return value if isinstance(value, dict) else {}


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in message.all_parts():
        kind = part["type"]
        if kind == TEXT:
            text = part["text"]
            if message.role == "tool":
                text = f"[tool output]\n{text}"
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == FILE:
            blocks.append(_file_block(part))
        elif kind == REASONING:
            data = part.get("provider_data") or {}
            if data.get("provider") != NAME:
                continue
            if data.get("redacted"):  # thinking the model's provider sent encrypted
                blocks.append({"type": "redacted_thinking", "data": data["redacted"]})
            elif data.get("signature"):
                blocks.append(
                    {"type": "thinking", "thinking": part["text"], "signature": data["signature"]}
                )
        elif kind == TOOL_CALL:
            blocks.append({"type": "tool_use", "id": part["id"], "name": part["name"],
                           "input": _arguments(part["arguments"])})  # fmt: skip
        elif kind == TOOL_RESULT:
            blocks.append({"type": "tool_result", "tool_use_id": part["tool_call_id"],
                           "content": part["output"], "is_error": part["is_error"]})  # fmt: skip
    return blocks


def anthropic_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The Messages API wants user/assistant turns alternating and starting with the user:
    consecutive turns of one role are joined (tool results are a user turn)."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if turns and turns[0]["role"] == "assistant":
        opening = [{"type": "text", "text": "(conversation continues)"}]
        turns.insert(0, {"role": "user", "content": opening})
    return turns


def _tool_choice(choice: str) -> dict[str, Any]:
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    return {"type": "tool", "name": choice}


class AnthropicProvider(Provider):
    name = NAME

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout: float,
        reasoning_budget: int = 0,
        max_connections: int = 1000,
    ) -> None:
        # The SDK's aiohttp transport, as for OpenAI (providers/openai.py: a stream's bytes read
        # as they arrive rather than through h11 and a timeout per HTTP chunk).
        self._client = AsyncAnthropic(
            api_key=api_key,
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
        self._reasoning_budget = reasoning_budget
        # The endpoint as an absolute URL, made once (openai.py says why).
        self._url = endpoint_url(self._client, "/v1/messages")

    async def close(self) -> None:
        await self._client.close()

    def stream(self, request: CompletionRequest) -> AsyncIterator[Item]:
        return each_item(self.reads(request))

    async def reads(
        self, request: CompletionRequest, pace: Callable[[], float] = lambda: 0.0
    ) -> AsyncIterator[list[Item]]:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system")
        kwargs: dict[str, Any] = {}
        if system:
            kwargs["system"] = system
        budget = min(self._reasoning_budget, request.max_tokens - 1)
        # Extended thinking takes no forced tool (`any` or a named tool: Anthropic refuses the
        # pair), so a turn that forces one is asked without thinking.
        forced = bool(request.tools) and request.tool_choice not in (None, "auto", "none")
        if self._reasoning_budget and budget >= 1024 and not forced:  # (1024: the least budget)
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": budget}
        elif request.temperature is not None:  # (thinking takes no temperature)
            kwargs["temperature"] = min(request.temperature, 1.0)  # Anthropic's range is 0-1
        if request.tools:
            kwargs["tools"] = [
                {"name": t["name"], "description": t.get("description", ""),
                 "input_schema": t["parameters"]}
                for t in request.tools
            ]  # fmt: skip
            if request.tool_choice is not None:
                kwargs["tool_choice"] = _tool_choice(request.tool_choice)
        body = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": anthropic_messages(request.messages),
            "stream": True,
            **kwargs,
        }
        # Through the SDK's generic `post`, the events read raw (base.stream_events says why:
        # here also a pydantic snapshot of the whole message, updated on every event, which
        # re-parses a tool call's input so far on each piece of it).
        events = stream_events(
            self._client, self._url, body, anthropic, anthropic.AnthropicError, pace
        )
        async with contextlib.aclosing(events):
            usage = Usage(0, 0)
            try:
                async for read in events:
                    items: list[Item] = []
                    stopped = False
                    try:
                        for event in read:
                            if event.get("type") == "message_stop":
                                items.append(usage)
                                stopped = True
                                break
                            if event.get("type") == "message_delta":
                                told = _TOLD.get((event.get("delta") or {}).get("stop_reason"))
                                if told is not None:
                                    items.append(Stop(told))
                            piece, usage = event_items(event, usage)
                            if piece is not None:
                                items.append(piece)
                    except (ProviderError, *MALFORMED):
                        if items:
                            yield items  # the pieces before the failing event first
                        raise
                    if items:
                        yield items
                    if stopped:
                        return
            # JSON of another shape than an event's
            except MALFORMED:
                raise ProviderError(UNREADABLE, retryable=True) from None
        # The body ended without `message_stop`: the reply was cut short.
        raise ProviderError(CUT_OFF, retryable=True)


# Stop reasons a user is told of, by the names the OpenAI protocol gives them (the others are
# an answer: end_turn, stop_sequence, tool_use, pause_turn).
_TOLD: dict[Any, str] = {"max_tokens": "length", "refusal": "content_filter"}


def event_items(event: dict[str, Any], usage: Usage) -> tuple[Piece | None, Usage]:
    """What one Messages API stream event holds for the reply: a piece, and the usage so far
    (`message_start` has the input's, `message_delta` the output's, cumulative). An `error`
    event (e.g. `overloaded_error` mid-stream) fails the reply."""
    kind = event.get("type")
    if kind == "content_block_delta":
        delta = event["delta"]
        index = event.get("index", 0)
        match delta.get("type"):
            case "text_delta":
                return Piece(TEXT, delta["text"], key=index), usage
            case "thinking_delta":
                return Piece(REASONING, delta["thinking"], key=index), usage
            case "signature_delta":
                data = {"provider": NAME, "signature": delta["signature"]}
                return Piece(REASONING, "", key=index, provider_data=data), usage
            case "input_json_delta":
                return Piece(TOOL_CALL, delta["partial_json"], key=index), usage
        return None, usage
    if kind == "content_block_start":
        block = event["content_block"]
        if block.get("type") == "tool_use":
            piece = Piece(TOOL_CALL, "", key=event.get("index", 0), id=block["id"],
                          name=block["name"])  # fmt: skip
            return piece, usage
        if block.get("type") == "redacted_thinking":
            # Thinking sent encrypted (no text to show): kept, as a reasoning part with no
            # text, to be sent back with the turn (Anthropic requires it after tool use).
            data = {"provider": NAME, "redacted": block["data"]}
            return Piece(REASONING, "", key=event.get("index", 0), provider_data=data), usage
        return None, usage
    if kind == "message_start":
        counted = event["message"].get("usage") or {}
        return None, Usage(int(counted.get("input_tokens") or 0),
                           int(counted.get("output_tokens") or 0))  # fmt: skip
    if kind == "message_delta":
        counted = event.get("usage") or {}
        input_tokens = counted.get("input_tokens")
        return None, Usage(
            usage.input_tokens if input_tokens is None else int(input_tokens),
            int(counted.get("output_tokens") or usage.output_tokens),
        )
    if kind == "error":
        raise ProviderError("The AI provider failed while answering.", retryable=True)
    return None, usage  # ping, content_block_stop, and types added later
