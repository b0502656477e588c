"""How every Redis module talks to Redis: :class:`Connection`.

- One reply shape: whatever client is underneath, a command answers its raw RESP2 reply (bytes,
  ints, lists, None), never a client's parsed object; every module parses what it asked for.
- One error shape: a failure that means "Redis cannot serve right now" (errors.py, the one
  table) is raised as `storage.errors.Unavailable`; anything else is a bug and raised as is.
- Scripts by SHA, their source after NOSCRIPT (a restarted server, a promoted replica).

Underneath, on a single server, commands go over :class:`RespClient`, a lean pipelined client,
and blocking ones (XREADGROUP BLOCK) over redis-py's pool; on a Redis Cluster everything goes
through redis-py's cluster client, which routes by slot and follows failovers. The event hub's
pub/sub connections (one per server or cluster node) are :class:`PubSubConnection`s.

Why a client of our own on the hot path: each redis-py asyncio command costs ~100 µs of CPU
(connection-pool checkout, retry wrapper, timeouts, response callbacks), measured as a quarter of
a whole `POST /messages`. RespClient does one thing: send a command on one of a few long-lived
connections without waiting for earlier replies (Redis answers in order, so replies are matched
to a FIFO of futures), parsed with hiredis, the parser redis-py itself uses: ~15 µs a command.
A connection that breaks or times out fails every command in flight on it with ConnectionError
and is replaced on the next command, so the service recovers by itself when Redis comes back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis
import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from conversational_core.storage.errors import Unavailable
from conversational_core.storage.redis.errors import ReplyError, reply_code, unavailable
from conversational_core.storage.redis.scripts import Script

# How much of its read buffer a connection's hiredis reader keeps once it is empty. hiredis
# frees a buffer of more than 16 KiB (its default) every time it has been read out, and
# allocates it again for the next read: a page of 50 messages (~50 KiB) cost ~40 us to parse
# so instead of ~5 us (feeding one such reply, hiredis 3.5), and so did every read of more than
# 16 KiB (a worker's replies to many commands, the event hub's messages). Side by side: pages
# of 50 +12% requests a second, the relay's workers ~9% less CPU a token (README).
READER_BUFFER_BYTES = 1024 * 1024


def pack(args: tuple[Any, ...]) -> bytes:
    """RESP encoding of a command, by hiredis (C), as redis-py does."""
    return hiredis.pack_command(args)  # type: ignore[no-any-return]


class _Protocol(asyncio.Protocol):
    """One connection: commands are written in batches (all those issued in one turn of the
    event loop go out in one write) and replies are matched to a FIFO of futures. One timer
    per connection, not per command, fails it when its oldest command waits too long."""

    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.reader.setmaxbuf(READER_BUFFER_BYTES)
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

    def send(self, command: bytes, *, urgent: bool = False) -> asyncio.Future[Any]:
        """Queue `command` for the turn's write; `urgent`: write it, and what is queued before
        it, now (a busy loop's next turn can be many milliseconds away)."""
        future: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append((future, self.loop.time() + self.timeout))
        if not self.outbox and not urgent:
            self.loop.call_soon(self._flush)
        self.outbox.append(command)
        if urgent:
            self._flush()
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


async def _handshake(
    proto: _Protocol, username: str | None, password: str | None, db: int, name: str
) -> None:
    """AUTH, SELECT and CLIENT SETNAME on a new connection (closed if any fails)."""
    try:
        handshake: list[tuple[Any, ...]] = []
        if password is not None:
            handshake.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            handshake.append(("SELECT", db))
        handshake.append(("CLIENT", "SETNAME", name))
        for command in handshake:
            reply = await proto.send(pack(command))
            if isinstance(reply, ReplyError):
                raise reply
    except BaseException:
        proto.fail(ConnectionError("the connection's handshake failed"))  # closes it
        raise


class PubSubConnection(_Protocol):
    """A pub/sub connection (SSUBSCRIBE, SUNSUBSCRIBE, PING) read without redis-py: after the
    handshake, every reply Redis sends (a subscription confirmed, a message, a pong) is
    collected as it is parsed and handed over in batches by :meth:`replies`, unless `take`
    takes it first, in the very turn that read it (the event hub's messages). redis-py's
    `get_message` costs ~15 us of CPU a message (a per-read timeout, its retry wrapper, a dict
    per message), measured as a fifth of the API's CPU while it relays replies to clients;
    here a message costs its parsing (hiredis, as redis-py) and a list append."""

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self.listening = False  # the handshake is done: replies are messages from now on
        self.inbox: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None
        # Given a reply as it is parsed, True when it took it (then it is not in the inbox).
        self.take: Callable[[Any], bool] | None = None

    @classmethod
    async def open(cls, url: str, *, io_timeout: float, connect_timeout: float) -> PubSubConnection:
        """A connection to the server of a `redis://` URL (see RespClient.supports)."""
        parsed = urlparse(url)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            _, proto = await loop.create_connection(
                lambda: cls(io_timeout), parsed.hostname or "127.0.0.1", parsed.port or 6379
            )
        username = unquote(parsed.username) if parsed.username else None
        password = unquote(parsed.password) if parsed.password else None
        async with asyncio.timeout(io_timeout):
            await _handshake(proto, username, password, 0, "conversational-core-events")
        proto.listening = True
        return proto

    def data_received(self, data: bytes) -> None:
        if not self.listening:
            super().data_received(data)
            return
        self.reader.feed(data)
        take = self.take
        while True:
            reply = self.reader.gets()
            if reply is False:
                break
            if take is None or not take(reply):
                self.inbox.append(reply)
        if self.inbox and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def fail(self, exc: Exception) -> None:
        super().fail(exc)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def command(self, *args: Any) -> None:
        """Send a command; its reply comes with the others (:meth:`replies`)."""
        if self.closed or self.transport is None:
            raise ConnectionError("the pub/sub connection is closed")
        self.transport.write(pack(args))

    async def replies(self, wait: float) -> list[Any]:
        """What Redis sent since the last call, in order, waiting up to `wait` seconds for
        something (an empty list: nothing came). ConnectionError once the connection is lost."""
        if not self.inbox:
            if self.closed:
                raise ConnectionError("the pub/sub connection is closed")
            self.waiter = self.loop.create_future()
            try:
                async with asyncio.timeout(wait):
                    await self.waiter
            except TimeoutError:
                return []
            finally:
                self.waiter = None
        batch, self.inbox = self.inbox, []
        return batch

    def close(self) -> None:
        self.fail(ConnectionError("the pub/sub connection was closed"))


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
        await _handshake(
            proto, self._username, self._password, self._db, "conversational-core-fast"
        )
        self._slots[index] = proto
        return proto

    @staticmethod
    async def _send(proto: _Protocol, args: tuple[Any, ...], urgent: bool = False) -> Any:
        reply = await proto.send(pack(args), urgent=urgent)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def call(self, *args: Any, urgent: bool = False) -> Any:
        """One command; `urgent`: written at once (_Protocol.send)."""
        index = self._next
        self._next = (index + 1) % len(self._slots)
        proto = self._slots[index]
        if proto is None or proto.closed:
            proto = await self._connect(index)
        return await self._send(proto, args, urgent)

    async def close(self) -> None:
        for proto in self._slots:
            if proto is not None and proto.transport is not None:
                with contextlib.suppress(Exception):
                    proto.transport.close()
        self._slots = [None] * len(self._slots)


# --- redis-py: the pooled client, and the cluster client ----------------------------------------

# A client of one Redis server, or of a Redis Cluster (REDIS_CLUSTER).
RedisClient = aioredis.Redis | RedisCluster


class _ClusterClient(RedisCluster):
    """redis-py's cluster client, without its retry of a command that timed out: a script that
    timed out may have run, and running it again would write twice (a message appended twice).
    Lost connections, CLUSTERDOWN and uncovered slots (a failover) are still retried."""

    ERRORS_ALLOW_RETRY = tuple(  # type: ignore[assignment]
        error for error in RedisCluster.ERRORS_ALLOW_RETRY if error is not RedisTimeoutError
    )


def _raw(client: RedisClient) -> RedisClient:
    """Answer raw replies, as RespClient does: drop redis-py's reply parsers (but those the
    cluster client needs itself, to read the slot map and the command table)."""
    tables = [client.response_callbacks]
    if isinstance(client, RedisCluster):
        tables.append(client.result_callbacks)  # (e.g. SCAN's, which keys results by node)
    for callbacks in tables:
        for name in list(callbacks):
            if not str(name).upper().startswith(("CLUSTER", "COMMAND")):
                del callbacks[name]
    return client


class _KeptBufferParser(_AsyncHiredisParser):
    """redis-py's hiredis parser, its reader keeping its buffer (READER_BUFFER_BYTES says why),
    for what goes through redis-py on one server: the job queue's blocking reads, and every
    command where the fast client is not used (`rediss://`, unix sockets). (redis-py's cluster
    client takes no parser of one's choosing.)"""

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[no-untyped-call]
        cast(Any, self._reader).setmaxbuf(READER_BUFFER_BYTES)


def _options(socket_timeout: float, connect_timeout: float, client_name: str) -> dict[str, Any]:
    return {
        "parser_class": _KeptBufferParser,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "health_check_interval": 15,
        "client_name": client_name,
        # The replies RespClient reads (RESP3's maps would be another shape), with no HELLO.
        "protocol": 2,
        # Maintenance notifications are a Redis Enterprise/Cloud feature; probing for them costs
        # a round trip per new connection against open-source Redis.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }


def build_client(
    url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    client_name: str = "conversational-core",
    cluster: bool = False,
) -> RedisClient:
    """The one place a pooled Redis client is built: explicit timeouts, bounded retry with
    jittered backoff on connection errors, health checks of idle connections, raw replies.
    With `cluster`, `url` names one node of a Redis Cluster and `max_connections` is per node."""
    options = _options(socket_timeout, connect_timeout, client_name)
    if cluster:
        del options["parser_class"]  # (redis-py's cluster client takes none)
        # The cluster client retries a command that met a lost connection, CLUSTERDOWN or an
        # uncovered slot (a failover under way) after refreshing its slot map; TRYAGAIN and
        # MOVED/ASK are followed by redis-py itself. (It uses the retry object for its count.)
        return _raw(
            _ClusterClient.from_url(
                url,
                max_connections=max_connections,
                # On MOVED, patch the slot map from the redirection (a failover moves a whole
                # slot range at once) rather than rebuild it every few MOVED: a rebuild closes
                # every connection of the client, breaking the commands in flight on them.
                reinitialize_steps=0,
                retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.25), retries=3),
                **options,
            )
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.25), retries=2),
        # Not on timeouts: a script that timed out may have run, and running it again would
        # write twice (a message appended twice). The caller gets a 503 and retries with its
        # Idempotency-Key.
        retry_on_error=[RedisConnectionError],
        **options,
    )
    return _raw(aioredis.Redis(connection_pool=pool))


