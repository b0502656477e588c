"""Live conversation events from Redis Streams, fanned out to this process's SSE clients.

One reader task per process, on one dedicated connection, runs `XREAD BLOCK` over the streams of
every conversation that has a client here, and hands each event to that conversation's
subscribers. Holding one blocked connection per client instead would not scale (1,000 clients,
1,000 connections) and polling would add latency. When a client subscribes to a conversation
the reader is not yet watching, the reader's blocked call is interrupted with `CLIENT UNBLOCK`
so that the new stream is watched at once.

A subscription is gap- and duplicate-free: it first reads what it missed with XRANGE (catch-up)
while the reader buffers live events for it, then drains that buffer skipping ids it already
has, and only then goes live. Each subscriber has a bounded queue; a subscriber whose queue is
full is dropped (SlowConsumer) without slowing the others.

Not cluster-aware yet: one XREAD names many conversations' streams, which live in different
slots (the production issue groups them per node).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from loguru import logger
from redis.exceptions import RedisError

from conversational_core.errors import StoreUnavailable
from conversational_core.storage.base import Event, EventHub, SlowConsumer
from conversational_core.storage.redis import RedisStore, _event

_BLOCK_MS = 5_000
_READ_COUNT = 500
_CATCH_UP_CHUNK = 500


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


class RedisEventHub(EventHub):
    def __init__(
        self,
        store: RedisStore,
        url: str,
        *,
        client_buffer: int = 1000,
        connect_timeout: float = 1.0,
    ) -> None:
        self._store = store
        self._client_buffer = client_buffer
        # The reader's own connection: it spends its life blocked in XREAD.
        self._reader = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=None,
            client_name="conversational-core-events",
            max_connections=1,
        )
        self._subs: dict[str, set[_Subscriber]] = {}
        self._cursors: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._reader_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for subs in self._subs.values():
            for sub in subs:
                with contextlib.suppress(asyncio.QueueFull):
                    sub.queue.put_nowait(None)
        await self._reader.aclose()

    @contextlib.asynccontextmanager
    async def subscribe(
        self, conversation_id: str, after: str | None
    ) -> AsyncIterator[AsyncIterator[Event]]:
        if after is not None:
            after = _fmt(_stream_id(after))  # ValueError for garbage; "5" means "5-0"
        else:
            after = await self._store.last_event_id(conversation_id) or "0-0"
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
            events = await self._store.read_events(conversation_id, cursor, _CATCH_UP_CHUNK)
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
        tail = await self._store.read_events(conversation_id, _fmt(last), 100_000)
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
        subs = self._subs.setdefault(conversation_id, set())
        subs.add(sub)
        if conversation_id not in self._cursors:
            self._cursors[conversation_id] = after
            self._wake()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="event-reader")

    def _unwatch(self, conversation_id: str, sub: _Subscriber) -> None:
        subs = self._subs.get(conversation_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[conversation_id]
            self._cursors.pop(conversation_id, None)

    def _wake(self) -> None:
        self._changed.set()
        if self._reader_id is not None:
            # Interrupt the reader's blocked XREAD so that it watches the new stream at once.
            task = asyncio.create_task(self._unblock(self._reader_id))
            task.add_done_callback(lambda t: t.exception())

    async def _unblock(self, client_id: int) -> None:
        with contextlib.suppress(RedisError, OSError, StoreUnavailable):
            await self._store.command("CLIENT", "UNBLOCK", client_id)

    async def _run(self) -> None:
        delay = 0.05
        while not self._closed:
            if not self._cursors:
                self._changed.clear()
                await self._changed.wait()
                continue
            # One turn of the loop first: events published meanwhile are read in one XREAD
            # (each call names every watched stream, so fewer, fuller calls are cheaper).
            await asyncio.sleep(0)
            if not self._cursors:
                continue
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                self._changed.clear()
                streams: dict[Any, Any] = {
                    self._store.events_key(cid): cursor for cid, cursor in self._cursors.items()
                }
                response: Any = await self._reader.xread(
                    streams, count=_READ_COUNT, block=_BLOCK_MS
                )
                delay = 0.05
            except (RedisError, OSError) as exc:
                self._reader_id = None
                logger.warning("event reader lost Redis ({}); retrying", type(exc).__name__)
                await asyncio.sleep(delay)  # back off while Redis is down
                delay = min(delay * 2, 2.0)
                continue
            for key, entries in response or ():
                name = key.decode() if isinstance(key, bytes) else key
                cid = self._cid_of(name)
                subs = self._subs.get(cid)
                if not entries:
                    continue
                if cid in self._cursors:
                    last = entries[-1][0]
                    self._cursors[cid] = last.decode() if isinstance(last, bytes) else last
                if not subs:
                    continue
                for entry_id, fields in entries:
                    event = _event(entry_id, fields)
                    for sub in list(subs):
                        sub.offer(event)

    def _cid_of(self, key: str) -> str:
        start = key.index("{") + 1
        return key[start : key.index("}", start)]
