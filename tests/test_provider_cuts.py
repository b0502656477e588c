"""A model server that dies or goes silent in the middle of a reply: each provider reads what
came before, then fails with a ProviderError (retryable) that the worker turns into a failed
reply — never an unexpected exception that leaves the reply `streaming` until its job's retry.

Real HTTP from a server of the test's own that writes the start of a genuine stream (OpenAI's
chunks, Anthropic's events) and then cuts the connection or stops writing."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable
from typing import cast

import pytest

from conversational_core.replies.providers import base
from conversational_core.replies.providers.anthropic import AnthropicProvider
from conversational_core.replies.providers.base import (
    CUT_OFF,
    TIMEOUT_ERROR,
    UNREADABLE,
    ChatMessage,
    CompletionRequest,
    Provider,
    ProviderError,
    Stop,
    Usage,
)
from conversational_core.replies.providers.openai import OpenAIProvider
from tests.fixtures.sse_server import LAST_CHUNK, STREAM_HEAD, http_chunk, sse_event, whole_request

_OPENAI = [sse_event({"choices": [{"index": 0, "delta": {"content": "Hi"}}]})] * 2
_TEXT_DELTA = {
    "type": "content_block_delta",
    "index": 0,
    "delta": {"type": "text_delta", "text": "Hi"},
}
_ANTHROPIC = [
    sse_event(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "m",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 1},
            },
        },
        "message_start",
    ),
    sse_event(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start",
    ),
    *[sse_event(_TEXT_DELTA, "content_block_delta")] * 2,
]


class _CutServer(asyncio.Protocol):
    """Answers a request with the head of an event stream and `events`, then cuts the
    connection (`stall` False) or says nothing more (`stall` True); with `finish`, ends the
    body as a server that is done (the last chunk) instead."""

    def __init__(
        self, events: list[bytes], stall: bool, finish: bool = False, head: bytes = STREAM_HEAD
    ) -> None:
        self.events = events
        self.stall = stall
        self.finish = finish
        self.head = head
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not whole_request(self.buffer):
            return
        self.transport.write(self.head + b"".join(map(http_chunk, self.events)))
        if self.finish:
            self.transport.write(LAST_CHUNK)
        elif not self.stall:
            self.transport.abort()  # the model server died mid-reply


def _openai(port: int) -> Provider:
    return OpenAIProvider(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", timeout=0.5)


def _anthropic(port: int) -> Provider:
    return AnthropicProvider(
        api_key="x", base_url=f"http://127.0.0.1:{port}", timeout=0.5, reasoning_budget=0
    )


@pytest.mark.parametrize(
    ("make", "events"), [(_openai, _OPENAI), (_anthropic, _ANTHROPIC)], ids=["openai", "anthropic"]
)
@pytest.mark.parametrize(
    ("stall", "message"), [(False, CUT_OFF), (True, TIMEOUT_ERROR)], ids=["cut", "stall"]
)
async def test_a_stream_cut_or_stalled_mid_reply_fails_with_a_provider_error(
    make: Callable[[int], Provider], events: list[bytes], stall: bool, message: str
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _CutServer(events, stall), "127.0.0.1", 0)
    provider = make(server.sockets[0].getsockname()[1])
    request = CompletionRequest("m", [ChatMessage("user", "hi")], None, 10)
    texts: list[str] = []

    async def read() -> None:
        async for item in provider.stream(request):
            texts.append(item if isinstance(item, str) else getattr(item, "text", ""))

    try:
        with pytest.raises(ProviderError) as failed:
            await read()
    finally:
        await provider.close()
        server.close()
    assert texts == ["Hi", "Hi"]  # what came before the cut was read
    assert failed.value.message == message
    assert failed.value.retryable


async def _reads(
    make: Callable[[int], Provider], events: list[bytes], head: bytes = STREAM_HEAD
) -> tuple[list[object], ProviderError | None]:
    """What a provider yields for a body of `events` under `head` that then ends as a server
    that is done, and the error it raised, if any."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _CutServer(events, False, True, head), "127.0.0.1", 0)
    provider = make(server.sockets[0].getsockname()[1])
    items: list[object] = []
    try:
        async for item in provider.stream(CompletionRequest("m", [ChatMessage("user", "hi")],
                                                            None, 10)):  # fmt: skip
            items.append(item)
    except ProviderError as exc:
        return items, exc
    finally:
        await provider.close()
        server.close()
    return items, None


async def _anthropic_reads(events: list[bytes]) -> tuple[list[object], ProviderError | None]:
    return await _reads(_anthropic, events)


async def _openai_reads(
    events: list[bytes], head: bytes = STREAM_HEAD
) -> tuple[list[object], ProviderError | None]:
    return await _reads(_openai, events, head)


_DONE = [
    sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    sse_event({"type": "ping"}, "ping"),
    sse_event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 9},
        },
        "message_delta",
    ),
    sse_event({"type": "message_stop"}, "message_stop"),
]


