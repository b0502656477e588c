"""A Server-Sent Events response, written here rather than taken from sse-starlette.

sse-starlette's `EventSourceResponse` runs every stream as an anyio task group of four tasks (the
stream, its pings, a wait for the server's shutdown, a wait for the client's disconnect), with an
anyio event and lock of their own, and hands every event through its own encoding step: with
10,000 clients connected that is 40,000 tasks and their cancel scopes, held for as long as the
clients stay, and a share of the API's CPU per event while replies stream (bench/relay.py,
bench/fanout.py). Here a stream is its request's own task, which writes the events, and one
task of its own that waits for the client's disconnect and writes the keep-alive comments.

- The body is an async iterator of SSE bytes (each item one or more whole events or comments).
- A keep-alive comment every `ping` seconds.
- The stream ends, with a comment that says why and the `retry:` hint, when its connection time
  limit passes, when the server shuts down (SIGTERM: uvicorn then waits for open responses, which
  an event stream never finishes by itself) or when the client has not taken a write for a whole
  keep-alive interval (it stopped reading); when the client goes away it ends without one.
  Either way the body iterator is closed (its `finally` blocks run: a hub subscription is let
  go). A client that stopped reading is disconnected at once (a reset: nothing is left queued
  for it), and one that does not take the last write within a second too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from conversational_core.serving import ABORT, draining

_DRAIN_POLL_SECONDS = 0.25
_LAST_WRITE_SECONDS = 1.0  # for the stream's last write (its reason to end): then it is cut

# Bytes looked for as their values (`10 in data`, once an event a client): why, in
# providers/base.py beside SSEData.
_LF, _CR = ord("\n"), ord("\r")

_LIMIT, _SHUTDOWN, _GONE = "connection time limit", "the server is restarting", "gone"
_BEHIND = "too far behind"


class _Open:
    """The event streams open on this event loop, ended when the server starts to shut down
    (seen by one task that looks every quarter of a second while any stream is open)."""

    def __init__(self) -> None:
        self.streams: set[EventStreamResponse] = set()
        self.watcher: asyncio.Task[None] | None = None

    def add(self, stream: EventStreamResponse) -> None:
        loop = asyncio.get_running_loop()
        if self.watcher is None or self.watcher.done() or self.watcher.get_loop() is not loop:
            # (A loop of its own per test: the streams of a closed one are gone with it.)
            self.streams = set()
            self.watcher = loop.create_task(self._watch(), name="sse-shutdown-watcher")
        self.streams.add(stream)

    async def _watch(self) -> None:
        while self.streams:
            if draining():
                for stream in list(self.streams):
                    stream.end(_SHUTDOWN)
            await asyncio.sleep(_DRAIN_POLL_SECONDS)


_OPEN = _Open()


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        ping_seconds: float,
        max_seconds: float,
        retry_ms: int,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.body_iterator = body
        self._on_close = on_close  # called once the stream is over, however it ended
        self.status_code = 200
        self.background = None
        self.init_headers(headers)  # (no `Connection`: hop-by-hop, the server's to set)
        self._ping = ping_seconds
        self._max = max_seconds
        self._retry = retry_ms
        self._limit: asyncio.Timeout | None = None
        self._why = _LIMIT
        self._writing = False
        self._write_began = 0.0  # (the watcher tells a stuck write by it)

    def end(self, why: str) -> None:
        """End the stream now (from another task or a callback)."""
        if self._limit is not None and not self._limit.expired():
            self._why = why
            self._limit.reschedule(asyncio.get_running_loop().time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._serve(scope, receive, send)
        finally:
            if self._on_close is not None:
                self._on_close()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        body = self.body_iterator
        watcher = asyncio.create_task(self._watch(receive, send))
        _OPEN.add(self)
        limit = self._limit = asyncio.timeout(self._max)
        loop = asyncio.get_running_loop()
        last = b""
        try:
            async with limit:
                if draining():  # (before the shutdown watcher's next look)
                    self.end(_SHUTDOWN)
                async for chunk in body:
                    self._writing = True
                    self._write_began = loop.time()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self._writing = False
        except TimeoutError:
            if not limit.expired():
                raise  # not the limit's: the body's own
            if self._why != _GONE:
                last = comment(f"{self._why}; reconnect with Last-Event-ID", self._retry)
        finally:
            self._limit = None
            _OPEN.streams.discard(self)
            watcher.cancel()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        # A client that does not read is disconnected rather than waited for: at once when it
        # stopped reading (its hint could only queue behind what it does not read; it reconnects
        # on the reset), else when it does not take the last write in time. (serving.py's
        # protocol offers the means; another server closes it itself, with a complaint in its
        # log, once this returns without finishing the response.)
        abort = scope.get("extensions", {}).get(ABORT)
        if abort is None or self._why != _BEHIND:
            try:
                async with asyncio.timeout(_LAST_WRITE_SECONDS):
                    await send({"type": "http.response.body", "body": last})
                return
            except TimeoutError:
                if abort is None:
                    return
        abort()
        await send({"type": "http.response.body", "body": b""})  # (returns once closed)

    async def _watch(self, receive: Receive, send: Send) -> None:
        """Waits for the client's disconnect (which ends the stream), and writes a keep-alive
        comment every `ping` seconds meanwhile. A stream whose write (an event's or a keep-alive)
        has not gone out for a whole interval (the client stopped reading: its buffers and ours
        are full) ends: the events it would miss could only pile up, and a client that reads
        again reconnects with Last-Event-ID."""
        loop = asyncio.get_running_loop()
        wait = self._ping
        while True:
            try:
                async with asyncio.timeout(wait):
                    while (await receive())["type"] != "http.disconnect":
                        pass
                self.end(_GONE)
                return
            except TimeoutError:
                wait = self._ping
                if self._writing:
                    waited = loop.time() - self._write_began
                    if waited >= self._ping:
                        self.end(_BEHIND)
                        return
                    wait = self._ping - waited  # (looked again when it is an interval old)
                    continue
                try:
                    async with asyncio.timeout(self._ping):
                        await send({"type": "http.response.body", "body": _PING, "more_body": True})
                except TimeoutError:  # (the buffers were full already)
                    self.end(_BEHIND)
                    return
                except Exception:  # the connection is gone (a server that did not say so)
                    self.end(_GONE)
                    return


_PING = b": ping\r\n\r\n"


def comment(text: str, retry_ms: int | None = None) -> bytes:
    """An SSE comment (one line: line breaks in `text` become spaces), with a `retry:` hint."""
    line = b": " + " ".join(text.splitlines()).encode() + b"\r\n"
    if retry_ms is not None:
        line += b"retry: %d\r\n" % retry_ms
    return line + b"\r\n"


def event(id_: str, type_: str, data: bytes) -> bytes:
    """One event: `id`, `event` and `data` lines, CRLF, a `data` line per line of `data` (event
    data is one line of JSON, written as it is)."""
    if _LF in data or _CR in data:
        data = b"\r\ndata: ".join(data.splitlines())
    return b"id: %s\r\nevent: %s\r\ndata: %s\r\n\r\n" % (id_.encode(), type_.encode(), data)
