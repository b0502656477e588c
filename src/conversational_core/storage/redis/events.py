"""Live conversation events from Redis, fanned out to this process's SSE clients.

Every script that appends an event to a conversation's stream (XADD) also publishes it, in the
same script, on the conversation's sharded pub/sub channel (SPUBLISH; the channel is named as
the stream key, so it lives in the stream's slot, on the node that serves it). A process holds
one pub/sub connection per slot that has watched conversations (one in all on a single server)
and subscribes (SSUBSCRIBE) to the channel of each conversation that has a client here. Redis
then sends it the events of those conversations and nothing else: what a process reads grows
with the events of its own clients' conversations, not with how many it watches. (The reader
before this named every watched stream in each XREAD: 10,000 watched conversations meant
20,000 arguments per read, encoded, sent and looked up each time something happened.)

Pub/sub delivers only while connected; the streams keep every event. So a subscription is
gap- and duplicate-free: it first reads what it missed with XRANGE (catch-up), then buffers
what the reader hands it while it waits for its channel's subscription to be confirmed, reads
the stream once more up to then, drains the buffer skipping ids it already has, and only then
goes live. A reader that loses its connection (Redis down, a failover, or a slot that moved:
Redis then unsubscribes its channels) reconnects to the slot's primary, subscribes again, and
reads each watched stream from the last event it handed over before going live again: no
event is lost or repeated. Each subscriber has a bounded queue; a subscriber whose queue is
full is dropped (SlowConsumer) without slowing the others.

The pub/sub connections are read by client.PubSubConnection on `redis://` URLs (once live,
messages handed to their subscribers as they are parsed, the other replies to the reader's task)
and by redis-py's PubSub on the others (TLS): redis-py's `get_message` per message was a fifth of
the API's CPU while it relayed replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse, urlunparse

import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from conversational_core.storage.base import Event, EventHub, SlowConsumer
from conversational_core.storage.errors import Unavailable
from conversational_core.storage.redis.client import (
    Connection,
    PubSubConnection,
    RespClient,
    dedicated_client,
)
from conversational_core.storage.redis.keys import Keys, conversation_of
from conversational_core.storage.redis.store import RedisStore
from conversational_core.storage.resync import resync_event

# A quiet connection is pinged after _IDLE_SECONDS; one that stays silent twice that long is
# taken for gone (a node that went away says nothing).
_IDLE_SECONDS = 5.0
_READ_TIMEOUT = _IDLE_SECONDS + 5
_CATCH_UP_CHUNK = 500
_CATCH_UP_CONCURRENCY = 100  # streams read at once when a reader catches up after reconnecting
_SUBSCRIBE_CHUNK = 1000  # channels per SSUBSCRIBE when a reader (re)subscribes everything
_ID_PART_MAX = 2**64 - 1  # each part of a stream id is an unsigned 64-bit number
_CLOCK_SKEW_MS = 60_000  # how far ahead of this host's clock Redis's may be, at most


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


# A reply on a pub/sub connection: (kind, channel, data), e.g. ("smessage", channel, payload),
# ("ssubscribe", channel, count), ("pong", b"", b"").
Reply = tuple[str, bytes, Any]


class _Channel(ABC):
    """A reader's pub/sub connection: a PubSubConnection (client.py) on `redis://` URLs, redis-py's
    PubSub on the others (TLS)."""

    @abstractmethod
    async def subscribe(self, channels: list[str]) -> None: ...

    @abstractmethod
    async def unsubscribe(self, channels: list[str]) -> None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def replies(self, wait: float) -> list[Reply]:
        """What came since the last call, waiting up to `wait` seconds for something."""

    @abstractmethod
    async def aclose(self) -> None: ...

    def live(self, message: Callable[[str, bytes, Any], None]) -> list[Reply]:
        """From now on, hand each message (`smessage`) to `message` as soon as it is read, if
        this channel can (then :meth:`replies` has the other replies only); returns what came
        before, which the caller takes first, in the same turn, to keep the order."""
        return []


class _RawChannel(_Channel):
    def __init__(self, connection: PubSubConnection) -> None:
        self.connection = connection

    async def subscribe(self, channels: list[str]) -> None:
        self.connection.command("SSUBSCRIBE", *channels)

    async def unsubscribe(self, channels: list[str]) -> None:
        self.connection.command("SUNSUBSCRIBE", *channels)

    async def ping(self) -> None:
        self.connection.command("PING")

    async def replies(self, wait: float) -> list[Reply]:
        return self._decoded(await self.connection.replies(wait))

    def live(self, message: Callable[[str, bytes, Any], None]) -> list[Reply]:
        # The event is handed to its subscribers by the connection's data_received, in the turn
        # that read it: through the reader's task it waited for another turn of a busy loop
        # before its SSE task's (bench/relay.py: the first delta's XADD → client time).
        def take(reply: Any) -> bool:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"smessage":
                message("smessage", reply[1], reply[2])
                return True
            return False

        early, self.connection.inbox = self.connection.inbox, []
        self.connection.take = take
        return self._decoded(early)

    @staticmethod
    def _decoded(replies: list[Any]) -> list[Reply]:
        out: list[Reply] = []
        for reply in replies:
            if isinstance(reply, list) and len(reply) == 3:
                out.append((reply[0].decode(), reply[1], reply[2]))
            elif reply == b"PONG" or (isinstance(reply, list) and reply and reply[0] == b"pong"):
                out.append(("pong", b"", b""))  # (PONG: no channel subscribed at that moment)
            elif isinstance(reply, Exception):
                # e.g. MOVED for a channel whose slot is served elsewhere now: reconnect
                raise ConnectionError(f"Redis refused a subscription: {reply}")
        return out

    async def aclose(self) -> None:
        self.connection.close()


class _PooledChannel(_Channel):
    def __init__(self, conn: aioredis.Redis) -> None:
        self.conn = conn
        self.pubsub: PubSub = conn.pubsub()

    async def subscribe(self, channels: list[str]) -> None:
        await self.pubsub.ssubscribe(*channels)

    async def unsubscribe(self, channels: list[str]) -> None:
        await self.pubsub.sunsubscribe(*channels)

    async def ping(self) -> None:
        await self.pubsub.ping()

    async def replies(self, wait: float) -> list[Reply]:
        message = await self.pubsub.get_message(timeout=wait)
        if message is None:
            return []
        return [(message["type"], message.get("channel") or b"", message.get("data"))]

    async def aclose(self) -> None:
        for closing in (self.pubsub, self.conn):
            with contextlib.suppress(RedisError, OSError, ConnectionError):
                await closing.aclose()


class _Reader:
    """One pub/sub connection to the node serving a group of conversations (all of them on a
    single server, one slot's on a cluster), subscribed to their channels."""

    def __init__(self, hub: RedisEventHub, slot: int | None) -> None:
        self.hub = hub
        self.slot = slot
        self.cursors: dict[str, str] = {}  # conversation id -> last event id handed over
        self.channel: _Channel | None = None
        self.subscribed: set[str] = set()  # conversations subscribed on this connection
        self.confirming: dict[bytes, list[asyncio.Future[None]]] = {}  # channel -> waiters
        self.ready = asyncio.Event()  # connected, subscribed to every watched channel, live
        self.leaving: set[str] = set()  # no longer watched, to unsubscribe (forget)
        self.unsubscriber: asyncio.Task[None] | None = None
        self.moved = False  # the slot map must be re-read before reconnecting
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None or self.task.done():
            # A context of its own: it serves every subscriber, not the request that started it
            # (whose request and user ids would otherwise mark all its log lines).
            self.task = asyncio.create_task(
                self._run(), name=f"event-reader-{self.slot}", context=contextvars.Context()
            )

    async def watch(self, conversation_id: str, after: str) -> None:
        """Watch a conversation from `after`: returns once its channel's subscription is
        confirmed (every later event reaches the hub), or once the hub closes."""
        cursor = self.cursors.get(conversation_id)
        if cursor is None or _stream_id(after) < _stream_id(cursor):
            # The earliest point of its subscribers: events after it are handed over (each
            # subscriber skips what it has). Never a later one: the events up to it would be
            # skipped for every subscriber (a client's id from the future would silence them).
            self.cursors[conversation_id] = after
        self.start()
        name = self.hub.keys.events(conversation_id)
        channel = name.encode()  # (as Redis names it in a confirmation)
        while conversation_id in self.cursors and not self.hub.closed:
            await self.ready.wait()
            subscriber = self.channel
            if conversation_id in self.subscribed or subscriber is None:
                return  # subscribed on connect, with every watched channel
            waiter = asyncio.get_running_loop().create_future()
            self.confirming.setdefault(channel, []).append(waiter)
            try:
                await subscriber.subscribe([name])
                await waiter
                return
            except (RedisError, OSError, ConnectionError):
                # The connection failed: the reader reconnects and subscribes everything.
                self.ready.clear()
            finally:
                waiters = self.confirming.get(channel)
                if waiters and waiter in waiters:
                    waiters.remove(waiter)

    def forget(self, conversation_id: str) -> None:
        """A conversation is no longer watched (its cursor already dropped): unsubscribe from
        its channel, with the others left in the same turn of the event loop (one command)."""
        if conversation_id not in self.subscribed:
            return
        self.leaving.add(conversation_id)
        if self.unsubscriber is None or self.unsubscriber.done():
            self.unsubscriber = asyncio.create_task(
                self._unsubscribe(), context=contextvars.Context()
            )

    async def _unsubscribe(self) -> None:
        await asyncio.sleep(0)  # one turn: the others that leave now go in the same command
        cids = [c for c in self.leaving if c not in self.cursors and c in self.subscribed]
        self.leaving.clear()
        subscriber = self.channel
        if not cids or subscriber is None:
            return
        self.subscribed.difference_update(cids)
        try:
            for at in range(0, len(cids), _SUBSCRIBE_CHUNK):
                chunk = cids[at : at + _SUBSCRIBE_CHUNK]
                await subscriber.unsubscribe([self.hub.keys.events(cid) for cid in chunk])
        except Exception as exc:  # a connection going away: the reader reconnects by itself
            logger.debug("event reader: unsubscribe failed ({})", type(exc).__name__)

    async def _connect(self) -> _Channel:
        address = await self.hub.redis.primary_of(
            self.hub.keys.events(next(iter(self.cursors))), refresh=self.moved
        )
        url = self.hub.url if address is None else _node_url(self.hub.url, *address)
        self.channel = await self.hub.connect(url, _READ_TIMEOUT)
        self.moved = False
        return self.channel

    async def _disconnect(self) -> None:
        self.ready.clear()
        self.subscribed.clear()
        for waiters in self.confirming.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the event reader lost Redis"))
        self.confirming.clear()
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.aclose()

    async def _subscribe_all(self, channel: _Channel) -> list[Reply]:
        """Subscribe to every watched channel; the messages that came meanwhile."""
        cids = list(self.cursors)
        pending = {self.hub.keys.events(cid).encode() for cid in cids}
        for at in range(0, len(cids), _SUBSCRIBE_CHUNK):
            chunk = cids[at : at + _SUBSCRIBE_CHUNK]
            await channel.subscribe([self.hub.keys.events(cid) for cid in chunk])
        early: list[Reply] = []
        while pending:
            replies = await channel.replies(_READ_TIMEOUT)
            if not replies:
                raise ConnectionError("no subscription confirmed in time")
            for kind, name, data in replies:
                if kind == "ssubscribe":
                    pending.discard(name)
                elif kind == "smessage":
                    early.append((kind, name, data))
        self.subscribed.update(cids)
        return early

    async def _catch_up(self) -> None:
        """Hand over what each watched stream got since its cursor (after a (re)connection)."""
        cids = list(self.cursors)
        for at in range(0, len(cids), _CATCH_UP_CONCURRENCY):
            chunk = cids[at : at + _CATCH_UP_CONCURRENCY]
            read = await asyncio.gather(*(self._read_from_cursor(cid) for cid in chunk))
            for cid, events in zip(chunk, read, strict=True):
                for event in events:
                    self.hub.deliver(self, cid, event)

    async def _read_from_cursor(self, conversation_id: str) -> list[Event]:
        """The events after the cursor, written while this reader was not listening. When
        some of them are no longer retained (EVENTS_MAX_LEN written during a long outage, a
        failover that lost them), the conversation's subscribers are told to resync, as a
        client resuming past them is (EventHub.subscribe), rather than handed what follows the
        gap; or get the deletion, when that is the newest event. (When none is retained at
        all, the stream gone, there is nothing newer to hand over: a deleted conversation's
        stream outlived by the outage leaves its clients to learn it when they reconnect.)"""
        found: list[Event] = []
        cursor = self.cursors.get(conversation_id)
        while cursor is not None:
            events = await self.hub._catch_up(conversation_id, cursor)
            if events is None:  # (none retained at all: its id is the cursor's, deliver drops it)
                found.append(await self.hub._resync(conversation_id, cursor))
                break
            found.extend(events)
            if len(events) < _CATCH_UP_CHUNK:
                break
            cursor = events[-1].id
        return found

    async def _run(self) -> None:
        delay = 0.05
        try:
            while self.cursors and not self.hub.closed:
                try:
                    channel = self.channel or await self._connect()
                    early = await self._subscribe_all(channel)
                    await self._catch_up()
                    for reply in early:
                        self._message(*reply)
                    self.ready.set()
                    delay = 0.05
                    await self._listen(channel)
                except (RedisError, OSError, ConnectionError, Unavailable) as exc:
                    # Down, or (on a cluster) no longer serving the slot: find its primary anew.
                    if self.cursors and not self.hub.closed:
                        logger.warning("event reader lost Redis ({}); retrying", type(exc).__name__)
                    await self._disconnect()
                    self.moved = True
                    await asyncio.sleep(delay)  # back off while Redis is down
                    delay = min(delay * 2, 2.0)
        finally:
            await self._disconnect()

    async def _listen(self, channel: _Channel) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        for reply in channel.live(self._message):  # (what came before, first: in order)
            self._message(*reply)
        while self.cursors:
            replies = await channel.replies(_IDLE_SECONDS)
            if not replies:
                # Nothing for the reader (quiet, or only messages, which go live without it):
                # make sure the connection is alive (a node that went away says nothing).
                if pinged and loop.time() - heard > 2 * _IDLE_SECONDS:
                    raise ConnectionError("Redis stopped answering")
                if not pinged:
                    await channel.ping()
                    pinged = True
                continue
            heard, pinged = loop.time(), False
            for reply in replies:
                self._message(*reply)

    def _message(self, kind: str, channel: bytes, raw: Any) -> None:
        if kind == "smessage":
            cid = conversation_of(channel.decode())
            entry_id, _, rest = raw.partition(b"\n")
            event_type, _, data = rest.partition(b"\n")
            self.hub.deliver(self, cid, Event(entry_id.decode(), event_type.decode(), data))
        elif kind == "ssubscribe":
            cid = conversation_of(channel.decode())
            if cid in self.cursors:
                self.subscribed.add(cid)
            for waiter in self.confirming.pop(channel, ()):
                if not waiter.done():
                    waiter.set_result(None)
        elif kind == "sunsubscribe":
            cid = conversation_of(channel.decode())
            if cid in self.cursors and cid in self.subscribed:
                # Not ours: the slot moved to another node (resharding, failover).
                raise ConnectionError("Redis unsubscribed a watched channel (slot moved)")


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
        # redis-py's PubSub even on redis:// URLs (as on rediss://): for the tests of that path
        self.pooled_channels = False

    async def connect(self, url: str, socket_timeout: float) -> _Channel:
        """A pub/sub connection of a reader's own. No retry: the reader reconnects by itself,
        to the slot's current primary on a cluster."""
        if RespClient.supports(url) and not self.pooled_channels:
            connection = await PubSubConnection.open(
                url, io_timeout=socket_timeout, connect_timeout=self.connect_timeout
            )
            return _RawChannel(connection)
        conn = dedicated_client(
            url,
            socket_timeout=socket_timeout,
            connect_timeout=self.connect_timeout,
            client_name="conversational-core-events",
        )
        return _PooledChannel(conn)

    @property
    def closed(self) -> bool:
        return self._closed

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

    async def resumes(self, conversation_id: str, after: str) -> bool:
        try:
            ms, seq = _stream_id(after)
        except ValueError:
            return False  # (e.g. an id of the embedded store's form, after a move between stores)
        if ms > _ID_PART_MAX or seq > _ID_PART_MAX:
            return False  # not an id Redis can read
        last = await self.store.last_event_id(conversation_id)
        if last is not None:
            return (ms, seq) <= _stream_id(last)
        # No event retained (none yet, or the stream expired): its ids came from Redis's clock.
        return ms <= time.time() * 1000 + _CLOCK_SKEW_MS

    @contextlib.asynccontextmanager
    async def subscribe(
        self, conversation_id: str, after: str | None
    ) -> AsyncIterator[AsyncIterator[list[Event]]]:
        given = after is not None
        if after is not None:
            after = _fmt(_stream_id(after))  # ValueError for garbage; "5" means "5-0"
        else:
            after = await self.store.last_event_id(conversation_id) or "0-0"
        sub = _Subscriber(asyncio.Queue(self._client_buffer), buffer_limit=self._client_buffer)
        try:
            yield self._iterate(conversation_id, sub, after, checked=given)
        finally:
            self._unwatch(conversation_id, sub)

    async def _catch_up(self, conversation_id: str, cursor: str) -> list[Event] | None:
        """Up to a chunk of the retained events after `cursor`; None when some events after it
        are no longer retained: `cursor` (an event the client has) is not the first one kept,
        it was trimmed (or the stream expired). Asked in the read itself (from `cursor` on,
        included), so that no trimming between a check and the read goes unseen."""
        if cursor == "0-0":
            return await self.store.read_events(conversation_id, None, _CATCH_UP_CHUNK)
        events = await self.store.read_events_from(conversation_id, cursor, _CATCH_UP_CHUNK + 1)
        if not events:
            # None retained from `cursor` on: the stream expired (none left), or the id is later
            # than the newest (one from the future, which the API refuses: nothing to catch up).
            return None if await self.store.newest_event(conversation_id) is None else []
        if events[0].id != cursor:
            return None
        return events[1:]

    async def _resync(self, conversation_id: str, after: str) -> Event:
        """What a client whose events after `after` are gone is told (resync_event)."""
        newest = await self.store.newest_event(conversation_id)
        at = after if newest is None else max(newest.id, after, key=_stream_id)
        return resync_event(conversation_id, after, newest, at)

    async def _iterate(
        self, conversation_id: str, sub: _Subscriber, after: str, *, checked: bool
    ) -> AsyncIterator[list[Event]]:
        last = _stream_id(after)
        cursor = after
        # 1. Catch up at the client's pace, straight from the stream (not through the bounded
        #    queue: a client far behind is not "slow", it just has more to read). Events gone
        #    since the client's last: it is told to resync, and goes on from the newest event.
        #    A client that gave no id starts at 2.: it is owed what came after the newest event
        #    when it connected (`after`), which 2.'s read brings (a read here would be one more
        #    round trip for each client connecting, for the few events of one round trip).
        while checked:
            events = await self._catch_up(conversation_id, cursor)
            if events is None:
                resync = await self._resync(conversation_id, cursor)
                last = _stream_id(resync.id)
                yield [resync]
                break
            if events:
                last = _stream_id(events[-1].id)
                yield events
            if len(events) < _CATCH_UP_CHUNK:
                break
            cursor = events[-1].id
        # 2. Watch the stream from here, buffering; one more XRANGE closes the gap between the
        #    last read and the moment the reader started handing events over. (Not checked for
        #    trimming: that would take EVENTS_MAX_LEN events within this one round trip.)
        sub.buffering = True
        await self._watch(conversation_id, sub, _fmt(last))
        tail = await self.store.read_events(conversation_id, _fmt(last), 100_000)
        buffered, sub.buffer = sub.buffer, []
        sub.live = True
        batch = []
        for event in [*tail, *buffered]:
            key = _stream_id(event.id)
            if key > last:
                last = key
                batch.append(event)
        for at in range(0, len(batch), _CATCH_UP_CHUNK):
            yield batch[at : at + _CATCH_UP_CHUNK]
        # 3. Live: events in order from the reader, duplicates of the above skipped; what the
        #    queue holds at once goes as one batch (of a catch-up chunk at most).
        queue = sub.queue
        while True:
            item = await queue.get()
            batch = []
            while True:
                if sub.overflowed:
                    raise SlowConsumer
                if item is None:
                    if batch:
                        yield batch
                    return
                key = _stream_id(item.id)
                if key > last:
                    last = key
                    batch.append(item)
                if queue.empty() or len(batch) >= _CATCH_UP_CHUNK:
                    break
                item = queue.get_nowait()
            if batch:
                yield batch

    async def _watch(self, conversation_id: str, sub: _Subscriber, after: str) -> None:
        """Hand the conversation's events to `sub` from now on: returns once its channel's
        subscription is confirmed."""
        self._subs.setdefault(conversation_id, set()).add(sub)
        if self._closed:
            sub.queue.put_nowait(None)  # ends the subscription
            return
        slot = self.redis.slot_of(self.keys.events(conversation_id))
        reader = self._readers.get(slot)
        if reader is None:
            reader = self._readers[slot] = _Reader(self, slot)
        await reader.watch(conversation_id, after)

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
            return
        reader.forget(conversation_id)

    def _stop(self, reader: _Reader) -> None:
        reader.cursors.clear()
        reader.ready.set()  # (a subscription waiting for it ends: the hub is closing)
        for task in (reader.unsubscriber, reader.task):
            if task is not None and not task.done():
                task.cancel()
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        # Let go of them: each ends with a CancelledError whose traceback holds the reader (its
        # frames' `self`), a reference cycle through the reader that would keep both, and the
        # connection, until a full collection, each time the last client of a slot leaves.
        reader.task = reader.unsubscriber = None

    def deliver(self, reader: _Reader, conversation_id: str, event: Event) -> None:
        """Hand one event of a watched conversation to its subscribers (once: an event at or
        before the reader's cursor was handed over already), and move the cursor."""
        cursor = reader.cursors.get(conversation_id)
        if cursor is None:
            return  # no longer watched
        if _stream_id(event.id) <= _stream_id(cursor):
            return
        reader.cursors[conversation_id] = event.id
        for sub in list(self._subs.get(conversation_id, ())):
            sub.offer(event)


def _node_url(url: str, host: str, port: int) -> str:
    """`url` (credentials, TLS, options) pointed at one cluster node."""
    parsed = urlparse(url)
    credentials, _, _ = parsed.netloc.rpartition("@")
    netloc = f"{credentials}@" if credentials else ""
    host = f"[{host}]" if ":" in host else host
    return urlunparse(parsed._replace(netloc=f"{netloc}{host}:{port}", path=""))
