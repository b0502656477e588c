"""The Redis event hub with many conversations watched at once: on a cluster their streams are in
different slots and nodes, read by one pub/sub connection per slot (our own reader on redis://
URLs, redis-py's PubSub on the others: both are run here)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

import orjson
import pytest

from conversational_core.storage.base import Event
from conversational_core.storage.redis.client import PubSubConnection
from conversational_core.storage.redis.events import (
    RedisEventHub,
    _node_url,
    _RawChannel,
    _Reader,
    _stream_id,
)
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import url_of
from tests.fixtures.events import subscribed
from tests.fixtures.tcp import pipe
from tests.test_store_contract import conversation, message

_CONVERSATIONS = 12


async def _contents(events: AsyncIterator[Event], n: int) -> list[str]:
    out: list[str] = []
    async for event in events:
        out.append(orjson.loads(event.data)["message"]["content"])
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("pooled", [False, True], ids=["own-reader", "redis-py-pubsub"])
async def test_each_subscriber_gets_its_own_conversation_live(
    any_redis_store: RedisStore, pooled: bool
) -> None:
    store = any_redis_store
    hub = RedisEventHub(store, url_of(store))
    hub.pooled_channels = pooled
    cids = [(await store.create_conversation(conversation()))[0].id for _ in range(_CONVERSATIONS)]
    if store.redis.cluster:
        assert len({store.redis.slot_of(store.keys.events(cid)) for cid in cids}) > 1
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(subscribed(hub, cid, None)) for cid in cids]
        # Every conversation's events reach its subscriber, and only them, although they are
        # read by different readers (one per slot on a cluster).
        readers = [asyncio.create_task(_contents(stream, 3)) for stream in streams]
        for cid in cids:
            for n in range(3):
                msg = message(cid, f"{cid}-{n}")
                await store.append_messages(cid, "alice", [msg], msg.created_at)
        got = await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert got == [[f"{cid}-{n}" for n in range(3)] for cid in cids]
    assert not hub._readers  # the last subscriber of a slot gone, its reader stops
    await hub.close()


async def test_clients_leaving_together_unsubscribe_in_one_go(any_redis_store: RedisStore) -> None:
    """Many subscriptions closed at once (clients gone): their channels are unsubscribed, the
    one left keeps its events, and nothing fails on the way (no task left with an error)."""
    store = any_redis_store
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    hub = RedisEventHub(store, url_of(store))
    try:
        cids = [(await store.create_conversation(conversation()))[0].id for _ in range(40)]
        kept_cid = cids[0]
        async with contextlib.AsyncExitStack() as keep:
            kept = await keep.enter_async_context(subscribed(hub, kept_cid, None))
            async with contextlib.AsyncExitStack() as leaving:
                streams = [kept] + [
                    await leaving.enter_async_context(subscribed(hub, cid, None))
                    for cid in cids[1:]
                ]
                # Every subscription live: an event appended once each has had one comes
                # after its subscription went live (its catch-up read was done by then).
                for text in ("first", "second"):
                    reads = [asyncio.create_task(_contents(s, 1)) for s in streams]
                    for cid in cids:
                        msg = message(cid, text)
                        await store.append_messages(cid, "alice", [msg], msg.created_at)
                    assert await asyncio.wait_for(asyncio.gather(*reads), 10) == [[text]] * 40
            readers = [r for r in hub._readers.values() if r.unsubscriber is not None]
            await asyncio.gather(*(r.unsubscriber for r in readers if r.unsubscriber))
            watched = {cid for r in hub._readers.values() for cid in r.subscribed}
            assert watched == {kept_cid}
            if not store.redis.cluster:
                counts = await store.redis.call(
                    "PUBSUB", "SHARDNUMSUB", *(store.keys.events(c) for c in cids)
                )
                assert counts[1::2] == [1] + [0] * (len(cids) - 1)
            msg = message(kept_cid, "still here")
            await store.append_messages(kept_cid, "alice", [msg], msg.created_at)
            assert await asyncio.wait_for(_contents(kept, 1), 10) == ["still here"]
        gc.collect()  # a task whose error nobody retrieved is reported when collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
        await hub.close()
    assert errors == []


async def test_a_subscriber_resuming_from_the_future_hides_nothing_from_the_others(
    redis_store: RedisStore,
) -> None:
    """The first subscriber of a conversation in a process resumes after an id later than any
    event (the API refuses one, but the hub must not depend on it): the others still get every
    event (the reader's cursor, shared by a conversation's subscribers, once took that id and
    skipped everything up to it, for all of them)."""
    store = redis_store
    hub = RedisEventHub(store, url_of(store))
    cid = (await store.create_conversation(conversation()))[0].id
    first = message(cid, "before")
    await store.append_messages(cid, "alice", [first], first.created_at)
    last = await store.last_event_id(cid)
    assert last is not None
    future = f"{int(last.split('-')[0]) + 3_600_000}-0"
    channel = store.keys.events(cid)
    try:
        async with subscribed(hub, cid, future) as early:
            waiting = asyncio.ensure_future(anext(early))  # it subscribes; it gets nothing
            async with asyncio.timeout(10):
                while (await store.redis.call("PUBSUB", "SHARDNUMSUB", channel))[1] != 1:
                    await asyncio.sleep(0.01)  # (polled: Redis's side has no hook to wait on)
            async with subscribed(hub, cid, None) as later:
                reading = asyncio.create_task(_contents(later, 2))
                for text in ("one", "two"):
                    m = message(cid, text)
                    await store.append_messages(cid, "alice", [m], m.created_at)
                assert await asyncio.wait_for(reading, 10) == ["one", "two"]
            waiting.cancel()
    finally:
        await hub.close()


@pytest.mark.parametrize("pooled", [False, True], ids=["own-reader", "redis-py-pubsub"])
async def test_a_quiet_connection_is_pinged_and_kept(
    redis_store: RedisStore, pooled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing happens for several idle periods: the reader pings, Redis answers, and the
    connection it had is still the one that brings the next event (no reconnection)."""
    from conversational_core.storage.redis import events as hub_module

    # (A pong later than one idle period is taken for a dead connection: 50 ms was too short
    # for a loaded machine running the suite in parallel, once.)
    monkeypatch.setattr(hub_module, "_IDLE_SECONDS", 0.15)
    store = redis_store
    hub = RedisEventHub(store, url_of(store))
    hub.pooled_channels = pooled
    cid = (await store.create_conversation(conversation()))[0].id
    try:
        async with subscribed(hub, cid, None) as events:
            reading = asyncio.create_task(_contents(events, 1))
            while not hub._readers:  # (its reader starts once the subscription is read from)
                await asyncio.sleep(0)
            (reader,) = hub._readers.values()
            await reader.ready.wait()
            channel = reader.channel
            await asyncio.sleep(0.6)  # four idle periods: the time is the point of the test
            msg = message(cid, "after the quiet")
            await store.append_messages(cid, "alice", [msg], msg.created_at)
            assert await asyncio.wait_for(reading, 10) == ["after the quiet"]
            assert reader.channel is channel
    finally:
        await hub.close()


