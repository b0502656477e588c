"""Parts and tools as every store backend must keep them (Redis, Redis Cluster, embedded): the
parts a cancelled reply keeps from its deltas, tool results answered in one atomic step (or not
at all), a reply that requires action, and the job queue's deadlines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conversational_core.storage import events as ev
from conversational_core.storage.base import JobQueue, Store
from conversational_core.storage.errors import Changed
from conversational_core.storage.models import Message, MessageStatus, Role, utcnow
from conversational_core.storage.redis.store import RedisStore
from tests.test_jobs_contract import _leased
from tests.test_store_contract import _queued, _types_after, message

CALL = {"type": "tool_call", "id": "call_1", "name": "f", "arguments": '{"a": 1}'}


async def _streaming(store: Store) -> tuple[str, Message]:
    cid, reply = await _queued(store)
    streaming = reply.replace(status=MessageStatus.STREAMING, version=2)
    assert await store.start_attempt(cid, streaming, reply, 1)
    return cid, streaming


async def test_a_stopped_reply_keeps_the_parts_its_deltas_made(store: Store) -> None:
    cid, reply = await _streaming(store)
    mark = await store.last_event_id(cid)
    sent = [
        ("Hm", 0, "reasoning", None),
        ("Let ", 1, "text", None),
        ("", 2, "tool_call", {"tool_call_id": "call_1", "name": "f"}),
        ('{"a"', 2, "tool_call", None),
        ("me.", 1, "text", None),
        (": 1}", 2, "tool_call", None),
    ]
    for text, index, kind, start in sent:
        assert await store.publish_delta(
            cid, reply.id, text, 1, part_index=index, part_type=kind, start=start
        )
    deltas = await store.read_events(cid, mark, 100)
    assert [e.data for e in deltas] == [
        ev.delta_data(reply.id, text, index, kind, start) for text, index, kind, start in sent
    ]
    assert await store.stop_reply(cid, reply.id) == [
        {"type": "reasoning", "text": "Hm"},
        {"type": "text", "text": "Let me."},
        {**CALL, "arguments": '{"a": 1}'},
    ]


async def test_tool_results_answer_in_one_step_or_not_at_all(store: Store) -> None:
    cid, reply = await _streaming(store)
    waiting = reply.with_parts(
        [{"type": "text", "text": "Calling."}, CALL],
        status=MessageStatus.REQUIRES_ACTION,
        version=3,
    )
    mark = await store.last_event_id(cid)
    assert await store.finish_reply(cid, waiting, reply) == waiting
    assert await _types_after(store, cid, mark) == [ev.MESSAGE_REQUIRES_ACTION]
    assert await store.reply_queue_head(cid) is None  # no longer written
    assert not await store.publish_delta(cid, reply.id, "late", 1)

    result = {"type": "tool_result", "tool_call_id": "call_1", "output": "2", "is_error": False}
    tool = message(cid, "", Role.TOOL).with_parts([result])
    nxt = message(cid, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)
    answered = waiting.replace(status=MessageStatus.COMPLETED, version=4)
    stale = waiting.replace(metadata={"edited": True})
    with pytest.raises(Changed):  # compared with what is stored: nothing written
        await store.append_messages(
            cid, "alice", [tool, nxt], utcnow(), reply_id=nxt.id, parent=waiting.id,
            answering=(answered, stale),
        )  # fmt: skip
    assert (
        await store.get_message(cid, "alice", waiting.id)
    ).status is MessageStatus.REQUIRES_ACTION
    mark = await store.last_event_id(cid)
    done = await store.append_messages(
        cid, "alice", [tool, nxt], utcnow(), reply_id=nxt.id, parent=waiting.id,
        answering=(answered, waiting),
    )  # fmt: skip
    assert [m.parent_id for m in done.messages] == [waiting.id, tool.id]
    assert await _types_after(store, cid, mark) == [
        ev.MESSAGE_COMPLETED, ev.MESSAGE_CREATED, ev.MESSAGE_CREATED
    ]  # fmt: skip
    assert (await store.get_message(cid, "alice", waiting.id)) == answered
    assert (await store.get_message(cid, "alice", tool.id)).parts == [result]
    assert await store.reply_queue_head(cid) == nxt.id
    assert (await store.get_conversation(cid, "alice")).active_leaf_id == nxt.id


async def test_deadlines_come_due_once_their_time_has_come(store: Store, tmp_path: Path) -> None:
    async with _leased(store, 5.0, tmp_path) as (_, jobs):
        queue: JobQueue = jobs
        now = time.time()
        await queue.add_deadline("c1", "m1", now - 1)
        await queue.add_deadline("c2", "m2", now - 2)
        await queue.add_deadline("c3", "m3", now + 60)
        assert await queue.due_deadlines(now, 10) == [("c2", "m2"), ("c1", "m1")]
        assert await queue.due_deadlines(now, 1) == [("c2", "m2")]
        await queue.remove_deadline("c2", "m2")
        await queue.add_deadline("c1", "m1", now + 30)  # looked at, not due yet: later
        assert await queue.due_deadlines(now, 10) == []
        assert await queue.due_deadlines(now + 61, 10) == [("c1", "m1"), ("c3", "m3")]
        for cid, mid in (("c1", "m1"), ("c3", "m3")):
            await queue.remove_deadline(cid, mid)


async def test_text_published_before_parts_is_kept_by_a_cancel(any_redis_store: RedisStore) -> None:
    """A reply streaming while the service is upgraded: its deltas so far were kept as plain
    text (by the version before parts); a cancel by the new version keeps them as a text part."""
    store = any_redis_store
    cid, reply = await _streaming(store)
    await store.redis.call("SET", store.keys.published(cid, reply.id), "Hello wor")
    assert await store.stop_reply(cid, reply.id) == [{"type": "text", "text": "Hello wor"}]
