"""A fake OpenAI-compatible streaming server for the reply benchmarks (its own process).

`POST /v1/chat/completions` (stream=true) answers like OpenAI: a role chunk at once, then, after
`first_delay_ms`, `tokens` content chunks `token_delay_ms` apart, the finish chunk, a usage chunk
and `data: [DONE]`. The text of token i is `t<i> `, so a reply's full text is known in advance
(:func:`reply_text`).

For the time-to-first-token benchmark it records, per request, two wall-clock times
(`time.time()`): when the request's body had been read (`received`), and when the first content
chunk had been handed to the kernel (`first_token`: the generator resumes right after uvicorn's
`transport.write` of that chunk, and the time is taken there). Requests are told apart by a tag
`[bench:<tag>]` in the last user message (the one being answered); requests without a tag are
counted but not recorded.

Control (the benchmark's, not OpenAI's):
- `PUT /bench/config` `{"first_delay_ms": 20, "tokens": 10, "token_delay_ms": 2}`;
- `GET /bench/first-tokens` `{tag: {"received": t, "first_token": t}, …}`;
  `DELETE /bench/first-tokens` clears them;
- `GET /bench/stats` streams started / finished / aborted.

Run as `uvicorn bench.fake_llm:app --loop uvloop --http httptools --no-access-log`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_TAG = re.compile(r"\[bench:([A-Za-z0-9_-]{1,64})\]")


@dataclass
class Config:
    first_delay_ms: float = 20.0
    tokens: int = 10
    token_delay_ms: float = 2.0


def token(i: int) -> str:
    return f"t{i} "


def reply_text(tokens: int) -> str:
    """The full text of a reply of `tokens` tokens."""
    return "".join(token(i) for i in range(tokens))


def tag_message(tag: str, text: str = "hello") -> str:
    """A user message that the fake LLM will recognise as `tag`."""
    return f"{text} [bench:{tag}]"


class FakeLLM:
    def __init__(self) -> None:
        self.config = Config()
        self.first_tokens: dict[str, dict[str, float]] = {}
        self.started = 0
        self.finished = 0
        self.aborted = 0

    async def completions(self, request: Request) -> Response:
        body: dict[str, Any] = orjson.loads(await request.body())
        received = time.time()
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "only streaming here"}}, status_code=400)
        tag = None
        for message in reversed(body.get("messages", [])):
            if message.get("role") == "user":
                found = _TAG.search(str(message.get("content", "")))
                tag = found.group(1) if found else None
                break
        if tag is not None:
            self.first_tokens[tag] = {"received": received}
        return StreamingResponse(
            self._chunks(body, tag, self.config), media_type="text/event-stream"
        )

    async def _chunks(
        self, body: dict[str, Any], tag: str | None, config: Config
    ) -> AsyncIterator[bytes]:
        self.started += 1
        model = str(body.get("model", "fake"))
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            await asyncio.sleep(config.first_delay_ms / 1000)  # the model "thinks"
            for i in range(config.tokens):
                if i:
                    await asyncio.sleep(config.token_delay_ms / 1000)  # the model's pace
                yield chunk({"content": token(i)})
                if i == 0 and tag is not None:
                    # Resumed right after the chunk was written to the socket.
                    self.first_tokens[tag]["first_token"] = time.time()
            yield chunk({}, "stop")
            if body.get("stream_options", {}).get("include_usage"):
                usage = {
                    "prompt_tokens": 10,
                    "completion_tokens": config.tokens,
                    "total_tokens": 10 + config.tokens,
                }
                payload = {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                yield b"data: " + orjson.dumps(payload) + b"\n\n"
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if finished:
                self.finished += 1
            else:
                self.aborted += 1

    async def set_config(self, request: Request) -> Response:
        values = orjson.loads(await request.body())
        self.config = Config(**values)
        return JSONResponse(self.config.__dict__)

    async def first_token_times(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.first_tokens = {}
            return Response(status_code=204)
        return Response(orjson.dumps(self.first_tokens), media_type="application/json")

    async def stats(self, _: Request) -> Response:
        return JSONResponse(
            {"started": self.started, "finished": self.finished, "aborted": self.aborted}
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.completions, methods=["POST"]),
                Route("/bench/config", self.set_config, methods=["PUT"]),
                Route("/bench/first-tokens", self.first_token_times, methods=["GET", "DELETE"]),
                Route("/bench/stats", self.stats, methods=["GET"]),
            ]
        )


app = FakeLLM().app()
