"""Live conversation events from Redis Streams, fanned out to this process's SSE clients.

On a single Redis server one reader task per process, on one dedicated connection, runs
`XREAD BLOCK` over the streams of every conversation that has a client here, and hands each event
to that conversation's subscribers. Holding one blocked connection per client instead would not
scale (1,000 clients, 1,000 connections) and polling would add latency. When a client subscribes
to a conversation the reader is not yet watching, the reader's blocked call is interrupted with
`CLIENT UNBLOCK` so that the new stream is watched at once.

On a Redis Cluster one XREAD may only name keys of one hash slot (CROSSSLOT otherwise, even when
one node serves both slots), so there is one reader per slot that has watched conversations,
connected to the primary serving that slot: as many connections as watched slots, at most one
per watched conversation. A reader whose node stops serving its slot (MOVED after a failover) or
goes away re-reads the slot map and reconnects to the new primary, carrying on from its cursors:
no event is lost or repeated. (Fewer connections would need a notification channel per node,
e.g. sharded pub/sub published by every script, with a re-read after each gap.)

A subscription is gap- and duplicate-free: it first reads what it missed with XRANGE (catch-up)
while the reader buffers live events for it, then drains that buffer skipping ids it already
has, and only then goes live. Each subscriber has a bounded queue; a subscriber whose queue is
full is dropped (SlowConsumer) without slowing the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse, urlunparse

import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from conversational_core.storage.base import Event, EventHub, SlowConsumer
from conversational_core.storage.errors import Unavailable
from conversational_core.storage.redis.client import Connection, dedicated_client
from conversational_core.storage.redis.keys import Keys, conversation_of
from conversational_core.storage.redis.store import RedisStore, stream_event

_BLOCK_MS = 5_000
# A blocked XREAD answers within _BLOCK_MS; silence well beyond that means the node is gone.
_READ_TIMEOUT = _BLOCK_MS / 1000 + 5
_READ_COUNT = 500
_CATCH_UP_CHUNK = 500
# A wake-up that found the reader between snapshot and XREAD is sent again this often (a few
# milliseconds at most: the reader is about to block).
_UNBLOCK_TRIES = 100
_UNBLOCK_RETRY_SECONDS = 0.002


def _fmt(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"


def _stream_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class _Subscriber:
    """One client's subscription. While it catches up from XRANGE it ignores the reader; then,
    for one last XRANGE, it buffers what the reader hands it; then it is live (queue)."""

    queue: asyncio.Queue[Event | None]
    buffering: bool = False
    live: bool = False
    overflowed: bool = False
    buffer: list[Event] = field(default_factory=list)
    buffer_limit: int = 1000

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        if self.live:
            try:
                self.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._overflow()
        elif self.buffering:
            if len(self.buffer) >= self.buffer_limit:
                self._overflow()
            else:
                self.buffer.append(event)

    def _overflow(self) -> None:
        self.overflowed = True
        self.buffer.clear()
        with contextlib.suppress(asyncio.QueueFull):
            # Wake the reader of the subscription; the flag makes it raise SlowConsumer.
            self.queue.put_nowait(None)


class _Reader:
    """One connection blocked in XREAD over the streams of a group of conversations (all of
    them on a single server, one slot's on a cluster), from a cursor per stream."""

    def __init__(self, hub: RedisEventHub, slot: int | None) -> None:
        self.hub = hub
        self.slot = slot
        self.cursors: dict[str, str] = {}
        self.conn: aioredis.Redis | None = None
        # CLIENT UNBLOCK goes on a second connection to the same node: the first is blocked.
        self.control: aioredis.Redis | None = None
        self.client_id: int | None = None
        self.unblock_queued = False
        self.unblocks: set[asyncio.Task[None]] = set()
        # Changes of the watched set, and the latest one the blocked XREAD names.
        self.generation = 0
        self.snapshot = 0
        self.moved = False  # the slot map must be re-read before reconnecting
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            # A context of its own: it serves every subscriber, not the request that started it
            # (whose request and user ids would otherwise mark all its log lines).
            self.task = asyncio.create_task(
                self._run(), name=f"event-reader-{self.slot}", context=contextvars.Context()
            )

    def wake(self) -> None:
        """Interrupt the blocked XREAD so that it names the streams watched now. Unblocks not
        yet sent are coalesced: one sent after every change so far serves them all."""
        self.generation += 1
        if self.client_id is None or self.control is None or self.unblock_queued:
            return
        self.unblock_queued = True
        task = asyncio.create_task(
            self._unblock(self.control, self.client_id), context=contextvars.Context()
        )
        self.unblocks.add(task)
        task.add_done_callback(self.unblocks.discard)
        task.add_done_callback(lambda t: t.exception())

    async def _unblock(self, control: aioredis.Redis, client_id: int) -> None:
        self.unblock_queued = False
        # An unblock that arrives between the reader's snapshot of the watched streams and its
        # XREAD reaching Redis finds nothing blocked: try again until the XREAD blocks (then it
        # is interrupted) or the reader has taken a newer snapshot (then it names the change).
        for _ in range(_UNBLOCK_TRIES):
            try:
                unblocked = await control.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "UNBLOCK", client_id
                )
                if unblocked:
                    return
            except (RedisError, OSError):
                return
            if self.snapshot >= self.generation:
                return
            await asyncio.sleep(_UNBLOCK_RETRY_SECONDS)

    async def _connect(self) -> aioredis.Redis:
        address = await self.hub.redis.primary_of(
            self.hub.keys.events(next(iter(self.cursors))), refresh=self.moved
        )
        url = self.hub.url if address is None else _node_url(self.hub.url, *address)
        self.conn = self.hub.connect(url, _READ_TIMEOUT)
        self.control = self.hub.connect(url, self.hub.connect_timeout + 1)
        self.client_id = int(await self.conn.execute_command("CLIENT", "ID"))  # type: ignore[no-untyped-call]
        self.moved = False
        return self.conn

    async def _disconnect(self) -> None:
        conns, self.conn, self.control, self.client_id = (self.conn, self.control), None, None, None
        # Unblocks under way first: they would reopen the control connection after its close.
        await asyncio.gather(*self.unblocks, return_exceptions=True)
        for conn in conns:
            if conn is not None:
                with contextlib.suppress(RedisError, OSError):
                    await conn.aclose(close_connection_pool=True)

    async def _run(self) -> None:
        delay = 0.05
        try:
            while self.cursors:
                # One turn of the loop first: events published meanwhile are read in one XREAD
                # (each call names every watched stream, so fewer, fuller calls are cheaper).
                await asyncio.sleep(0)
                if not self.cursors:
                    break
                try:
                    conn = self.conn or await self._connect()
                    self.snapshot = self.generation
                    keys = [self.hub.keys.events(cid) for cid in self.cursors]
                    if not keys:  # the last one left while connecting
                        break
                    response: Any = await conn.execute_command(  # type: ignore[no-untyped-call]
                        "XREAD",
                        "COUNT",
                        _READ_COUNT,
                        "BLOCK",
                        _BLOCK_MS,
                        "STREAMS",
                        *keys,
                        *self.cursors.values(),
                    )
                    delay = 0.05
                except (RedisError, OSError, Unavailable) as exc:
                    # Down, or (on a cluster) no longer serving the slot: find its primary anew.
                    logger.warning("event reader lost Redis ({}); retrying", type(exc).__name__)
                    await self._disconnect()
                    self.moved = True
                    await asyncio.sleep(delay)  # back off while Redis is down
                    delay = min(delay * 2, 2.0)
                    continue
                self.hub.deliver(self, response)
        finally:
            await self._disconnect()