async def test_anthropic_usage_comes_from_the_start_and_the_last_delta() -> None:
    items, error = await _anthropic_reads([*_ANTHROPIC, *_DONE])
    assert error is None
    assert [getattr(i, "text", None) for i in items[:2]] == ["Hi", "Hi"]
    assert items[2:] == [Usage(3, 9)]


async def test_an_anthropic_answer_cut_at_max_tokens_says_so() -> None:
    stopped = [
        *_DONE[:2],
        sse_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens"},
                "usage": {"output_tokens": 10},
            },
            "message_delta",
        ),
        _DONE[-1],
    ]
    items, error = await _anthropic_reads([*_ANTHROPIC, *stopped])
    assert error is None
    assert items[2:] == [Stop("length"), Usage(3, 10)]


async def test_anthropic_stream_ending_before_message_stop_is_a_cut() -> None:
    """The body ended as if the server were done, but the message never stopped: the reply was
    cut short, and is not taken for complete."""
    items, error = await _anthropic_reads([*_ANTHROPIC, *_DONE[:-1]])
    assert [getattr(i, "text", None) for i in items] == ["Hi", "Hi"]
    assert error is not None and error.message == CUT_OFF and error.retryable


_FINISH = sse_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


async def test_an_openai_stream_is_an_answer_only_once_it_says_it_ended() -> None:
    """A finish reason, or `[DONE]`, ends an answer; a body that just stops after some tokens
    (a proxy that closed it) or before any is a cut, retried while nothing was written."""
    for ending in ([_FINISH], [b"data: [DONE]\r\n\r\n"], [_FINISH, b"data: [DONE]\n\n"]):
        items, error = await _openai_reads([*_OPENAI, *ending])
        assert error is None and items == ["Hi", "Hi"], (ending, error)
    for events in (_OPENAI, []):
        items, error = await _openai_reads(events)
        assert items == ["Hi"] * len(events)
        assert error is not None and error.message == CUT_OFF and error.retryable


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"identity"])
async def test_an_event_stream_is_read_whatever_its_content_encoding(
    encoding: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uncompressed body is read straight from the transport; a compressed one (a proxy
    that gzips event streams) is decoded first: the same answer either way."""
    straight: list[object] = []
    raw_reads = base._raw_reads

    def watched(content: object) -> object:
        straight.append(content)
        return raw_reads(content)

    monkeypatch.setattr(base, "_raw_reads", watched)
    body = b"".join([*_OPENAI, _FINISH, b"data: [DONE]\n\n"])
    compressors: dict[bytes, Callable[[bytes], bytes]] = {
        b"gzip": gzip.compress,
        b"deflate": zlib.compress,
    }
    packed = compressors.get(encoding, bytes)(body)
    assert (packed == body) == (encoding == b"identity")
    head = STREAM_HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: " + encoding + b"\r\n\r\n")
    # In pieces, each its own HTTP chunk, as a server writes as it compresses.
    items, error = await _openai_reads([packed[:7], packed[7:20], packed[20:]], head)
    assert error is None
    assert items == ["Hi", "Hi"]
    assert len(straight) == (encoding == b"identity")  # (the SDK's aiohttp transport reached)


@pytest.mark.parametrize("make", [_openai, _anthropic], ids=["openai", "anthropic"])
@pytest.mark.parametrize(
    "head",
    [STREAM_HEAD + b"ZZZ\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"garbage\r\n\r\n"],
    ids=["chunk size", "status", "not http"],
)
async def test_an_answer_that_is_not_http_fails_with_a_provider_error(
    make: Callable[[int], Provider], head: bytes
) -> None:
    """A broken server or proxy: the reply fails with a ProviderError (retried before its
    first token), never an unexpected exception that leaves it `streaming` until its job's
    retry (the openai SDK lets aiohttp's parse error through)."""
    items, error = await _reads(make, [], head)
    assert items == []
    assert error is not None and error.retryable


class _BreakingServer(_CutServer):
    """A _CutServer that says when its connection is gone (the client closed it)."""

    def __init__(self, events: list[bytes]) -> None:
        super().__init__(events, stall=True)
        self.gone = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone.set()


async def _broken_reads(
    make: Callable[[int], Provider], events: list[bytes], then: bytes, wait: bool
) -> tuple[list[str], ProviderError]:
    """The texts a provider yields for a body of `events` (two tokens) that goes on with
    `then` once both are read (after the client has closed the connection on it, with
    `wait`: as if the reader were busy elsewhere meanwhile), and the error it ends with."""
    loop = asyncio.get_running_loop()
    servers: list[_BreakingServer] = []

    def serve() -> _BreakingServer:
        servers.append(_BreakingServer(events))
        return servers[-1]

    server = await loop.create_server(serve, "127.0.0.1", 0)
    provider = make(server.sockets[0].getsockname()[1])
    texts: list[str] = []

    async def read() -> None:
        async for item in provider.stream(CompletionRequest("m", [ChatMessage("user", "hi")],
                                                            None, 10)):  # fmt: skip
            texts.append(item if isinstance(item, str) else getattr(item, "text", ""))
            if texts == ["Hi", "Hi"]:
                servers[0].transport.write(then)  # after the tokens came: mid-body
                if wait:
                    await servers[0].gone.wait()  # the client parsed it and closed

    try:
        with pytest.raises(ProviderError) as failed:
            async with asyncio.timeout(10):  # (the provider's timeout is 0.5 s)
                await read()
    finally:
        await provider.close()
        server.close()
    return texts, failed.value


@pytest.mark.parametrize(
    ("make", "events"), [(_openai, _OPENAI), (_anthropic, _ANTHROPIC)], ids=["openai", "anthropic"]
)
@pytest.mark.parametrize("garbage", [b"ZZZ\r\n", b"3\r\nabcXX"], ids=["chunk size", "chunk end"])
async def test_bytes_that_are_not_http_in_the_middle_of_a_body_fail_the_reply(
    make: Callable[[int], Provider], events: list[bytes], garbage: bytes
) -> None:
    """A server or proxy that breaks the chunked coding after some tokens, while the reader
    waits for more: the reply fails as unreadable (retryable) within about a second, not at
    LLM_REPLY_MAX_SECONDS (aiohttp's parser closes the connection and stops its read timer,
    but leaves a waiting read waiting)."""
    texts, error = await _broken_reads(make, events, garbage, wait=False)
    assert texts == ["Hi", "Hi"]
    assert error.message == UNREADABLE and error.retryable


@pytest.mark.parametrize(
    ("make", "events", "more"),
    [
        (_openai, _OPENAI, _OPENAI[0]),
        (_anthropic, _ANTHROPIC, sse_event(_TEXT_DELTA, "content_block_delta")),
    ],
    ids=["openai", "anthropic"],
)
async def test_a_body_broken_between_two_reads_fails_the_reply_after_its_tokens(
    make: Callable[[int], Provider], events: list[bytes], more: bytes
) -> None:
    """A token and the break in one segment, while the reader is busy elsewhere (the worker
    publishing a delta): the token is read, then the reply fails as unreadable (aiohttp
    refuses the next read with a RuntimeError of its own, which once escaped as is)."""
    texts, error = await _broken_reads(make, events, http_chunk(more) + b"ZZZ\r\n", wait=True)
    assert texts == ["Hi", "Hi", "Hi"]  # the token before the break was not lost
    assert error.message == UNREADABLE and error.retryable


async def test_a_200_that_is_not_an_event_stream_is_unreadable() -> None:
    """A web page or a gateway's JSON error answered 200 (a wrong LLM_BASE_URL), or a server
    that ignored `stream`: not an empty answer, an error."""
    for media, body in [
        (b"text/html", b"<html>Gateway says hi</html>"),
        (b"application/json", b'{"error": {"message": "model overloaded", "code": 503}}'),
        (b"application/json", b'{"choices": [{"message": {"content": "not streamed"}}]}'),
    ]:
        head = STREAM_HEAD.replace(b"text/event-stream", media)
        assert head != STREAM_HEAD
        items, error = await _openai_reads([body], head)
        assert items == []
        assert error is not None and error.message == UNREADABLE and error.retryable


async def test_anthropic_error_event_mid_stream_fails_the_reply() -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    items, error = await _anthropic_reads([*_ANTHROPIC, sse_event(overloaded, "error")])
    assert len(items) == 2
    assert error is not None and error.retryable
    assert error.message == "The AI provider failed while answering."


@pytest.mark.parametrize(
    ("make", "events"),
    [
        (_openai, [_OPENAI[0], sse_event({"choices": "not a list of choices"})]),
        (_openai, [_OPENAI[0], sse_event({"choices": [{"delta": "not an object"}]})]),
        (_openai, [_OPENAI[0], b'data: ["a", "list", "for", "a", "chunk"]\n\n']),
        (_anthropic, [*_ANTHROPIC, sse_event({"type": "content_block_delta", "index": 0})]),
    ],
    ids=["openai", "openai-delta", "openai-array", "anthropic"],
)
async def test_an_event_of_another_shape_is_an_unreadable_answer(
    make: Callable[[int], Provider], events: list[bytes]
) -> None:
    """JSON that is not what the protocol says (a field missing, of another type) fails the
    reply with a provider error, as unreadable bytes do: not an unexpected exception."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _CutServer(events, False, True), "127.0.0.1", 0)
    provider = make(server.sockets[0].getsockname()[1])
    request = CompletionRequest("m", [ChatMessage("user", "hi")], None, 10)
    try:
        with pytest.raises(ProviderError) as failed:
            async for _ in provider.stream(request):
                pass
    finally:
        await provider.close()
        server.close()
    assert failed.value.message == UNREADABLE
