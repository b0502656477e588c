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


def _encode(arg: Any) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):
        raise TypeError("booleans are ambiguous in Redis commands")
    if isinstance(arg, (int, float)):
        return repr(arg).encode()
    raise TypeError(f"cannot send {type(arg).__name__} to Redis")


def pack(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _encode(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            future = self.pending.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError("connection to Redis lost"))

    def fail(self, exc: Exception) -> None:
        self.closed = True
        while self.pending:
            future = self.pending.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class RespClient:
    """A few pipelined connections, used round-robin. `call` returns the raw reply (bytes,
    ints, lists) or raises ReplyError / ConnectionError / TimeoutError."""

    def __init__(
        self, url: str, *, connections: int = 4, timeout: float = 2.0, connect_timeout: float = 1.0
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

    @staticmethod
    def supports(url: str) -> bool:
        return urlparse(url).scheme == "redis"

    async def _connect(self, index: int) -> _Protocol:
        async with self._locks[index]:
            proto = self._slots[index]
            if proto is not None and not proto.closed:
                return proto
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._connect_timeout):
                _, proto = await loop.create_connection(_Protocol, self._host, self._port)
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
            self._slots[index] = proto
            return proto

    async def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> Any:
        assert proto.transport is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.pending.append(future)
        proto.transport.write(pack(args))
        handle = asyncio.get_running_loop().call_later(self._timeout, self._expire, proto, future)
        try:
            reply = await future
        finally:
            handle.cancel()
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    @staticmethod
    def _expire(proto: _Protocol, future: asyncio.Future[Any]) -> None:
        if not future.done():
            # Replies are matched by order: after a timeout the connection is unusable.
            proto.fail(TimeoutError("Redis did not answer in time"))

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
