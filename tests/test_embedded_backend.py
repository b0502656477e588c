"""What only the embedded backend does: its in-process event log (ids across trimming and
restarts, forgetting a deleted conversation), job queue (one waiting job per conversation) and
recovery of queued replies after a restart. What every backend does is in the contract suites."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from conversational_core.storage import events as ev
from conversational_core.storage.base import Event, SlowConsumer
from conversational_core.storage.embedded.events import MemoryEventLog
from conversational_core.storage.embedded.jobs import MemoryJobQueue, recover
from conversational_core.storage.embedded.sqlite import SqliteStore, open_sqlite_store
from conversational_core.storage.errors import NotFound
from conversational_core.storage.models import MessageStatus, Role, utcnow
from tests.fixtures.events import subscribed
from tests.test_store_contract import conversation, message


def publish(log: MemoryEventLog, n: int, cid: str = "c1", start: int = 0) -> list[Event]:
    return [log.publish(cid, "test", orjson.dumps({"n": start + i})) for i in range(n)]


async def collect(it: AsyncIterator[Event], n: int) -> list[Event]:
    out: list[Event] = []
    async for event in it:
        out.append(event)
        if len(out) == n:
            break
    return out


# --- MemoryEventLog -------------------------------------------------------------------------


async def test_catch_up_then_live_without_gaps_or_duplicates() -> None:
    log = MemoryEventLog(100, 100)
    first = publish(log, 5)
    async with subscribed(log, "c1", first[1].id) as it:
        publish(log, 3, start=5)

        async def more() -> None:
            for i in range(8, 12):
                await asyncio.sleep(0)
                publish(log, 1, start=i)

        task = asyncio.create_task(more())
        got = await asyncio.wait_for(collect(it, 10), 5)
        await task
    assert [orjson.loads(e.data)["n"] for e in got] == list(range(2, 12))
    ids = [int(e.id) for e in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert log.subscriber_count() == 0


async def test_after_none_gets_only_new_events() -> None:
    log = MemoryEventLog(100, 100)
    publish(log, 3)
    async with subscribed(log, "c1", None) as it:
        publish(log, 2, start=3)
        publish(log, 1, cid="other")
        got = await asyncio.wait_for(collect(it, 2), 5)
    assert [orjson.loads(e.data)["n"] for e in got] == [3, 4]


async def test_ids_increase_across_trimming_and_an_old_after_resyncs() -> None:
    log = MemoryEventLog(3, 100)
    published = publish(log, 5)
    assert [int(e.id) for e in published] == sorted(int(e.id) for e in published)
    assert log.last_id("c1") == published[-1].id
    assert log.last_id("nothing") is None
    assert log.read("c1", None, 10) == published[2:]
    assert log.read("c1", published[3].id, 10) == published[4:]
    assert log.read("c1", published[2].id, 1) == [published[3]]
    async with subscribed(log, "c1", published[1].id) as it:  # the last one trimmed
        (got,) = await asyncio.wait_for(collect(it, 1), 5)
    assert (got.id, got.type) == (published[-1].id, "conversation.resync")
    async with subscribed(log, "c1", published[2].id) as it:  # the oldest one kept
        got_all = await asyncio.wait_for(collect(it, 2), 5)
    assert got_all == published[3:]
    # A newer log still gives larger ids (a process-wide counter).
    later = MemoryEventLog(3, 100)
    assert int(later.publish("c1", "t", b"{}").id) > int(published[-1].id)


async def test_malformed_after_raises_value_error() -> None:
    log = MemoryEventLog()
    for bad in ("abc", "1-2", "", " 1", "+1", "1_0"):
        with pytest.raises(ValueError):
            log.subscribe("c1", bad)
        with pytest.raises(ValueError):
            log.read("c1", bad, 10)


async def test_slow_consumer_overflows_without_affecting_others() -> None:
    log = MemoryEventLog(100, client_buffer=3)
    async with subscribed(log, "c1", None) as slow, subscribed(log, "c1", None) as fast:
        received: list[Event] = []

        async def read_fast() -> None:
            async for event in fast:
                received.append(event)
                if len(received) == 10:
                    return

        reader = asyncio.create_task(read_fast())
        await asyncio.sleep(0)
        for i in range(10):
            publish(log, 1, start=i)  # never blocks
            await asyncio.sleep(0)
        await asyncio.wait_for(reader, 5)
        with pytest.raises(SlowConsumer):
            await asyncio.wait_for(collect(slow, 10), 5)
    assert [orjson.loads(e.data)["n"] for e in received] == list(range(10))


async def test_catch_up_longer_than_the_buffer_is_not_an_overflow() -> None:
    log = MemoryEventLog(100, client_buffer=2)
    published = publish(log, 20)
    async with subscribed(log, "c1", "0") as it:
        got = await asyncio.wait_for(collect(it, 20), 5)
    assert got == published


async def test_close_ends_every_subscription() -> None:
    log = MemoryEventLog()
    async with subscribed(log, "c1", None) as a, subscribed(log, "c2", "0") as b:
        tasks = [asyncio.create_task(collect(it, 10)) for it in (a, b)]
        await asyncio.sleep(0)
        await log.close()
        assert await asyncio.wait_for(asyncio.gather(*tasks), 5) == [[], []]
    async with subscribed(log, "c1", None) as late:
        assert await asyncio.wait_for(collect(late, 1), 5) == []


async def test_forget_keeps_the_log_for_connected_clients_only() -> None:
    log = MemoryEventLog()
    publish(log, 1, cid="gone")
    log.forget("gone")
    assert log.last_id("gone") is None
    publish(log, 1)
    async with subscribed(log, "c1", None) as it:
        last = log.publish("c1", ev.CONVERSATION_DELETED, b"{}")
        log.forget("c1")
        assert await asyncio.wait_for(collect(it, 1), 5) == [last]
        assert log.last_id("c1") == last.id
    assert log.last_id("c1") is None


# --- MemoryJobQueue -------------------------------------------------------------------------


async def test_job_queue_leases_and_redelivery() -> None:
    heads: dict[str, str | None] = {"c1": "r1"}

    async def head(cid: str) -> str | None:
        return heads.get(cid)

    jobs = MemoryJobQueue(head, lease_seconds=0.2)
    assert await jobs.take("w", 10, wait_seconds=0.01) == []
    jobs.signal("c1")
    jobs.signal("c1")  # coalesced: one waiting job per conversation
    [job] = await jobs.take("w", 10, wait_seconds=1)
    assert job.conversation_id == "c1"
    assert await jobs.acquire("c1", "a")
    assert not await jobs.acquire("c1", "b")
    assert await jobs.renew("c1", "a", job)
    assert not await jobs.renew("c1", "b", job)
    # Replies left: the lease is kept.
    assert not await jobs.release("c1", "a")
    assert not await jobs.acquire("c1", "b")
    heads["c1"] = None
    assert await jobs.release("c1", "a")
    await jobs.ack(job)
    assert await jobs.acquire("c1", "b")
    # A job left unacknowledged (say its acquire failed) comes back after the lease time.
    jobs.signal("c1")
    [again] = await jobs.take("w", 10, wait_seconds=1)
    assert await jobs.take("w", 10, wait_seconds=0.05) == []
    [redelivered] = await jobs.take("w", 10, wait_seconds=2)
    assert redelivered == again
    assert (await jobs.stats())[0] == 1
    await jobs.ack(redelivered)
    assert await jobs.stats() == (0, 0.0)
    await jobs.close()
    assert await jobs.take("w", 10, wait_seconds=5) == []


async def test_take_waits_for_a_signal() -> None:
    async def head(cid: str) -> str | None:
        return None

    jobs = MemoryJobQueue(head)
    waiting = asyncio.create_task(jobs.take("w", 5, wait_seconds=5))
    await asyncio.sleep(0.01)
    jobs.signal("c1")
    jobs.signal("c2")
    got = await asyncio.wait_for(waiting, 5)
    assert {j.conversation_id for j in got} <= {"c1", "c2"} and got


# --- SqliteStore's events and replies -------------------------------------------------------


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with open_sqlite_store(tmp_path / "data", lease_seconds=5) as store:
        yield store


async def test_store_events_and_reply_queue(embedded: SqliteStore) -> None:
    store = embedded
    conv, _ = await store.create_conversation(conversation())
    user = message(conv.id)
    reply = message(conv.id, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)
    async with subscribed(store.events, conv.id, None) as it:
        await store.append_messages(conv.id, "alice", [user, reply], utcnow(), reply_id=reply.id)
        created = await asyncio.wait_for(collect(it, 2), 5)
    assert [e.type for e in created] == [ev.MESSAGE_CREATED] * 2
    assert created[0].data == ev.message_data(user)
    assert orjson.loads(created[1].data) == {
        "message_id": reply.id,
        "message": orjson.loads(reply.to_json()),
    }
    assert await store.reply_queue_head(conv.id) == reply.id
    assert await store.conversations_with_replies() == [conv.id]
    [job] = await store.jobs.take("w", 10, wait_seconds=1)
    assert job.conversation_id == conv.id

    streaming = reply.replace(status=MessageStatus.STREAMING, version=2)
    assert await store.start_attempt(conv.id, streaming, reply, 1)
    assert await store.publish_delta(conv.id, reply.id, "Hel")
    assert await store.publish_delta(conv.id, reply.id, "lo")
    assert await store.stop_reply(conv.id, reply.id) == [{"type": "text", "text": "Hello"}]
    assert not await store.publish_delta(conv.id, reply.id, "!")
    cancelled = streaming.replace(status=MessageStatus.CANCELLED, content="Hello", version=3)
    stored = await store.cancel_reply(conv.id, None, cancelled, streaming)
    assert stored == cancelled
    assert await store.reply_queue_head(conv.id) is None
    assert not await store.publish_delta(conv.id, reply.id, "!")
    retained = await store.read_events(conv.id, created[1].id, 100)
    assert [e.type for e in retained] == [
        ev.MESSAGE_UPDATED,
        ev.MESSAGE_DELTA,
        ev.MESSAGE_DELTA,
        ev.MESSAGE_CANCELLED,
    ]
    assert retained[1].data == ev.delta_data(reply.id, "Hel")
    assert await store.last_event_id(conv.id) == retained[-1].id


async def test_store_delete_stops_deltas(embedded: SqliteStore) -> None:
    store = embedded
    conv, _ = await store.create_conversation(conversation())
    first = message(conv.id, "", Role.ASSISTANT).replace(status=MessageStatus.STREAMING)
    second = message(conv.id, "", Role.ASSISTANT).replace(status=MessageStatus.STREAMING)
    await store.append_messages(conv.id, None, [first], utcnow(), reply_id=first.id)
    await store.append_messages(conv.id, None, [second], utcnow(), reply_id=second.id, parent=None)
    assert await store.publish_delta(conv.id, first.id, "a")  # known from the file
    assert await store.publish_delta(conv.id, second.id, "b")
    assert not await store.publish_delta(conv.id, "no-such-message", "x")
    await store.delete_message(conv.id, None, first.id)
    assert not await store.publish_delta(conv.id, first.id, "a")
    assert await store.reply_queue_head(conv.id) == second.id
    deleted = (await store.read_events(conv.id, None, 100))[-1]
    assert deleted.type == ev.MESSAGE_DELETED
    assert deleted.data == ev.message_deleted_data(first.id, [first.id])

    updated = await store.update_conversation(conv.id, None, {"title": "x"}, None, utcnow())
    assert (await store.read_events(conv.id, deleted.id, 10))[0].data == ev.conversation_data(
        updated
    )
    async with subscribed(store.events, conv.id, None) as it:
        await store.delete_conversation(conv.id, None)
        [gone] = await asyncio.wait_for(collect(it, 1), 5)
    assert gone.type == ev.CONVERSATION_DELETED
    assert gone.data == ev.conversation_deleted_data(conv.id)
    assert not await store.publish_delta(conv.id, second.id, "b")
    assert await store.reply_queue_head(conv.id) is None
    assert await store.conversations_with_replies() == []
    assert await store.last_event_id(conv.id) is None  # forgotten once the client left


async def test_failed_writes_emit_nothing(embedded: SqliteStore) -> None:
    store = embedded
    conv, _ = await store.create_conversation(conversation())
    m = message(conv.id)
    await store.append_messages(conv.id, None, [m], utcnow())
    before = await store.last_event_id(conv.id)
    with pytest.raises(NotFound):
        await store.append_messages(conv.id, "mallory", [message(conv.id)], utcnow())
    with pytest.raises(NotFound):
        await store.delete_message(conv.id, "mallory", m.id)
    # A stale compare-and-set writes nothing and emits nothing.
    stale = m.replace(content="stale")
    assert await store.update_message(conv.id, None, m.replace(version=9), stale) is None
    assert await store.last_event_id(conv.id) == before


async def test_replies_are_recovered_after_a_restart(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "data") as store:
        conv, _ = await store.create_conversation(conversation())
        reply = message(conv.id, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)
        await store.append_messages(conv.id, None, [reply], utcnow(), reply_id=reply.id)
    async with open_sqlite_store(tmp_path / "data") as store:
        [job] = await store.jobs.take("w", 10, wait_seconds=1)
        assert job.conversation_id == conv.id
        assert await store.reply_queue_head(conv.id) == reply.id
        assert await recover(store) == 1
