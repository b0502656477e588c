"""Minimal Server-Sent Events clients over raw sockets, for the reply benchmarks.

Why not httpx: the time-to-first-token benchmark measures a few milliseconds, and 10,000 httpx
streams in one process would cost more client CPU than the service they measure. A response here
is parsed by :class:`SseParser` (status line, chunked transfer coding, SSE fields): a few
microseconds per event.

- :class:`ThreadedSseReader`: one blocking socket read by its own thread, with kernel receive
  timestamps (SO_TIMESTAMPNS) beside the time the thread saw the bytes, so that the client's own
  share of a measured latency is shown rather than hidden.
- :class:`SseProtocol`: an asyncio protocol, for many concurrent clients in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from testkit.sse import EventStreamParser
from testkit.sse import StreamEvent as SseEvent

from bench.client import encode_request

DELTA = "message.delta"
UPDATED = "message.updated"
COMPLETED = "message.completed"
FAILED = "message.failed"
FINAL = (COMPLETED, FAILED, "message.cancelled")
FOLLOWED = (DELTA, UPDATED, *FINAL)

# Linux: SO_TIMESTAMPNS (the socket module does not export it); the control message it sends
# with every recvmsg has the same number and holds a struct timespec (two 64-bit ints on x86_64
# and arm64).
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")


class SseError(RuntimeError):
    """The server answered something else than an event stream."""


class SseParser:
    """Incremental: feed it the bytes of one HTTP/1.1 response to a GET of an event stream."""

    def __init__(self) -> None:
        self._raw = b""
        self._head_done = False
        self.status: int | None = None
        self._chunked = False
        self._chunk_left = 0  # bytes of the current chunk still to come
        self._chunk_crlf = False  # the CRLF after a chunk's data is still to come
        self._text = b""  # de-chunked event-stream bytes not yet given to the parser
        self._stream = EventStreamParser()
        self.ended = False

    def feed(self, data: bytes) -> list[SseEvent]:
        self._raw += data
        if not self._head_done:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return []
            head, self._raw = self._raw[:end], self._raw[end + 4 :]
            self._head_done = True
            self.status = int(head[9:12])
            lowered = head.lower()
            self._chunked = b"transfer-encoding: chunked" in lowered
            if self.status != 200 or b"text/event-stream" not in lowered:
                raise SseError(f"not an event stream: {head[:200]!r} {self._raw[:300]!r}")
        self._dechunk()
        return self._events()

    def _dechunk(self) -> None:
        if not self._chunked:
            self._text += self._raw
            self._raw = b""
            return
        raw = self._raw
        pos = 0
        while True:
            if self._chunk_crlf:
                if len(raw) - pos < 2:
                    break
                pos += 2
                self._chunk_crlf = False
            if self._chunk_left == 0:
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(raw[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self.ended = True
                    break
                self._chunk_left = size
            take = min(self._chunk_left, len(raw) - pos)
            if take <= 0:
                break
            self._text += raw[pos : pos + take]
            pos += take
            self._chunk_left -= take
            if self._chunk_left == 0:
                self._chunk_crlf = True
        self._raw = raw[pos:]

    def _events(self) -> list[SseEvent]:
        text, self._text = self._text, b""
        return self._stream.feed(text)


def events_request(port: int, conversation_id: str, token: str) -> bytes:
    return encode_request("GET", f"/conversations/{conversation_id}/events", port=port, token=token)


@dataclass
class FirstDelta:
    """When the first delta of a reply reached the client."""

    kernel: float | None  # the kernel's receive timestamp of the bytes (SO_TIMESTAMPNS)
    seen: float  # time.time() when the reading thread had them
    parsed: float  # time.time() when the event had been parsed
    event_id: str  # the stream entry id: "<ms of the XADD in Redis>-<seq>"


@dataclass
class ReplyTrace:
    """A reply as a client follows it: `message.updated` carries the message as stored, whose
    content replaces the text so far (a new attempt resets it to ""); deltas append to it."""

    first_delta: FirstDelta | None = None
    deltas: list[str] = field(default_factory=list)
    delta_events: int = 0  # every delta received, those of a restarted attempt included
    restarts: int = 0  # updates that dropped text already received
    final_type: str | None = None
    final_message: dict[str, Any] | None = None
    done_at: float | None = None

    def apply(self, kind: str, payload: dict[str, Any], now: float) -> None:
        """Apply one event of this reply (delta, updated or final); `now` for a final one."""
        if kind == DELTA:
            self.deltas.append(payload["delta"])
            self.delta_events += 1
        elif kind == UPDATED:
            content = str((payload.get("message") or {}).get("content") or "")
            text = "".join(self.deltas)
            if not text.startswith(content) or (text and not content):
                self.restarts += 1
            self.deltas = [content] if content else []
        else:
            self.final_type = kind
            self.final_message = payload.get("message")
            self.done_at = now


class ThreadedSseReader:
    """One conversation's event stream, read by its own thread with kernel timestamps."""

    def __init__(self, port: int, conversation_id: str, token: str, timeout: float = 10) -> None:
        self.conversation_id = conversation_id
        self.replies: dict[str, ReplyTrace] = {}
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._connected = False
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self._sock.settimeout(None)
        self._sock.sendall(events_request(port, conversation_id, token))
        self._thread = threading.Thread(
            target=self._run, name=f"sse-{conversation_id[-6:]}", daemon=True
        )
        self._thread.start()
        self._wait(lambda: self._connected, timeout)

    def _wait(self, predicate: Any, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate() or self.error is not None, timeout):
                raise TimeoutError(f"event stream of {self.conversation_id}: timed out")
        if self.error is not None:
            raise SseError(f"event stream of {self.conversation_id}: {self.error!r}")

    def wait_reply(self, reply_id: str, timeout: float) -> ReplyTrace:
        """Block until the reply has ended (completed, failed or cancelled)."""

        def ended() -> bool:
            trace = self.replies.get(reply_id)
            return trace is not None and trace.final_type is not None

        self._wait(ended, timeout)
        return self.replies[reply_id]

    def _run(self) -> None:
        parser = SseParser()
        ancillary = socket.CMSG_SPACE(_TIMESPEC.size)
        try:
            while True:
                data, anc, _, _ = self._sock.recvmsg(262_144, ancillary)
                seen = time.time()
                if not data:
                    raise SseError("the server closed the stream")
                kernel = None
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = _TIMESPEC.unpack(payload[: _TIMESPEC.size])
                        kernel = sec + nsec / 1e9
                events = parser.feed(data)
                parsed = time.time()
                if events:
                    with self._cond:
                        for event in events:
                            self._handle(event, kernel, seen, parsed)
                        self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                self.error = exc
                self._cond.notify_all()

    def _handle(self, event: SseEvent, kernel: float | None, seen: float, parsed: float) -> None:
        if event.type == "":
            self._connected = True
            return
        if event.type not in FOLLOWED:
            return
        payload = orjson.loads(event.data)
        trace = self.replies.setdefault(payload["message_id"], ReplyTrace())
        if event.type == DELTA and trace.first_delta is None:
            trace.first_delta = FirstDelta(kernel, seen, parsed, event.id or "")
        trace.apply(event.type, payload, seen)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._sock.close()


