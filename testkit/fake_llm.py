"""A server speaking OpenAI's chat-completions protocol, streaming included, for the tests and the
benchmarks: the service talks to it through the real `openai` SDK over real HTTP.

Replies are scripted (:class:`Reply`: tokens, their pace, a pause to hold a stream open;
:class:`Fail`: an HTTP error), every request's body and headers are recorded, and the streams
started, finished and aborted (the client closed it) are counted. Like llama-cpp-python's
server, it can refuse any `null` in a request (`rejects_nulls`; that server answers such
validation errors as HTTP 500).

Two ways to run it:
- in the test's event loop, controlled from Python: ``async with FakeLLMServer(FakeLLM()) as
  llm`` (``llm.url`` is the base URL to give the service);
- as a process of its own (the benchmarks): ``uvicorn testkit.fake_llm:bench_app``, controlled
  over HTTP: ``PUT /fake/config`` ``{"first_delay_ms", "tokens", "token_delay_ms"}`` sets the
  default reply, ``GET|DELETE /fake/first-tokens`` the timing of tagged requests, ``GET
  /fake/stats`` the stream counts.

A request is tagged by `[bench:<tag>]` in its last user message; for a tagged request the wall
clock (`time.time()`) is recorded when its body was read (`received`) and when its first content
chunk had been handed to the kernel (`first_token`: the generator resumes right after uvicorn's
`transport.write` of that chunk).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from testkit.ports import ServedApp

_TAG = re.compile(r"\[bench:([A-Za-z0-9_-]{1,64})\]")


@dataclass
class Fail:
    status: int
    retry_after: float | None = None
    message: str = "internal details that must not reach users"


@dataclass
class Reply:
    tokens: list[str]
    delay: float = 0.0  # seconds before each token
    first_delay: float | None = None  # before the first token, when it differs from `delay`
    hold_after: int | None = None  # pause after this many tokens until `release` is set
    usage: tuple[int, int] | None = (11, 7)  # (prompt, completion) tokens, None: not reported
    # Raw `delta` objects to stream instead of `tokens` (reasoning_content, tool_calls…), and
    # the finish reason ("tool_calls" after calls).
    deltas: list[dict[str, Any]] | None = None
    finish: str = "stop"


def tool_call_deltas(
    calls: list[tuple[str, str, str]], pieces: int = 3, text: str = ""
) -> list[dict[str, Any]]:
    """The deltas of an OpenAI reply calling tools [(id, name, arguments)], as OpenAI streams
    them: some text, then per call a first delta with its index, id and name, then its
    arguments in `pieces` pieces."""
    out: list[dict[str, Any]] = [{"content": text}] if text else []
    for index, (call_id, name, arguments) in enumerate(calls):
        out.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})  # fmt: skip
        step = max(1, -(-len(arguments) // pieces))
        for at in range(0, len(arguments), step):
            piece = {"arguments": arguments[at : at + step]}
            out.append({"tool_calls": [{"index": index, "function": piece}]})
    return out


def token(i: int) -> str:
    """The benchmarks' token i: a reply of n tokens is `reply_text(n)`."""
    return f"t{i} "


def reply_text(tokens: int) -> str:
    return "".join(token(i) for i in range(tokens))


def tag_message(tag: str, text: str = "hello") -> str:
    """A user message the fake recognises as `tag`."""
    return f"{text} [bench:{tag}]"


def bench_reply(
    first_delay_ms: float = 20.0, tokens: int = 10, token_delay_ms: float = 2.0
) -> Reply:
    return Reply(
        [token(i) for i in range(tokens)],
        delay=token_delay_ms / 1000,
        first_delay=first_delay_ms / 1000,
        usage=(10, tokens),
    )


