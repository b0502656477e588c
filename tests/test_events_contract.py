"""One contract suite for the event hub, run on every backend (Redis, Redis Cluster, embedded):
resume without gaps or duplicates, retention, malformed ids, slow consumers, closing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from conversational_core.storage.base import Event, EventHub, SlowConsumer, Store
from conversational_core.storage.embedded.events import MemoryEventLog
from conversational_core.storage.embedded.sqlite import open_sqlite_store
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import backend_for, make_settings
from tests.fixtures.events import subscribed
from tests.test_store_contract import conversation, message

_BUFFER = 10  # SSE_CLIENT_BUFFER, its smallest allowed value


@contextlib.asynccontextmanager
async def _hub(store: Store) -> AsyncIterator[EventHub]:
    """The event hub that goes with `store` (for the embedded store: its own log, made with
    the store; see the fixtures below)."""
    backend = backend_for(store, make_settings(SSE_CLIENT_BUFFER=_BUFFER))
    try:
        yield backend.events
    finally:
        await backend.events.close()


@pytest.fixture
async def store(store: Store, tmp_path: Path) -> AsyncIterator[Store]:
    """The backend with a client buffer of _BUFFER events (the embedded store's event log is
    made with the store: a store of its own)."""
    if isinstance(store, RedisStore):
        yield store
        return
    async with open_sqlite_store(tmp_path / "buffered", client_buffer=_BUFFER) as buffered:
        yield buffered


async def _append(store: Store, cid: str, *contents: str) -> None:
    for content in contents:
        m = message(cid, content)
        await store.append_messages(cid, "alice", [m], m.created_at)


def _content(event: Event) -> str:
    content: str = orjson.loads(event.data)["message"]["content"]
    return content


async def _collect(events: AsyncIterator[Event], n: int) -> list[Event]:
    out: list[Event] = []
    async for event in events:
        out.append(event)
        if len(out) == n:
            break
    return out


async def test_catch_up_then_live_without_gaps_or_duplicates(store: Store) -> None:
    cid = (await store.create_conversation(conversation()))[0].id
    await _append(store, cid, *(f"m{i}" for i in range(5)))
    second = (await store.read_events(cid, None, 10))[1]
    async with _hub(store) as hub, subscribed(hub, cid, second.id) as events:
        await _append(store, cid, "m5", "m6", "m7")
        writer = asyncio.create_task(_append(store, cid, *(f"m{i}" for i in range(8, 12))))
        got = await asyncio.wait_for(_collect(events, 10), 10)
        await writer
    assert [_content(e) for e in got] == [f"m{i}" for i in range(2, 12)]
    assert len({e.id for e in got}) == 10
    assert [e.id for e in got] == [e.id for e in await store.read_events(cid, second.id, 100)]


async def test_without_an_id_only_new_events(store: Store) -> None:
    cid = (await store.create_conversation(conversation()))[0].id
    other = (await store.create_conversation(conversation()))[0].id
    await _append(store, cid, "old")
    async with _hub(store) as hub, subscribed(hub, cid, None) as events:
        await _append(store, other, "elsewhere")
        await _append(store, cid, "new", "newer")
        got = await asyncio.wait_for(_collect(events, 2), 10)
    assert [_content(e) for e in got] == ["new", "newer"]


@pytest.fixture
async def short_memory(store: Store, tmp_path: Path) -> AsyncIterator[Store]:
    """The same backend keeping about 10 events per conversation (EVENTS_MAX_LEN)."""
    if isinstance(store, RedisStore):
        yield RedisStore(store.redis, store.keys, events_max_len=10)  # (its connection: store's)
        return
    async with open_sqlite_store(
        tmp_path / "short", events_max_len=10, client_buffer=_BUFFER
    ) as short:
        yield short


def _resync_of(event: Event) -> str:
    """The Last-Event-ID a `conversation.resync` event answers."""
    assert event.type == "conversation.resync", event
    data = orjson.loads(event.data)
    assert set(data) == {"conversation_id", "last_event_id"}
    last: str = data["last_event_id"]
    return last


async def test_retention_keeps_the_newest_events_and_a_resume_past_them_resyncs(
    short_memory: Store,
) -> None:
    """A resume after an event still kept gets every event after it; after one trimmed, the
    events between are gone: the client is told to resync (not handed what is left as if
    nothing were missing), then gets the events after the newest."""
    store = short_memory
    cid = (await store.create_conversation(conversation()))[0].id
    first_batch = [f"m{i}" for i in range(400)]
    await _append(store, cid, *first_batch[:1])
    oldest = await store.last_event_id(cid)
    assert oldest is not None
    await _append(store, cid, *first_batch[1:])
    kept = await store.read_events(cid, None, 1000)
    # Trimmed (Redis trims whole nodes of its stream, `MAXLEN ~`: it keeps at least 10, and
    # a little more), the newest kept, none missing among those kept.
    assert 10 <= len(kept) < 400
    assert [_content(e) for e in kept] == first_batch[-len(kept) :]
    async with _hub(store) as hub:
        async with subscribed(hub, cid, kept[0].id) as events:
            resumed = await asyncio.wait_for(_collect(events, len(kept) - 1), 10)
        assert [e.id for e in resumed] == [e.id for e in kept[1:]]
        async with subscribed(hub, cid, oldest) as events:
            resync = await asyncio.wait_for(_collect(events, 1), 10)
            assert _resync_of(resync[0]) == oldest
            assert resync[0].id == kept[-1].id  # (a client resuming from it misses nothing)
            await _append(store, cid, "after")
            (new,) = await asyncio.wait_for(_collect(events, 1), 10)
        assert _content(new) == "after"
        now_kept = await store.read_events(cid, None, 1000)
        async with subscribed(hub, cid, "0") as events:  # all that is kept: no resync
            everything = await asyncio.wait_for(_collect(events, len(now_kept)), 10)
        assert [e.id for e in everything] == [e.id for e in now_kept]
        assert _content(everything[-1]) == "after"


async def test_a_resume_after_the_events_expired_resyncs(store: Store) -> None:
    """The conversation's events expired (Redis: the stream's TTL; embedded: an idle log
    dropped): the events after an id of before may be gone, whether more came since or not:
    the client is told to resync, then gets what comes next."""
    cid = (await store.create_conversation(conversation()))[0].id
    await _append(store, cid, "a", "b")
    before = await store.last_event_id(cid)
    assert before is not None
    async with _hub(store) as hub:
        if isinstance(store, RedisStore):
            await store.redis.call("DEL", store.keys.events(cid))  # as its TTL does
        else:
            hub.forget(cid)  # type: ignore[attr-defined]  # (MemoryEventLog: as a sweep does)
        assert await hub.resumes(cid, before)  # (not unknown: of the past)
        async with subscribed(hub, cid, before) as events:
            (resync,) = await asyncio.wait_for(_collect(events, 1), 10)
            assert _resync_of(resync) == before
            await _append(store, cid, "c")
            (new,) = await asyncio.wait_for(_collect(events, 1), 10)
        assert _content(new) == "c"
        async with subscribed(hub, cid, before) as events:  # written again since: the same
            (resync,) = await asyncio.wait_for(_collect(events, 1), 10)
            assert _resync_of(resync) == before
            assert resync.id == new.id


async def test_an_id_of_before_a_restart_of_the_embedded_store_resyncs() -> None:
    """The embedded store keeps its events in memory: after a restart, a client with an id of
    the previous run is told to resync rather than resumed as if it had missed nothing."""
    before = MemoryEventLog()
    seen = before.publish("c1", "message.created", b"{}")
    await before.close()
    while time.time_ns() // 1000 <= int(seen.id):  # (ids are the clock's microseconds)
        await asyncio.sleep(0)
    after = MemoryEventLog()
    try:
        assert await after.resumes("c1", seen.id)
        async with subscribed(after, "c1", seen.id) as events:
            (resync,) = await asyncio.wait_for(_collect(events, 1), 10)
            assert _resync_of(resync) == seen.id
            later = after.publish("c1", "message.created", b"{}")
            (new,) = await asyncio.wait_for(_collect(events, 1), 10)
        assert new.id == later.id
    finally:
        await after.close()


async def test_a_malformed_id_is_a_value_error(store: Store) -> None:
    cid = (await store.create_conversation(conversation()))[0].id
    async with _hub(store) as hub:
        for bad in ("abc", "", "1-x", "-1"):
            with pytest.raises(ValueError):
                async with subscribed(hub, cid, bad) as events:
                    await _collect(events, 1)
            with pytest.raises(ValueError):
                await store.read_events(cid, bad, 10)


def _later(event_id: str, by: int) -> str:
    """An id of the form of `event_id`, `by` later (milliseconds of a Redis stream id, numbers
    of the embedded store's)."""
    first, dash, rest = event_id.partition("-")
    return f"{int(first) + by}{dash}{rest}"


async def test_only_an_id_the_conversation_can_have_is_resumed(store: Store) -> None:
    """An id of an event, `0`, or any id up to the newest: resumable (retention aside). Later
    than the newest (from the future), of the other store's form, or unreadable: not (the API
    refuses it, rather than a stream that would skip every event until the ids pass it)."""
    cid = (await store.create_conversation(conversation()))[0].id
    quiet = (await store.create_conversation(conversation()))[0].id
    await _append(store, cid, "a", "b")
    first, last = [e.id for e in await store.read_events(cid, None, 10)]
    foreign = "1-0" if "-" not in last else str(time.time_ns() // 1000)
    async with _hub(store) as hub:
        for known in ("0", first, last):
            assert await hub.resumes(cid, known), known
        assert await hub.resumes(quiet, "0")
        for unknown in (_later(last, 3_600_000), foreign, "18446744073709551616", "abc", ""):
            assert not await hub.resumes(cid, unknown), unknown
            assert not await hub.resumes(quiet, unknown), unknown


async def test_a_slow_consumer_is_dropped_without_slowing_the_others(store: Store) -> None:
    cid = (await store.create_conversation(conversation()))[0].id
    total = 4 * _BUFFER
    async with (
        _hub(store) as hub,
        subscribed(hub, cid, None) as slow,
        subscribed(hub, cid, None) as fast,
    ):
        # Both go live (a subscription is live once it has read past what was retained when it
        # began: here, two events), then the slow one stops reading.
        await _append(store, cid, "start")
        starting = [asyncio.create_task(_collect(it, 1)) for it in (slow, fast)]
        await asyncio.wait_for(asyncio.gather(*starting), 10)
        starting = [asyncio.create_task(_collect(it, 1)) for it in (slow, fast)]
        await _append(store, cid, "live")
        await asyncio.wait_for(asyncio.gather(*starting), 10)
        reader = asyncio.create_task(_collect(fast, total))
        await _append(store, cid, *(f"m{i}" for i in range(total)))
        got = await asyncio.wait_for(reader, 10)
        with pytest.raises(SlowConsumer):
            await asyncio.wait_for(_collect(slow, total), 10)
    assert [_content(e) for e in got] == [f"m{i}" for i in range(total)]


async def test_catching_up_on_more_than_the_buffer_is_no_overflow(store: Store) -> None:
    cid = (await store.create_conversation(conversation()))[0].id
    await _append(store, cid, "first")
    start = await store.last_event_id(cid)
    await _append(store, cid, *(f"m{i}" for i in range(3 * _BUFFER)))
    async with _hub(store) as hub, subscribed(hub, cid, start) as events:
        got = await asyncio.wait_for(_collect(events, 3 * _BUFFER), 10)
    assert [_content(e) for e in got] == [f"m{i}" for i in range(3 * _BUFFER)]


async def test_what_a_client_missed_comes_in_one_batch(store: Store) -> None:
    """A client resuming gets the retained events it missed as one batch (one write to it),
    not one at a time."""
    cid = (await store.create_conversation(conversation()))[0].id
    await _append(store, cid, "first")
    start = await store.last_event_id(cid)
    await _append(store, cid, *(f"m{i}" for i in range(20)))
    async with _hub(store) as hub, hub.subscribe(cid, start) as batches:
        batch = await asyncio.wait_for(anext(batches), 10)
    assert [_content(e) for e in batch] == [f"m{i}" for i in range(20)]


async def test_a_batch_is_at_most_a_catch_up_chunk(store: Store) -> None:
    """However much a client missed, it comes in batches of 500 events at most (one write of
    a bounded size each), all of it, in order."""
    cid = (await store.create_conversation(conversation()))[0].id
    await _append(store, cid, "first")
    start = await store.last_event_id(cid)
    await _append(store, cid, *(f"m{i}" for i in range(1100)))
    sizes: list[int] = []
    got: list[str] = []
    async with _hub(store) as hub, hub.subscribe(cid, start) as batches:
        while len(got) < 1100:
            batch = await asyncio.wait_for(anext(batches), 10)
            sizes.append(len(batch))
            got.extend(_content(e) for e in batch)
    assert got == [f"m{i}" for i in range(1100)]
    assert max(sizes) <= 500


async def test_closing_the_hub_ends_every_subscription(store: Store) -> None:
    first = (await store.create_conversation(conversation()))[0].id
    second = (await store.create_conversation(conversation()))[0].id
    await _append(store, second, "retained")
    async with _hub(store) as hub:
        async with subscribed(hub, first, None) as a, subscribed(hub, second, None) as b:
            readers = [asyncio.create_task(_collect(it, 10)) for it in (a, b)]
            await hub.close()
            assert await asyncio.wait_for(asyncio.gather(*readers), 10) == [[], []]
        async with subscribed(hub, first, None) as late:
            assert await asyncio.wait_for(_collect(late, 1), 10) == []
