"""serving._Cycle writes a response's head as uvicorn's own cycle does, byte for byte, with the
same checks and the same state for the body that follows (it only does it with fewer calls)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    RequestResponseCycle,
)

from conversational_core.serving import _NAME_BYTES, _VALUE_BYTES, _Cycle


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: tuple[bytes, ...]) -> None:
        self.written.append(b"".join(data))  # (one call: one system call, writev)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Flow:
    write_paused = False


def _cycle(
    kind: type[RequestResponseCycle], method: str, keep_alive: bool, version: str = "1.1"
) -> Any:
    return kind(
        scope={"method": method, "http_version": version},  # type: ignore[typeddict-item]
        transport=_Transport(),  # type: ignore[arg-type]
        flow=_Flow(),  # type: ignore[arg-type]
        logger=None,  # type: ignore[arg-type]
        access_logger=None,  # type: ignore[arg-type]
        access_log=False,
        default_headers=[(b"date", b"Tue, 01 Dec 2026 07:28:48 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


def _outcome(
    kind: type[RequestResponseCycle],
    method: str,
    keep_alive: bool,
    start: Any,
    bodies: tuple[Any, ...] = ({"type": "http.response.body", "body": b"x" * 5},),
) -> Any:
    """What sending `start` then `bodies` does: the bytes written, the cycle's state, and the
    error, if any."""
    cycle = _cycle(kind, method, keep_alive)

    async def run() -> None:
        await cycle.send(start)
        for body in bodies:
            await cycle.send(body)

    error = None
    try:
        asyncio.run(run())
    except Exception as exc:
        error = type(exc), str(exc), cycle.response_started, cycle.waiting_for_100_continue
    state = (cycle.chunked_encoding, cycle.expected_content_length, cycle.keep_alive)
    wire = b"".join(cycle.transport.written)  # (_Cycle may write in fewer calls)
    return error, wire, state, cycle.transport.closed, cycle.response_complete


_JSON = [(b"content-type", b"application/json"), (b"content-length", b"5")]
_SECURITY = [
    (b"x-request-id", b"533e8c7566f74ec4bc74cbe599bbb5b6"),
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"ratelimit-remaining", b"99"),
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, [*_JSON, *_SECURITY]),
        (201, [(b"location", b"/conversations/a"), *_JSON]),
        (200, [(b"content-type", b"text/event-stream"), *_SECURITY]),  # no length: chunked
        (204, [(b"x-request-id", b"a")]),
        (304, []),
        (200, [(b"content-length", b"5"), (b"content-length", b"7")]),  # the first counts
        (200, [(b"Content-Length", b"5")]),  # (not lower case: uvicorn's path)
        (200, [(b"connection", b"close"), *_JSON]),  # (uvicorn's path)
        (200, [(b"transfer-encoding", b"chunked")]),  # (uvicorn's path)
        (200, [(b"x-tab", b"a\tb"), *_JSON]),  # a tab is allowed in a value
        (200, [(b"bad name", b"v"), *_JSON]),
        (200, [(b"x-split", b"a\r\nset-cookie: b"), *_JSON]),
        (200, [(b"x-nul", b"a\x00"), *_JSON]),
        (200, [(b"content-length", b"five")]),
        (299, [*_JSON]),
        (200, [(b"x-split", b"a\r\n"), (b"bad name", b"v")]),  # (uvicorn's order of errors)
        (999, [(b"bad name", b"v")]),  # (no status line: uvicorn's KeyError)
        (200, [(bytearray(b"x-mutable"), b"v"), *_JSON]),
        (200, [(b"x-number", 5), *_JSON]),
        (200, [(b"x-three", b"v", b"w"), *_JSON]),
    ],
)
def test_the_head_is_uvicorns(
    method: str, keep_alive: bool, status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    start = {"type": "http.response.start", "status": status, "headers": headers}
    ours = _outcome(_Cycle, method, keep_alive, start)
    assert ours == _outcome(RequestResponseCycle, method, keep_alive, start)


def _body(body: Any, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": more}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize(
    "bodies",
    [
        (_body(b"x" * 5),),
        (_body(b"xx", True), _body(b"xxx")),
        (_body(b"x" * 5, True), _body(b"")),
        (_body(b"x" * 6),),  # longer than announced
        (_body(b"xxx"),),  # shorter
        (_body(bytearray(b"x" * 5)),),
        (_body(memoryview(b"x" * 5)),),
        ({"type": "http.response.start", "status": 200, "headers": []},),  # not a body
        (_body(b"x" * 5), _body(b"late")),
    ],
)
def test_a_body_after_a_head_of_known_length_is_sent_as_uvicorn_sends_it(
    method: str, keep_alive: bool, bodies: tuple[Any, ...]
) -> None:
    """The head of an answer of known length is held until its body comes, and the two are
    written at once: the same bytes, state and errors as uvicorn's, whatever the body."""
    start = {"type": "http.response.start", "status": 200, "headers": [*_JSON, *_SECURITY]}
    ours = _outcome(_Cycle, method, keep_alive, start, bodies)
    assert ours == _outcome(RequestResponseCycle, method, keep_alive, start, bodies)