class RedisEventHub(EventHub):
    def __init__(
        self,
        store: RedisStore,
        url: str,
        *,
        client_buffer: int = 1000,
        connect_timeout: float = 1.0,
    ) -> None:
        self.store = store  # catch-up reads (XRANGE) go through the store
        self.redis: Connection = store.redis
        self.keys: Keys = store.keys
        self.url = url
        self.connect_timeout = connect_timeout
        self._client_buffer = client_buffer
        self._subs: dict[str, set[_Subscriber]] = {}
        self._readers: dict[int | None, _Reader] = {}  # by slot (None: a single server)
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    def connect(self, url: str, socket_timeout: float) -> aioredis.Redis:
        """One connection of a reader's own (callers queue for it). No retry: the reader
        reconnects by itself, to the slot's current primary on a cluster."""
        return dedicated_client(
            url,
            socket_timeout=socket_timeout,
            connect_timeout=self.connect_timeout,
            client_name="conversational-core-events",
        )

    async def close(self) -> None:
        self._closed = True
        for reader in self._readers.values():
            self._stop(reader)
        self._readers.clear()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        for subs in self._subs.values():
            for sub in subs:
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(None)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, conversation_id: str, after: str | None
    ) -> AsyncIterator[AsyncIterator[Event]]:
        if after is not None:
            after = _fmt(_stream_id(after))  # ValueError for garbage; "5" means "5-0"
        else:
            after = await self.store.last_event_id(conversation_id) or "0-0"
        sub = _Subscriber(asyncio.Queue(self._client_buffer), buffer_limit=self._client_buffer)
        try:
            yield self._iterate(conversation_id, sub, after)
        finally:
            self._unwatch(conversation_id, sub)

    async def _iterate(
        self, conversation_id: str, sub: _Subscriber, after: str
    ) -> AsyncIterator[Event]:
        last = _stream_id(after)
        cursor = after
        # 1. Catch up at the client's pace, straight from the stream (not through the bounded
        #    queue: a client far behind is not "slow", it just has more to read).
        while True:
            events = await self.store.read_events(conversation_id, cursor, _CATCH_UP_CHUNK)
            for event in events:
                last = _stream_id(event.id)
                yield event
            if len(events) < _CATCH_UP_CHUNK:
                break
            cursor = events[-1].id
        # 2. Watch the stream from here, buffering; one more XRANGE closes the gap between the
        #    last read and the moment the reader started handing events over.
        sub.buffering = True
        self._watch(conversation_id, sub, _fmt(last))
        tail = await self.store.read_events(conversation_id, _fmt(last), 100_000)
        buffered, sub.buffer = sub.buffer, []
        sub.live = True
        for event in [*tail, *buffered]:
            key = _stream_id(event.id)
            if key > last:
                last = key
                yield event
        # 3. Live: events in order from the reader, duplicates of the above skipped.
        while True:
            item = await sub.queue.get()
            if sub.overflowed:
                raise SlowConsumer
            if item is None:
                return
            key = _stream_id(item.id)
            if key > last:
                last = key
                yield item

    def _watch(self, conversation_id: str, sub: _Subscriber, after: str) -> None:
        self._subs.setdefault(conversation_id, set()).add(sub)
        if self._closed:
            sub.queue.put_nowait(None)  # ends the subscription
            return
        slot = self.redis.slot_of(self.keys.events(conversation_id))
        reader = self._readers.get(slot)
        if reader is None:
            reader = self._readers[slot] = _Reader(self, slot)
        if conversation_id not in reader.cursors:
            reader.cursors[conversation_id] = after
            reader.wake()
        reader.start()

    def _unwatch(self, conversation_id: str, sub: _Subscriber) -> None:
        subs = self._subs.get(conversation_id)
        if subs is None:
            return
        subs.discard(sub)
        if subs:
            return
        del self._subs[conversation_id]
        slot = self.redis.slot_of(self.keys.events(conversation_id))
        reader = self._readers.get(slot)
        if reader is None:
            return
        reader.cursors.pop(conversation_id, None)
        if not reader.cursors:
            del self._readers[slot]
            self._stop(reader)

    def _stop(self, reader: _Reader) -> None:
        if reader.task is not None and not reader.task.done():
            # Cancelling alone is not enough on Python 3.11: redis-py writes under
            # asyncio.wait_for, which swallows a cancel that arrives as the write completes
            # (fixed in 3.12); the reader would then block for a whole XREAD. Unblocked with no
            # conversation left, it stops by itself.
            reader.cursors.clear()
            reader.wake()
            reader.task.cancel()
            self._stopping.add(reader.task)
            reader.task.add_done_callback(self._stopping.discard)

    def deliver(self, reader: _Reader, response: Any) -> None:
        """Hand what one XREAD returned to the subscribers, and move the reader's cursors."""
        for key, entries in response or ():
            if not entries:
                continue
            cid = conversation_of(key.decode() if isinstance(key, bytes) else key)
            if cid in reader.cursors:
                last = entries[-1][0]
                reader.cursors[cid] = last.decode() if isinstance(last, bytes) else last
            subs = self._subs.get(cid)
            if not subs:
                continue
            for entry_id, fields in entries:
                event = stream_event(entry_id, fields)
                for sub in list(subs):
                    sub.offer(event)


def _node_url(url: str, host: str, port: int) -> str:
    """`url` (credentials, TLS, options) pointed at one cluster node."""
    parsed = urlparse(url)
    credentials, _, _ = parsed.netloc.rpartition("@")
    netloc = f"{credentials}@" if credentials else ""
    host = f"[{host}]" if ":" in host else host
    return urlunparse(parsed._replace(netloc=f"{netloc}{host}:{port}", path=""))
