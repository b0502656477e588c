"""A lean, pipelined Redis connection for the request hot path (script calls).

Why not redis-py here: redis-py is used for everything else, but each of its asyncio commands
costs ~100 µs of CPU (connection-pool checkout, retry wrapper, timeouts, response callbacks),
which measured as a quarter of a whole `POST /messages`. This module does one thing: send a
command on one of a few long-lived connections, without waiting for earlier replies (Redis
answers in order, so replies are matched to a FIFO of futures), and parse with hiredis — the
parser redis-py itself uses. That is ~15 µs a command.

Failure handling: a connection that breaks or times out fails every command in flight on it with
ConnectionError (the store turns that into 503 StoreUnavailable) and is replaced on the next
command, so the service recovers by itself when Redis comes back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis


class ReplyError(Exception):
    """An error reply from Redis (e.g. NOSCRIPT)."""


def pack(args: tuple[Any, ...]) -> bytes:
    """RESP encoding of a command, by hiredis (C), as redis-py does."""
    return hiredis.pack_command(args)  # type: ignore[no-any-return]


class _Protocol(asyncio.Protocol):
    """One connection: commands are written in batches (all those issued in one turn of the
    event loop go out in one write) and replies are matched to a FIFO of futures. One timer
    per connection, not per command, fails it when its oldest command waits too long."""

    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.timeout = timeout
        self.outbox: list[bytes] = []
        self.loop = asyncio.get_running_loop()
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check)
        self.transport = cast(asyncio.Transport, transport)
        self.watchdog = self.loop.call_later(self.timeout / 2, self._check)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append((future, self.loop.time() + self.timeout))
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(command)
        return future

    def _flush(self) -> None:
        if self.transport is not None and not self.closed and self.outbox:
            self.transport.write(b"".join(self.outbox))
        self.outbox.clear()

    def _check(self) -> None:
        if self.closed:
            return
        if self.pending and self.pending[0][1] < self.loop.time():
            # Replies are matched by order: after a timeout the connection is unusable.
            self.fail(TimeoutError("Redis did not answer in time"))
            return
        self.watchdog = self.loop.call_later(self.timeout / 2, self._check)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError("connection to Redis lost"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.outbox.clear()
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class RespClient:
    """A few pipelined connections, used round-robin. `call` returns the raw reply (bytes,
    ints, lists) or raises ReplyError / ConnectionError / TimeoutError."""

    def __init__(
        self, url: str, *, connections: int = 2, timeout: float = 2.0, connect_timeout: float = 1.0
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "redis":
            raise ValueError("the fast path supports redis:// URLs only")
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._db = int(parsed.path.lstrip("/") or 0)
        self._username = unquote(parsed.username) if parsed.username else None
        self._password = unquote(parsed.password) if parsed.password else None
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._slots: list[_Protocol | None] = [None] * connections
        self._locks = [asyncio.Lock() for _ in range(connections)]
        self._next = 0
        self._failures = [0] * connections  # failed connection attempts, per slot

    @staticmethod
    def supports(url: str) -> bool:
        return urlparse(url).scheme == "redis"

    async def _connect(self, index: int) -> _Protocol:
        failures = self._failures[index]
        async with self._locks[index]:
            proto = self._slots[index]
            if proto is not None and not proto.closed:
                return proto
            if self._failures[index] != failures:
                # The attempt this caller waited for failed: fail at once rather than queue
                # every caller behind an attempt of its own (against a frozen server, each takes
                # a whole timeout). Callers that come later try again.
                raise ConnectionError("Redis could not be reached just now")
            try:
                return await self._open(index)
            except BaseException:
                self._failures[index] += 1
                raise

    async def _open(self, index: int) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, proto = await loop.create_connection(
                lambda: _Protocol(self._timeout), self._host, self._port
            )
        try:
            handshake: list[tuple[Any, ...]] = []
            if self._password is not None:
                handshake.append(
                    ("AUTH", self._username, self._password)
                    if self._username
                    else ("AUTH", self._password)
                )
            if self._db:
                handshake.append(("SELECT", self._db))
            handshake.append(("CLIENT", "SETNAME", "conversational-core-fast"))
            for command in handshake:
                await self._send(proto, command)
        except BaseException:
            proto.fail(ConnectionError("the connection's handshake failed"))  # closes it
            raise
        self._slots[index] = proto
        return proto

    @staticmethod
    async def _send(proto: _Protocol, args: tuple[Any, ...]) -> Any:
        reply = await proto.send(pack(args))
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def call(self, *args: Any) -> Any:
        index = self._next
        self._next = (index + 1) % len(self._slots)
        proto = self._slots[index]
        if proto is None or proto.closed:
            proto = await self._connect(index)
        return await self._send(proto, args)

    async def close(self) -> None:
        for proto in self._slots:
            if proto is not None and proto.transport is not None:
                with contextlib.suppress(Exception):
                    proto.transport.close()
        self._slots = [None] * len(self._slots)