def test_an_answer_of_known_length_is_one_write() -> None:
    """A JSON answer (its head and its body sent one after the other) leaves in one system
    call, one TCP segment, where uvicorn's cycle writes the head and the body apart."""
    start = {"type": "http.response.start", "status": 201, "headers": [*_JSON, *_SECURITY]}
    for kind, writes in ((_Cycle, 1), (RequestResponseCycle, 2)):
        cycle = _cycle(kind, "POST", keep_alive=True)

        async def send(cycle: Any = cycle) -> None:
            await cycle.send(start)
            await cycle.send(_body(b"x" * 5))

        asyncio.run(send())
        assert len(cycle.transport.written) == writes, kind
        assert b"".join(cycle.transport.written).endswith(b"\r\n\r\nxxxxx")
    # A client gone between the head and the body: nothing is written (uvicorn's cycle had
    # written the head to a closed transport).
    gone = _cycle(_Cycle, "POST", keep_alive=True)

    async def leave() -> None:
        await gone.send(start)
        gone.disconnected = True
        await gone.send(_body(b"x" * 5))

    asyncio.run(leave())
    assert gone.transport.written == [] and not gone.response_complete


@pytest.mark.parametrize("ending", ["raise", "return"])
@pytest.mark.parametrize("length", [True, False])
def test_an_app_that_fails_after_its_head(ending: str, length: bool) -> None:
    """An app that sends a head and then raises or returns without the body: uvicorn's cycle
    writes the head and closes the connection. A head of known length is still unwritten
    here, so the answer is a 500 (a close with nothing written would look like a stale
    keep-alive connection, and a client may send the request again); a head of unknown
    length (an event stream) has been written, and the connection is closed after it, as
    uvicorn does."""
    headers = _JSON if length else [(b"content-type", b"text/event-stream")]
    start = {"type": "http.response.start", "status": 200, "headers": headers}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start)
        if ending == "raise":
            raise RuntimeError("after the head")

    wires = {}
    for kind in (RequestResponseCycle, _Cycle):
        cycle = _cycle(kind, "POST", keep_alive=True)
        cycle.logger = logging.getLogger("tests.response_head")
        asyncio.run(cycle.run_asgi(app))
        wires[kind] = b"".join(cycle.transport.written), cycle.transport.closed
    ours, uvicorns = wires[_Cycle], wires[RequestResponseCycle]
    assert uvicorns[0].startswith(b"HTTP/1.1 200 OK\r\n") and uvicorns[1]
    if not length:
        assert ours == uvicorns
        return
    head, _, body = ours[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"connection: close" in head and body == b"Internal Server Error"
    assert ours[1]  # (closed after it, as uvicorn's 500)


def test_the_refused_bytes_are_uvicorns() -> None:
    for byte in range(256):
        one = bytes([byte])
        assert (HEADER_RE.search(b"x" + one) is not None) == (one in _NAME_BYTES), byte
        assert (HEADER_VALUE_RE.search(b"x" + one) is not None) == (one in _VALUE_BYTES), byte


@pytest.mark.parametrize("where", ["name", "value"])
def test_every_byte_in_a_head_is_taken_or_refused_as_uvicorn_does(where: str) -> None:
    for byte in range(256):
        one = bytes([byte])
        header = (b"x-b" + one + b"c", b"v") if where == "name" else (b"x-b", b"v" + one + b"w")
        start = {"type": "http.response.start", "status": 200, "headers": [header, *_JSON]}
        ours = _outcome(_Cycle, "GET", True, start)
        assert ours == _outcome(RequestResponseCycle, "GET", True, start), byte


def test_an_event_stream_to_an_http_10_client_is_not_chunked() -> None:
    """HTTP/1.0 has no chunked coding (uvicorn sends it all the same): the events go as they
    are, and the end of the connection is the end of the body."""
    cycle = _cycle(_Cycle, "GET", keep_alive=False, version="1.0")
    events = [b"event: message.delta\ndata: {}\n\n", b": keep-alive\n\n"]

    async def stream() -> None:
        start = {"type": "http.response.start", "status": 200, "headers": _SECURITY}
        await cycle.send({**start, "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:
            await cycle.send({"type": "http.response.body", "body": event, "more_body": True})
        assert not cycle.transport.closed
        await cycle.send({"type": "http.response.body", "body": b""})
        with pytest.raises(RuntimeError, match="after response already completed"):
            await cycle.send({"type": "http.response.body", "body": b"late"})

    asyncio.run(stream())
    head, *body = cycle.transport.written
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding" not in head and b"connection: close\r\n" in head
    assert body == events
    assert cycle.transport.closed and cycle.response_complete
    # The same stream to an HTTP/1.1 client is chunked, as uvicorn does it.
    chunked = _cycle(_Cycle, "GET", keep_alive=True)
    start = {"type": "http.response.start", "status": 200, "headers": []}
    asyncio.run(chunked.send({**start, "headers": [(b"content-type", b"text/event-stream")]}))
    assert b"transfer-encoding: chunked" in chunked.transport.written[0]