@dataclass
class FakeLLM:
    default: Reply = field(default_factory=lambda: Reply(["Hello", ", ", "world", "!"]))
    script: list[Fail | Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's, by name
    rejects_nulls: bool = False
    streams_started: int = 0
    streams_finished: int = 0
    streams_aborted: int = 0
    most_open_streams: int = 0  # the most streams open at once
    first_tokens: dict[str, dict[str, float]] = field(default_factory=dict)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def text(self, reply: Reply | None = None) -> str:
        return "".join((reply or self.default).tokens)

    async def _completions(self, request: Request) -> Response:
        body: dict[str, Any] = orjson.loads(await request.body())
        received = time.time()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.rejects_nulls and _has_null(body):
            return JSONResponse(
                {"error": {"message": "Input should be a valid number", "type": "server_error"}},
                status_code=500,
            )
        step = self.script.pop(0) if self.script else self.default
        if isinstance(step, Fail):
            headers = {"retry-after": str(step.retry_after)} if step.retry_after is not None else {}
            return JSONResponse(
                {"error": {"message": step.message, "type": "server_error"}},
                status_code=step.status,
                headers=headers,
            )
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "only streaming here"}}, status_code=400)
        tag = _tag_of(body)
        if tag is not None:
            self.first_tokens[tag] = {"received": received}
        return StreamingResponse(self._chunks(step, body, tag), media_type="text/event-stream")

    async def _chunks(
        self, reply: Reply, body: dict[str, Any], tag: str | None
    ) -> AsyncIterator[bytes]:
        self.streams_started += 1
        open_now = self.streams_started - self.streams_finished - self.streams_aborted
        self.most_open_streams = max(self.most_open_streams, open_now)
        model = str(body.get("model", "fake"))
        created = int(time.time())

        def chunk(payload: dict[str, Any]) -> bytes:
            base = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
            return b"data: " + orjson.dumps({**base, **payload}) + b"\n\n"

        def choice(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        finished = False
        try:
            yield choice({"role": "assistant", "content": ""})
            for delta in reply.deltas or ():
                if reply.delay:
                    await asyncio.sleep(reply.delay)  # the model's pace
                yield choice(delta)
            for i, text in enumerate(reply.tokens if reply.deltas is None else ()):
                if reply.hold_after is not None and i == reply.hold_after:
                    self.holding.set()
                    await self.release.wait()
                pause = (
                    reply.first_delay if i == 0 and reply.first_delay is not None else reply.delay
                )
                if pause:
                    await asyncio.sleep(pause)  # the model's pace
                yield choice({"content": text})
                if i == 0 and tag is not None:
                    # Resumed right after the chunk was written to the socket.
                    self.first_tokens[tag]["first_token"] = time.time()
            yield choice({}, reply.finish)
            if reply.usage is not None and body.get("stream_options", {}).get("include_usage"):
                prompt, completion = reply.usage
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
                yield chunk({"choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"
            finished = True
            if tag is not None:
                self.first_tokens[tag]["done"] = time.time()  # its last byte written
        finally:
            if finished:
                self.streams_finished += 1
            else:
                self.streams_aborted += 1
                self.aborted.set()

    # Control over HTTP (a fake in a process of its own) -----------------------------------------

    async def _set_config(self, request: Request) -> Response:
        values = orjson.loads(await request.body())
        self.default = bench_reply(**values)
        return JSONResponse(values)

    async def _first_token_times(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.first_tokens = {}
            return Response(status_code=204)
        return Response(orjson.dumps(self.first_tokens), media_type="application/json")

    async def _stats(self, _: Request) -> Response:
        return JSONResponse(
            {
                "started": self.streams_started,
                "finished": self.streams_finished,
                "aborted": self.streams_aborted,
            }
        )

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._completions, methods=["POST"]),
                Route("/fake/config", self._set_config, methods=["PUT"]),
                Route("/fake/first-tokens", self._first_token_times, methods=["GET", "DELETE"]),
                Route("/fake/stats", self._stats, methods=["GET"]),
            ]
        )


def _tag_of(body: dict[str, Any]) -> str | None:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            found = _TAG.search(str(message.get("content", "")))
            return found.group(1) if found else None
    return None


def _has_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return False


class FakeLLMServer(ServedApp):
    """Runs a FakeLLM with uvicorn on a free port, in the current event loop."""

    def __init__(self, llm: FakeLLM) -> None:
        super().__init__(llm.app())
        self.llm = llm

    async def __aenter__(self) -> FakeLLM:  # type: ignore[override]
        await self.start()
        self.llm.url = f"{self.url}/v1"
        return self.llm


# `uvicorn testkit.fake_llm:bench_app`: the benchmarks' fake model, in a process of its own.
bench_app = FakeLLM(default=bench_reply()).app()