def dedicated_client(
    url: str, *, socket_timeout: float, connect_timeout: float, client_name: str
) -> aioredis.Redis:
    """One connection of a caller's own (callers queue for it), raw replies, no retry: for a
    blocking read that reconnects by itself (the event readers)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=1,
        timeout=None,
        retry=Retry(NoBackoff(), 0),
        **_options(socket_timeout, connect_timeout, client_name),
    )
    client = _raw(aioredis.Redis(connection_pool=pool))
    assert isinstance(client, aioredis.Redis)
    return client


class Connection:
    """Redis for every module of this package (see the module docstring)."""

    def __init__(self, client: RedisClient, fast: RespClient | None = None) -> None:
        self.client = client
        self.cluster = isinstance(client, RedisCluster)
        assert fast is None or not self.cluster, "the fast client is single-node"
        self._fast = fast

    @classmethod
    def open(
        cls,
        url: str,
        *,
        socket_timeout: float,
        connect_timeout: float,
        max_connections: int,
        cluster: bool = False,
        fast_connections: int = 2,
    ) -> Connection:
        """Clients for `url` (nothing connects until the first command); `fast_connections`:
        the RespClient's (see open_backend)."""
        client = build_client(
            url,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            cluster=cluster,
        )
        fast = (
            RespClient(
                url,
                connections=fast_connections,
                timeout=socket_timeout,
                connect_timeout=connect_timeout,
            )
            if RespClient.supports(url) and not cluster
            else None
        )
        return cls(client, fast)

    async def call(self, *args: Any, urgent: bool = False) -> Any:
        """One command. On the fast client when there is one: it holds no pooled connection per
        caller, so hundreds of concurrent replies do not exhaust the pool, and commands issued
        in the same turn of the event loop go out in one write (an `urgent` one at once, with
        those before it)."""
        try:
            if self._fast is not None:
                return await self._fast.call(*args, urgent=urgent)
            return await self.client.execute_command(*args)
        except Exception as exc:
            unavailable(exc)
            raise

    async def call_pooled(self, *args: Any) -> Any:
        """One command on a pooled connection of its own: for blocking commands (XREADGROUP
        BLOCK), which would hold up every command behind them on the fast client."""
        try:
            return await self.client.execute_command(*args)
        except Exception as exc:
            unavailable(exc)
            raise

    async def script(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], *, urgent: bool = False
    ) -> Any:
        """One script call (a pipeline object costs more CPU than the round trip it saves)."""
        for attempt in range(2):
            try:
                return await self.call(
                    *script.command(keys, args, by_source=attempt > 0), urgent=urgent
                )
            except Unavailable:
                raise
            except Exception as exc:
                if not attempt and reply_code(exc) == "NOSCRIPT":
                    continue  # a restarted server or a new primary: send the source
                raise
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        await self.call("PING")

    def slot_of(self, key: str) -> int | None:
        """The cluster hash slot of `key`; None on a single server (no slots)."""
        if isinstance(self.client, RedisCluster):
            return self.client.keyslot(key)
        return None

    async def primary_of(self, key: str, *, refresh: bool = False) -> tuple[str, int] | None:
        """Host and port of the cluster primary serving `key` (None on a single server), for
        connections of one's own; `refresh` re-reads the slot map first (after MOVED or a lost
        node: a failover)."""
        if not isinstance(self.client, RedisCluster):
            return None
        try:
            await self.client.initialize()
            if refresh:
                await self.client.nodes_manager.initialize()
            node = self.client.get_node_from_key(key)
        except Exception as exc:
            unavailable(exc)
            raise
        if node is None:
            raise Unavailable()
        return str(node.host), int(node.port)

    async def scan(self, pattern: str, type_: str, count: int = 1000) -> AsyncIterator[bytes]:
        """Every key matching `pattern` of type `type_`, on every primary (SCAN: in the
        background, never on a request path)."""
        client = self.client
        nodes: list[Any] = client.get_primaries() if isinstance(client, RedisCluster) else [None]
        for node in nodes:
            cursor: Any = b"0"
            while True:
                args = ("SCAN", cursor, "MATCH", pattern, "COUNT", count, "TYPE", type_)
                try:
                    if node is None:
                        cursor, keys = await client.execute_command(*args)
                    else:
                        cursor, keys = await client.execute_command(*args, target_nodes=node)
                except Exception as exc:
                    unavailable(exc)
                    raise
                for key in keys:
                    yield key
                if cursor in (b"0", 0, "0"):
                    break

    async def close(self) -> None:
        if self._fast is not None:
            await self._fast.close()
        if isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)