async def _one_event_seen(store: RedisStore) -> tuple[str, str]:
    """A conversation of one message, and the id of its event (a client's Last-Event-ID)."""
    cid = (await store.create_conversation(conversation()))[0].id
    m = message(cid, "seen")
    await store.append_messages(cid, "alice", [m], m.created_at)
    seen = await store.last_event_id(cid)
    assert seen is not None
    return cid, seen


async def test_events_trimmed_while_a_client_catches_up_are_not_skipped_unseen(
    redis_store: RedisStore,
) -> None:
    """Whether the events after a client's id are all retained is asked in the catch-up read
    itself: when they are trimmed between the client's request and the read (or between two
    chunks of a long catch-up), the client is told to resync (`conversation.resync`, its id
    the newest event's) rather than handed the events after the gap as if none were missing."""
    store = RedisStore(redis_store.redis, redis_store.keys, events_max_len=10)
    hub = RedisEventHub(store, url_of(store))
    cid, seen = await _one_event_seen(store)
    try:
        async with hub.subscribe(cid, seen) as batches:  # (read on the first anext)
            for i in range(300):  # trimmed past `seen` meanwhile (whole nodes: MAXLEN ~)
                m = message(cid, f"m{i}")
                await store.append_messages(cid, "alice", [m], m.created_at)
            assert (await store.read_events(cid, None, 1))[0].id != seen
            (resync,) = await asyncio.wait_for(anext(batches), 10)
            assert resync.type == "conversation.resync"
            assert orjson.loads(resync.data) == {"conversation_id": cid, "last_event_id": seen}
            assert resync.id == await store.last_event_id(cid)
            m = message(cid, "next")
            await store.append_messages(cid, "alice", [m], m.created_at)
            (batch,) = [await asyncio.wait_for(anext(batches), 10)]
            assert [orjson.loads(e.data)["message"]["content"] for e in batch] == ["next"]
    finally:
        await hub.close()


