"""A server speaking Anthropic's Messages API with streaming (`POST /v1/messages`, server-sent
events `message_start`, `content_block_start|delta|stop`, `message_delta`, `message_stop`), for
the tests: the service talks to it through the real `anthropic` SDK over real HTTP.

A reply is scripted as content blocks (:class:`Block`): `text`, `thinking` (with its signature,
sent as a `signature_delta` as Anthropic does) or `tool_use` (its input JSON in pieces, as
`input_json_delta`). Every request's body and headers are recorded.

    async with FakeAnthropicServer(FakeAnthropic()) as fake:   # fake.url: the base URL
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from testkit.ports import ServedApp


@dataclass
class Block:
    type: str  # "text" | "thinking" | "redacted_thinking" | "tool_use"
    pieces: list[str]  # text, thinking, or the tool input's JSON, in pieces (redacted: none)
    signature: str = ""  # thinking
    id: str = ""  # tool_use
    name: str = ""  # tool_use


@dataclass
class FakeAnthropic:
    script: list[list[Block]] = field(default_factory=list)
    default: list[Block] = field(default_factory=lambda: [Block("text", ["Hi", " there"])])
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's, by name
    delay: float = 0.0
    url: str = ""

    async def _messages(self, request: Request) -> Response:
        body: dict[str, Any] = orjson.loads(await request.body())
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if not body.get("stream"):
            return JSONResponse(
                {"type": "error", "error": {"type": "invalid_request_error", "message": "stream"}},
                status_code=400,
            )
        blocks = self.script.pop(0) if self.script else self.default
        return StreamingResponse(self._events(blocks, body), media_type="text/event-stream")

    async def _events(self, blocks: list[Block], body: dict[str, Any]) -> AsyncIterator[bytes]:
        def event(kind: str, data: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": body.get("model", "claude-fake"),
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        }
        yield event("message_start", {"type": "message_start", "message": message})
        for index, block in enumerate(blocks):
            if block.type == "text":
                start: dict[str, Any] = {"type": "text", "text": ""}
            elif block.type == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
            elif block.type == "redacted_thinking":  # (its data comes whole, in the start)
                start = {"type": "redacted_thinking", "data": block.signature}
            else:
                start = {"type": "tool_use", "id": block.id, "name": block.name, "input": {}}
            yield event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
            for piece in block.pieces:
                if self.delay:
                    await asyncio.sleep(self.delay)  # the model's pace
                if block.type == "text":
                    delta = {"type": "text_delta", "text": piece}
                elif block.type == "thinking":
                    delta = {"type": "thinking_delta", "thinking": piece}
                else:
                    delta = {"type": "input_json_delta", "partial_json": piece}
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            if block.type == "thinking":
                signature = {"type": "signature_delta", "signature": block.signature}
                yield event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": signature},
                )
            yield event("content_block_stop", {"type": "content_block_stop", "index": index})
        stop = "tool_use" if any(b.type == "tool_use" for b in blocks) else "end_turn"
        yield event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 17},
            },
        )
        yield event("message_stop", {"type": "message_stop"})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/messages", self._messages, methods=["POST"])])


class FakeAnthropicServer(ServedApp):
    """Runs a FakeAnthropic with uvicorn on a free port, in the current event loop."""

    def __init__(self, fake: FakeAnthropic) -> None:
        super().__init__(fake.app())
        self.fake = fake

    async def __aenter__(self) -> FakeAnthropic:  # type: ignore[override]
        await self.start()
        self.fake.url = self.url  # the SDK adds /v1/messages
        return self.fake


# `uvicorn testkit.fake_anthropic:bench_app`: bench/stream_parse.py's Anthropic model, in a
# process of its own: 500 pieces of text, then a tool call's input in 500 pieces.
bench_app = FakeAnthropic(
    default=[
        Block("text", ["tok "] * 500),
        Block("tool_use", ['{"q": "', *["abcd"] * 498, '"}'], id="toolu_1", name="search"),
    ]
).app()
