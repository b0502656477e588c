"""Paced reads (issue 12): under load the worker reads each provider stream once per delta
window, and what the model wrote meanwhile comes in one read, one delta.

- `batched` waits a window between two reads (the first is not held back), and none while a
  reply is alone;
- the OpenAI and Anthropic providers, over real HTTP from a server of the test's own, hand over
  what came during the wait in one read, the end of the stream included, and leave their
  connection unread meanwhile (the SDKs' aiohttp transport is reachable: if a new SDK release
  hid it, the first test here fails rather than the relay silently getting slower);
- a provider that only streams (no connection of its own) gets its items gathered: what it
  yielded while nobody read comes at once, and an error after them comes after them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from conversational_core.replies.assembly import batched
from conversational_core.replies.providers.anthropic import AnthropicProvider
from conversational_core.replies.providers.base import (
    ChatMessage,
    CompletionRequest,
    Piece,
    Provider,
    ProviderError,
    Usage,
    _Holder,
    gathered,
)
from conversational_core.replies.providers.openai import OpenAIProvider
from tests.fixtures.sse_server import LAST_CHUNK, STREAM_HEAD, http_chunk, sse_event, whole_request

REQUEST = CompletionRequest("m", [ChatMessage("user", "hi")], None, 10)


def _openai_token(text: str) -> bytes:
    return sse_event({"choices": [{"index": 0, "delta": {"content": text}}]})


def _anthropic_token(text: str) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return sse_event(
        {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
    )


_OPENAI_END = [
    sse_event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
    b"data: [DONE]\n\n",
]
_ANTHROPIC_START = [
    sse_event(
        {
            "type": "message_start",
            "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                        "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}},
        },
        "message_start",
    ),
    sse_event(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    ),
]  # fmt: skip
_ANTHROPIC_END = [
    sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    sse_event({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 4}}, "message_delta"),
    sse_event({"type": "message_stop"}, "message_stop"),
]  # fmt: skip


class _StepServer(asyncio.Protocol):
    """Answers a request with the head of an event stream and `first`, then writes each
    event of `later` as its own chunk (its own TCP segment, a loop turn apart) when the test
    calls `go`, and ends the body."""

    def __init__(self, first: list[bytes], later: list[bytes]) -> None:
        self.first, self.later = first, later
        self.buffer = b""
        self.answered = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answered.is_set() or not whole_request(self.buffer):
            return
        self.transport.write(STREAM_HEAD + b"".join(map(http_chunk, self.first)))
        self.answered.set()

    async def go(self) -> None:
        for event in self.later:
            self.transport.write(http_chunk(event))
            await asyncio.sleep(0)  # one write a loop turn: separate segments
        self.transport.write(LAST_CHUNK)


async def _serve(
    first: list[bytes], later: list[bytes]
) -> tuple[asyncio.Server, list[_StepServer]]:
    servers: list[_StepServer] = []

    def make() -> _StepServer:
        servers.append(_StepServer(first, later))
        return servers[-1]

    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    return server, servers


def _openai(port: int) -> Provider:
    return OpenAIProvider(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", timeout=5)


def _anthropic(port: int) -> Provider:
    return AnthropicProvider(
        api_key="x", base_url=f"http://127.0.0.1:{port}", timeout=5, reasoning_budget=0
    )


def _texts(items: list[Any]) -> list[str | Usage]:
    return [i if isinstance(i, str | Usage) else cast(Piece, i).text for i in items]


@pytest.mark.parametrize(
    ("make", "first", "token", "end"),
    [
        (_openai, [], _openai_token, _OPENAI_END),
        (_anthropic, _ANTHROPIC_START, _anthropic_token, _ANTHROPIC_END),
    ],
    ids=["openai", "anthropic"],
)
async def test_a_paced_read_takes_what_the_model_wrote_meanwhile_in_one_go(
    make: Callable[[int], Provider],
    first: list[bytes],
    token: Callable[[str], bytes],
    end: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held: list[bool] = []  # the connection's transport reading, after each hold and release
    hold, release = _Holder.hold, _Holder.release

    def watch_hold(self: _Holder) -> Any:
        protocol = hold(self)  # (None once the body has all come: nothing to hold)
        if protocol is not None:
            held.append(protocol.transport.is_reading())
        return protocol

    def watch_release(protocol: Any) -> None:
        release(protocol)
        held.append(protocol.transport.is_reading())

    monkeypatch.setattr(_Holder, "hold", watch_hold)
    monkeypatch.setattr(_Holder, "release", staticmethod(watch_release))
    server, answered = await _serve([*first, token("a")], [token(t) for t in "bcd"] + end)
    provider = make(server.sockets[0].getsockname()[1])
    reads = cast(Any, provider.reads(REQUEST, lambda: 0.05))
    try:
        assert _texts(await anext(reads)) == ["a"]
        assert held == [False]  # not read while the worker waits (the SDK's transport reached)
        await answered[0].go()  # four writes, then the end of the body
        later = await anext(reads)
        assert held == [False, True]
        assert _texts(later) == ["b", "c", "d", Usage(3, 4)]  # one read, the end included
        with pytest.raises(StopAsyncIteration):
            await anext(reads)
    finally:
        await reads.aclose()
        await provider.close()
        server.close()


async def _first_and_rest(
    make: Callable[[int], Provider], pace: Callable[[], float], wait: float = 0.0
) -> tuple[list[str | Usage], list[str | Usage]]:
    """What a provider's first read gives, and the rest once the model has written the end of
    its reply (after `wait` seconds of a worker that does not read)."""
    server, answered = await _serve([_openai_token("a")], [_openai_token("b"), *_OPENAI_END])
    provider = make(server.sockets[0].getsockname()[1])
    reads = cast(Any, provider.reads(REQUEST, pace))
    try:
        first = _texts(await anext(reads))
        await answered[0].go()
        if wait:
            await asyncio.sleep(wait)  # a worker far behind: time is the point
        rest = [item async for read in reads for item in _texts(read)]
    finally:
        await reads.aclose()
        await provider.close()
        server.close()
    return first, rest


async def test_a_held_connection_does_not_time_out_while_the_worker_waits() -> None:
    """The read timeout measures the model: a wait of the worker's longer than it is no
    timeout (aiohttp stops its timer while reading is paused, and starts it again after)."""

    def impatient(port: int) -> Provider:
        return OpenAIProvider(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", timeout=0.2)

    first, rest = await _first_and_rest(impatient, lambda: 1.0, wait=0.5)
    assert first == ["a"]
    assert rest == ["b", Usage(3, 4)]


async def test_unpaced_reads_come_as_the_model_writes() -> None:
    first, rest = await _first_and_rest(_openai, lambda: 0.0)  # a reply alone: no pace
    assert first == ["a"]
    assert rest == ["b", Usage(3, 4)]


async def _reads_of(lists: list[list[int]], read_at: list[float]) -> AsyncIterator[list[int]]:
    loop = asyncio.get_running_loop()
    for items in lists:
        read_at.append(loop.time())
        yield items


async def test_batched_waits_a_window_between_reads_but_not_before_the_first() -> None:
    loop = asyncio.get_running_loop()
    read_at: list[float] = []
    began = loop.time()
    batches = [b async for b in batched(_reads_of([[1], [2, 3], [4]], read_at), lambda: 0.02)]
    assert batches == [[1], [2, 3], [4]]
    assert read_at[0] - began < 0.02
    gaps = [later - before for before, later in itertools.pairwise(read_at)]
    assert all(gap >= 0.019 for gap in gaps), gaps


async def test_batched_does_not_wait_for_the_end_after_the_usage() -> None:
    usage = Usage(3, 2)
    reads = _reads_of([[1], [2, usage]], [])  # type: ignore[list-item]
    loop = asyncio.get_running_loop()
    began = loop.time()
    batches = [b async for b in batched(cast(Any, reads), lambda: 0.3)]
    assert batches == [[1], [2, usage]]
    assert loop.time() - began < 0.55  # one window (after the first read), not two


async def test_batched_reads_on_at_once_while_a_reply_is_alone() -> None:
    loop = asyncio.get_running_loop()
    read_at: list[float] = []
    batches = batched(_reads_of([[1], [2], [3]], read_at), lambda: 0.0)
    began = loop.time()
    assert [b async for b in batches] == [[1], [2], [3]]
    assert loop.time() - began < 1.0


async def test_a_streaming_provider_gets_what_it_wrote_meanwhile_gathered() -> None:
    wrote = asyncio.Event()

    async def stream() -> AsyncIterator[str]:
        yield "a"
        await asyncio.sleep(0)
        for text in "bcd":
            yield text  # no await between them: nobody reads meanwhile
        wrote.set()
        raise ProviderError("cut", retryable=True)

    reads = cast(Any, gathered(stream()))
    try:
        assert await anext(reads) == ["a"]
        await wrote.wait()
        assert await anext(reads) == ["b", "c", "d"]
        with pytest.raises(ProviderError):
            await anext(reads)  # the error after what came before it
    finally:
        await reads.aclose()