async def test_a_resume_that_finds_the_conversation_deleted_gets_the_deletion(
    redis_store: RedisStore,
) -> None:
    """Deleting a conversation empties its stream but for `conversation.deleted`: a client
    resuming then (after the API's check that it exists, or between two chunks of its catch-up)
    gets that event, which ends its stream, rather than a resync whose id would skip it."""
    store = redis_store
    hub = RedisEventHub(store, url_of(store))
    cid, seen = await _one_event_seen(store)
    try:
        async with hub.subscribe(cid, seen) as batches:  # (read on the first anext)
            await store.delete_conversation(cid, "alice")
            (deleted,) = await asyncio.wait_for(anext(batches), 10)
        assert deleted.type == "conversation.deleted"
        assert deleted.id == await store.last_event_id(cid)
    finally:
        await hub.close()


class _Cuttable:
    """A TCP relay to Redis for the event hub's reader: while cut, its connections are closed
    and new ones are closed as they come (the reader sees Redis gone, the store's own
    connections do not)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.cut_off = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.cut_off = True
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("gone", ["trimmed", "expired"])
async def test_events_trimmed_while_the_reader_was_cut_off_are_a_resync(
    redis_store: RedisStore, gone: str
) -> None:
    """The reader catches up on what was written while it was cut off from Redis; when some of
    that is no longer retained (EVENTS_MAX_LEN written meanwhile), its subscribers are told to
    resync (its id the newest event's) rather than handed what follows the gap. When the
    stream is gone altogether (expired), nothing is owed: the next event comes as usual."""
    store = RedisStore(redis_store.redis, redis_store.keys, events_max_len=10)
    url = urlparse(url_of(store))
    relay = _Cuttable(url.hostname or "127.0.0.1", url.port or 6379)
    hub = RedisEventHub(store, _node_url(url_of(store), "127.0.0.1", await relay.start()))
    try:
        cid, _ = await _one_event_seen(store)
        async with subscribed(hub, cid, None) as events:
            first = asyncio.ensure_future(anext(events))  # (the subscription starts)

            async def reading() -> Any:
                while not hub._readers:
                    await asyncio.sleep(0)
                (reader,) = hub._readers.values()
                await reader.ready.wait()  # listening through the relay
                return reader

            reader = await asyncio.wait_for(reading(), 10)
            m = message(cid, "before")
            await store.append_messages(cid, "alice", [m], m.created_at)
            before = await store.last_event_id(cid)
            event = await asyncio.wait_for(first, 10)
            while event.id != before:  # (the append's events, up to its last)
                event = await asyncio.wait_for(anext(events), 10)
            relay.cut()

            async def lost() -> None:
                while reader.ready.is_set():
                    await asyncio.sleep(0)

            await asyncio.wait_for(lost(), 10)  # (the reader saw it)
            if gone == "expired":
                await store.redis.call("DEL", store.keys.events(cid))
            else:
                for i in range(300):  # trimmed past `before` meanwhile (whole nodes: MAXLEN ~)
                    m = message(cid, f"m{i}")
                    await store.append_messages(cid, "alice", [m], m.created_at)
                assert (await store.read_events(cid, None, 1))[0].id != before
            relay.cut_off = False
            if gone == "trimmed":
                resync = await asyncio.wait_for(anext(events), 10)
                assert resync.type == "conversation.resync"
                assert orjson.loads(resync.data) == {
                    "conversation_id": cid,
                    "last_event_id": before,
                }
                assert resync.id == await store.last_event_id(cid)
            else:
                await asyncio.wait_for(reader.ready.wait(), 10)  # back, and caught up
            m = message(cid, "next")
            await store.append_messages(cid, "alice", [m], m.created_at)
            after = await asyncio.wait_for(anext(events), 10)
            assert orjson.loads(after.data)["message"]["content"] == "next"
    finally:
        await hub.close()
        await relay.close()


async def test_events_written_while_the_reader_reconnects_come_once_and_in_order(
    redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages written without a pause (ten at a time) while the reader's connection is cut
    ten times, each time once it is live again on a new connection: the subscriber gets each
    message exactly once, in the stream's order (those read on reconnecting, those that came
    while it caught up, and those handed over live as they were read)."""
    handed_live = 0
    message_of = _Reader._message

    def counted(reader: _Reader, kind: str, channel: bytes, raw: Any) -> None:
        nonlocal handed_live
        if kind == "smessage" and asyncio.current_task() is None:  # (from data_received)
            handed_live += 1
        message_of(reader, kind, channel, raw)

    monkeypatch.setattr(_Reader, "_message", counted)
    store = redis_store
    url = urlparse(url_of(store))
    relay = _Cuttable(url.hostname or "127.0.0.1", url.port or 6379)
    hub = RedisEventHub(store, _node_url(url_of(store), "127.0.0.1", await relay.start()))
    cid = (await store.create_conversation(conversation()))[0].id
    written: list[str] = []
    stop = asyncio.Event()

    async def append(content: str) -> None:
        m = message(cid, content)
        await store.append_messages(cid, "alice", [m], m.created_at)
        written.append(content)

    async def write() -> None:
        while not stop.is_set():
            await asyncio.gather(*(append(f"m{len(written)}-{i}") for i in range(10)))

    cuts, channels = 0, set()
    try:
        async with subscribed(hub, cid, None) as events:
            writer = asyncio.create_task(write())
            got: list[tuple[str, str]] = []  # (event id, message content)
            async with asyncio.timeout(20):
                async for event in events:
                    got.append((event.id, orjson.loads(event.data)["message"]["content"]))
                    if stop.is_set():
                        if len(got) == len(written):
                            break
                        continue
                    reader = hub._readers.get(None)
                    channel = reader.channel if reader is not None else None
                    if reader is None or not reader.ready.is_set() or channel in channels:
                        continue  # (not live again yet since the last cut)
                    channels.add(channel)
                    if cuts < 10:
                        relay.cut()  # the reader sees Redis gone, reconnects, catches up
                        relay.cut_off = False
                        cuts += 1
                    else:
                        stop.set()
                        await writer
                        if len(got) == len(written):
                            break
    finally:
        stop.set()
        await hub.close()
        await relay.close()
    assert cuts == 10 and len(channels) == 11  # live on eleven connections in turn
    assert handed_live > 0  # (messages did go live, straight from the connection)
    ids = [_stream_id(event_id) for event_id, _ in got]
    assert ids == sorted(set(ids))  # in order, none twice
    assert sorted(content for _, content in got) == sorted(written)  # none lost


async def test_a_live_channel_hands_messages_over_as_read_and_those_before_it_first(
    redis_store: RedisStore,
) -> None:
    """Once live, the reader's connection hands each message to the hub as it reads it (not
    through the reader's task); the messages read before are returned, in order, for the
    reader to hand over first, and the other replies (a pong) still go to the reader."""
    store = redis_store
    name = store.keys.events("live-channel-test")
    connection = await PubSubConnection.open(url_of(store), io_timeout=5, connect_timeout=5)
    channel = _RawChannel(connection)
    try:
        await channel.subscribe([name])
        assert [kind for kind, _, _ in await channel.replies(5)] == ["ssubscribe"]
        for n in range(3):
            await store.redis.call("SPUBLISH", name, f"before {n}")
        async with asyncio.timeout(10):
            while len(connection.inbox) < 3:  # (read by the connection, not yet taken)
                await asyncio.sleep(0.001)
        handed: list[bytes] = []
        before = channel.live(lambda kind, _, data: handed.append(data))
        assert [data for _, _, data in before] == [b"before 0", b"before 1", b"before 2"]
        assert handed == []
        for n in range(2):
            await store.redis.call("SPUBLISH", name, f"live {n}")
        await channel.ping()
        # The pong comes after both messages on the connection: by then they were handed over.
        assert [kind for kind, _, _ in await channel.replies(5)] == ["pong"]
        assert handed == [b"live 0", b"live 1"]
    finally:
        await channel.aclose()