class SseProtocol(asyncio.Protocol):
    """One client of the thousands: connects, waits for the stream's first comment (`connected`),
    then follows its conversation's replies until one of them ends."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._parser = SseParser()
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[str] = loop.create_future()  # the reply id
        self.replies: dict[str, ReplyTrace] = {}
        self.events = 0
        self.first_delta_at: float | None = None
        self.first_delta_id = ""  # its stream entry id: "<ms of the XADD in Redis>-<seq>"
        self._closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._parser.feed(data)
        except Exception as exc:
            self._fail(exc)
            return
        for event in events:
            self.events += 1
            if event.type == "":
                if not self.connected.done():
                    self.connected.set_result(None)
                continue
            if event.type not in FOLLOWED:
                continue
            payload = orjson.loads(event.data)
            trace = self.replies.setdefault(payload["message_id"], ReplyTrace())
            now = time.monotonic()
            if event.type == DELTA and self.first_delta_at is None:
                self.first_delta_at = now
                self.first_delta_id = event.id or ""
            trace.apply(event.type, payload, now)
            if event.type in FINAL and not self.ended.done():
                self.ended.set_result(payload["message_id"])

    def _fail(self, exc: BaseException) -> None:
        for future in (self.connected, self.ended):
            if not future.done():
                future.set_exception(exc)
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closing:
            self._fail(exc or SseError("the server closed the stream"))

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()
