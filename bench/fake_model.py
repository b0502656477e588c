"""The relay benchmark's model: an OpenAI-compatible streaming server that can write hundreds of
thousands of tokens a second on one core, so that what the benchmark measures is us.

Why not testkit/fake_llm.py (Starlette): one `asyncio.sleep` and one response-body iteration per
token cost it ~30 µs a token, so at 500 streams x 2 ms (250,000 tokens/s offered) it would be the
bottleneck. Here one timer ticks for every stream, as a GPU server's decode step does: on each
tick each stream gets the tokens that are due by then (pre-rendered chunks, one `write`), so a
stream is one chunk a token while the fake keeps up, and several chunks in one write when it
falls behind (what the bytes of a real server look like then).

HTTP/1.1 by hand on an asyncio Protocol (keep-alive, chunked responses): only what the `openai`
SDK's requests need. Control:
- `PUT /fake/config` {"first_delay_ms", "tokens", "token_delay_ms"}: the replies from now on.
- `GET /fake/streams`: per tagged request (the user message's `[bench:<tag>]`, testkit.fake_llm
  .tag_message) [received, first chunk written, last chunk written] as time.time(); `DELETE`
  forgets them.

Run: `python -m bench.fake_model PORT`.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import uvloop
from testkit.fake_llm import token

_TAG = re.compile(rb"\[bench:([A-Za-z0-9_-]{1,64})\]")


@dataclass
class Config:
    first_delay_ms: float = 20.0
    tokens: int = 20
    token_delay_ms: float = 5.0


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Rendered:
    """The SSE bytes of one configuration's reply, rendered once."""

    config: Config
    role: bytes = b""
    tokens: list[bytes] = field(default_factory=list)
    end: bytes = b""

    @classmethod
    def of(cls, config: Config) -> Rendered:
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}

        def chunk(payload: dict[str, Any]) -> bytes:
            return b"data: " + orjson.dumps({**base, "model": "fake", **payload}) + b"\n\n"

        def choice(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        usage = {
            "prompt_tokens": 10,
            "completion_tokens": config.tokens,
            "total_tokens": 10 + config.tokens,
        }
        return cls(
            config,
            role=choice({"role": "assistant", "content": ""}),
            tokens=[choice({"content": token(i)}) for i in range(config.tokens)],
            end=choice({}, "stop") + chunk({"choices": [], "usage": usage}) + b"data: [DONE]\n\n",
        )


@dataclass
class Stream:
    transport: asyncio.Transport
    rendered: Rendered
    start: float  # loop.time() the request was read
    tag: bytes | None
    sent: int = 0


HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    b"cache-control: no-cache\r\n\r\n"
)


class FakeModel:
    def __init__(self) -> None:
        self.rendered = Rendered.of(Config())
        self.streams: list[Stream] = []
        self.times: dict[str, list[float]] = {}  # tag -> [received, first written, last written]
        self._wake = asyncio.Event()

    def start_stream(self, transport: asyncio.Transport, body: bytes) -> None:
        found = _TAG.search(body)
        tag = found.group(1) if found else None
        now = time.time()
        if tag is not None:
            self.times[tag.decode()] = [now, 0.0, 0.0]
        transport.write(HEAD + _http_chunk(self.rendered.role))
        loop = asyncio.get_running_loop()
        self.streams.append(Stream(transport, self.rendered, loop.time(), tag))
        self._wake.set()

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.streams:
                self._wake.clear()
                await self._wake.wait()
            config = self.rendered.config
            step = max(0.0005, min(config.token_delay_ms, config.first_delay_ms or 1e9) / 1000)
            await asyncio.sleep(step)  # the model's decode step: time is the point
            now = loop.time()
            wall = time.time()
            keep: list[Stream] = []
            for stream in self.streams:
                if stream.transport.is_closing():
                    continue
                cfg = stream.rendered.config
                elapsed = now - stream.start - cfg.first_delay_ms / 1000
                due = 0 if elapsed < 0 else 1 + int(elapsed * 1000 / cfg.token_delay_ms)
                due = min(cfg.tokens, due)
                if due > stream.sent:
                    data = b"".join(stream.rendered.tokens[stream.sent : due])
                    times = self.times.get(stream.tag.decode()) if stream.tag else None
                    if times is not None and stream.sent == 0:
                        times[1] = wall
                    stream.sent = due
                    if due == cfg.tokens:
                        data += stream.rendered.end
                        if times is not None:
                            times[2] = wall
                        stream.transport.write(_http_chunk(data) + b"0\r\n\r\n")
                        continue
                    stream.transport.write(_http_chunk(data))
                keep.append(stream)
            self.streams = keep

    def control(self, method: bytes, path: bytes, body: bytes) -> tuple[int, bytes]:
        if path == b"/fake/config" and method == b"PUT":
            self.rendered = Rendered.of(Config(**orjson.loads(body)))
            return 200, body
        if path == b"/fake/streams" and method == b"GET":
            return 200, orjson.dumps(self.times)
        if path == b"/fake/streams" and method == b"DELETE":
            self.times = {}
            return 200, b"{}"
        if path == b"/fake/stats":
            return 200, orjson.dumps({"streams": len(self.streams)})
        return 404, b'{"error": {"message": "not found"}}'


class Connection(asyncio.Protocol):
    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = head.split(b" ", 2)
            self.handle(method, path, body)

    def handle(self, method: bytes, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        if method == b"POST" and path.endswith(b"/chat/completions"):
            self.model.start_stream(self.transport, body)
            return
        status, payload = self.model.control(method, path, body)
        reason = b"OK" if status == 200 else b"Not Found"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason, len(payload), payload)
        )


async def serve(port: int) -> None:
    model = FakeModel()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(model), "127.0.0.1", port, backlog=4096)
    async with server:
        await model.tick()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
