"""One contract suite, run against every store backend (real Redis and the embedded store)."""

from __future__ import annotations

import asyncio

import pytest

from conversational_core.storage import events as ev
from conversational_core.storage.base import (
    Idempotency,
    MessageQuery,
    Store,
    decode_conversation_cursor,
)
from conversational_core.storage.errors import (
    IdempotencyMismatch,
    NotFound,
    StaleVersion,
    UnknownAnchor,
)
from conversational_core.storage.models import (
    Conversation,
    Message,
    MessageStatus,
    Role,
    new_id,
    utcnow,
)


def conversation(user: str = "alice", **fields: object) -> Conversation:
    now = utcnow()
    base: dict[str, object] = dict(
        id=new_id(),
        user_id=user,
        title="t",
        metadata={"k": "v"},
        system_prompt=None,
        model=None,
        temperature=None,
        max_tokens=None,
        created_at=now,
        updated_at=now,
    )
    base.update(fields)
    return Conversation(**base)  # type: ignore[arg-type]


def message(conversation_id: str, content: str = "hello", role: Role = Role.USER) -> Message:
    now = utcnow()
    return Message(
        id=new_id(),
        conversation_id=conversation_id,
        role=role,
        content=content,
        status=MessageStatus.COMPLETED,
        metadata={},
        created_at=now,
        updated_at=now,
    )


async def test_conversation_crud(store: Store) -> None:
    conv, replayed = await store.create_conversation(conversation(title="first"))
    assert not replayed
    got = await store.get_conversation(conv.id, "alice")
    assert got == conv
    assert (await store.get_conversation(conv.id, None)) == conv
    with pytest.raises(NotFound):
        await store.get_conversation(conv.id, "bob")

    updated = await store.update_conversation(conv.id, "alice", {"title": "second"}, 1, utcnow())
    assert updated.title == "second"
    assert updated.version == 2
    assert (await store.get_conversation(conv.id, "alice")).title == "second"
    with pytest.raises(StaleVersion):
        await store.update_conversation(conv.id, "alice", {"title": "x"}, 1, utcnow())
    with pytest.raises(NotFound):
        await store.update_conversation(conv.id, "bob", {"title": "x"}, None, utcnow())
    assert (await store.get_conversation(conv.id, "alice")).title == "second"

    with pytest.raises(NotFound):
        await store.delete_conversation(conv.id, "bob")
    await store.append_messages(conv.id, "alice", [message(conv.id)], utcnow())
    deleted = await store.delete_conversation(conv.id, "alice")
    assert deleted.id == conv.id
    with pytest.raises(NotFound):
        await store.get_conversation(conv.id, None)
    with pytest.raises(NotFound):
        await store.list_messages(conv.id, None, MessageQuery(10))
    with pytest.raises(NotFound):
        await store.delete_conversation(conv.id, "alice")
    assert (await store.list_conversations("alice", 10, None)).items == []


async def test_message_crud_and_counts(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    first, second = message(conv.id, "one"), message(conv.id, "two")
    appended = await store.append_messages(conv.id, "alice", [first, second], utcnow())
    assert appended.messages == [first, second] and not appended.replayed
    assert (first.parent_id, second.parent_id) == (None, first.id)
    assert (await store.get_conversation(conv.id, "alice")).message_count == 2
    assert await store.get_message(conv.id, "alice", first.id) == first
    with pytest.raises(NotFound):
        await store.get_message(conv.id, "bob", first.id)
    with pytest.raises(NotFound):
        await store.get_message(conv.id, "alice", new_id())
    with pytest.raises(NotFound):
        await store.append_messages(conv.id, "bob", [message(conv.id)], utcnow())

    edited = first.replace(content="uno", version=2)
    assert await store.update_message(conv.id, "alice", edited, first) == edited
    # A compare-and-set against a stale copy does nothing.
    assert await store.update_message(conv.id, "alice", first.replace(content="x"), first) is None
    assert (await store.get_message(conv.id, "alice", first.id)).content == "uno"

    with pytest.raises(NotFound):
        await store.delete_message(conv.id, "bob", second.id)
    assert (await store.delete_message(conv.id, "alice", second.id)).message.id == second.id
    with pytest.raises(NotFound):
        await store.delete_message(conv.id, "alice", second.id)
    assert (await store.get_conversation(conv.id, "alice")).message_count == 1


async def test_concurrent_appends_are_all_kept(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    msgs = [message(conv.id, f"m{i}") for i in range(100)]
    await asyncio.gather(*(store.append_messages(conv.id, "alice", [m], utcnow()) for m in msgs))
    page = await store.list_messages(conv.id, "alice", MessageQuery(200))
    assert len(page.items) == 100
    assert {m.id for m in page.items} == {m.id for m in msgs}
    assert page.seqs == sorted(set(page.seqs))
    assert (await store.get_conversation(conv.id, "alice")).message_count == 100


async def _walk(store: Store, conv_id: str, query: MessageQuery) -> list[str]:
    seen: list[str] = []
    page = await store.list_messages(conv_id, "alice", query)
    while True:
        seen.extend(m.id for m in page.items)
        if not page.has_more:
            return seen
        edge = page.seqs[0] if query.backward else page.seqs[-1]
        page = await store.list_messages(
            conv_id,
            "alice",
            MessageQuery(query.limit, query.descending, anchor_seq=edge, backward=query.backward),
        )


async def test_message_pages_in_both_orders(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    msgs = [message(conv.id, str(i)) for i in range(23)]
    for m in msgs:
        await store.append_messages(conv.id, "alice", [m], utcnow())
    ids = [m.id for m in msgs]
    assert await _walk(store, conv.id, MessageQuery(5)) == ids
    assert await _walk(store, conv.id, MessageQuery(5, descending=True)) == ids[::-1]

    after = await store.list_messages(conv.id, "alice", MessageQuery(3, anchor_id=ids[10]))
    assert [m.id for m in after.items] == ids[11:14] and after.has_more
    before = await store.list_messages(
        conv.id, "alice", MessageQuery(3, anchor_id=ids[10], backward=True)
    )
    assert [m.id for m in before.items] == ids[7:10] and before.has_more
    desc_after = await store.list_messages(
        conv.id, "alice", MessageQuery(3, descending=True, anchor_id=ids[10])
    )
    assert [m.id for m in desc_after.items] == ids[9:6:-1]
    tail = await store.list_messages(conv.id, "alice", MessageQuery(5, anchor_id=ids[20]))
    assert [m.id for m in tail.items] == ids[21:] and not tail.has_more
    with pytest.raises(UnknownAnchor):
        await store.list_messages(conv.id, "alice", MessageQuery(3, anchor_id=new_id()))


async def test_pagination_is_complete_while_messages_are_added(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    original = [message(conv.id, str(i)) for i in range(30)]
    for m in original:
        await store.append_messages(conv.id, "alice", [m], utcnow())
    seen: list[str] = []
    added: list[str] = []
    page = await store.list_messages(conv.id, "alice", MessageQuery(7))
    while True:
        seen.extend(m.id for m in page.items)
        extra = message(conv.id, "late")
        await store.append_messages(conv.id, "alice", [extra], utcnow())
        added.append(extra.id)
        if not page.has_more:
            break
        page = await store.list_messages(
            conv.id, "alice", MessageQuery(7, anchor_seq=page.seqs[-1])
        )
    assert len(seen) == len(set(seen))  # no duplicates
    assert seen[:30] == [m.id for m in original]  # nothing skipped, in order
    assert set(seen[30:]) <= set(added)


async def test_conversation_list_is_complete_while_conversations_are_added(store: Store) -> None:
    made = []
    for _ in range(12):
        conv, _ = await store.create_conversation(conversation())
        made.append(conv.id)
    other, _ = await store.create_conversation(conversation(user="bob"))
    seen: list[str] = []
    page = await store.list_conversations("alice", 5, None)
    while True:
        seen.extend(c.id for c in page.items)
        await store.create_conversation(conversation())  # newer: lands before the cursor
        if page.next_cursor is None:
            break
        page = await store.list_conversations(
            "alice", 5, decode_conversation_cursor(page.next_cursor)
        )
    assert len(seen) == len(set(seen))
    assert seen[:12] == made[::-1]
    assert other.id not in seen


async def test_activity_moves_a_conversation_to_the_front(store: Store) -> None:
    old, _ = await store.create_conversation(conversation())
    new, _ = await store.create_conversation(conversation())
    assert [c.id for c in (await store.list_conversations("alice", 10, None)).items] == [
        new.id,
        old.id,
    ]
    await asyncio.sleep(0.002)  # activity is kept in milliseconds: make the next one later
    await store.append_messages(old.id, "alice", [message(old.id)], utcnow())
    assert [c.id for c in (await store.list_conversations("alice", 10, None)).items] == [
        old.id,
        new.id,
    ]


async def test_idempotent_append_and_create(store: Store) -> None:
    conv, _ = await store.create_conversation(conversation())
    idem = Idempotency("key-1", "fp-1", 60)
    first = message(conv.id, "once")
    assert not (await store.append_messages(conv.id, "alice", [first], utcnow(), idem)).replayed
    again = await store.append_messages(
        conv.id, "alice", [message(conv.id, "once")], utcnow(), idem
    )
    assert again.replayed and again.messages == [first]
    assert (await store.get_conversation(conv.id, "alice")).message_count == 1
    with pytest.raises(IdempotencyMismatch):
        await store.append_messages(
            conv.id, "alice", [message(conv.id)], utcnow(), Idempotency("key-1", "other", 60)
        )

    c1, replayed = await store.create_conversation(conversation(), Idempotency("k", "f", 60))
    c2, replayed2 = await store.create_conversation(conversation(), Idempotency("k", "f", 60))
    assert not replayed and replayed2 and c2.id == c1.id
    assert len((await store.list_conversations("alice", 100, None)).items) == 2
    # Keys are per user: bob's identical key is a different request.
    c3, replayed3 = await store.create_conversation(
        conversation(user="bob"), Idempotency("k", "f", 60)
    )
    assert not replayed3 and c3.id != c1.id


# --- Replies: the named operations and deltas -------------------------------------------------


def _reply(conversation_id: str) -> Message:
    return message(conversation_id, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)


async def _queued(store: Store) -> tuple[str, Message]:
    """A conversation of alice's with a user message and its pending reply, queued."""
    conv, _ = await store.create_conversation(conversation())
    ask, reply = message(conv.id), _reply(conv.id)
    await store.append_messages(conv.id, "alice", [ask, reply], utcnow(), reply_id=reply.id)
    return conv.id, reply


async def _types_after(store: Store, cid: str, after: str | None) -> list[str]:
    return [e.type for e in await store.read_events(cid, after, 100)]


async def test_a_reply_written_to_the_end(store: Store) -> None:
    cid, reply = await _queued(store)
    assert await store.reply_queue_head(cid) == reply.id
    mark = await store.last_event_id(cid)

    streaming = reply.replace(status=MessageStatus.STREAMING, version=2)
    assert await store.start_attempt(cid, streaming, reply, 1) == streaming
    assert await store.publish_delta(cid, reply.id, "Hel", 1)
    assert await store.publish_delta(cid, reply.id, "lo", 1)
    flushed = streaming.replace(content="Hello")
    assert await store.flush_reply(cid, flushed, streaming) == flushed
    assert (await store.get_message(cid, "alice", reply.id)).content == "Hello"
    done = flushed.replace(status=MessageStatus.COMPLETED, version=3)
    assert await store.finish_reply(cid, done, flushed) == done

    # The flush emitted nothing: clients follow the deltas.
    assert await _types_after(store, cid, mark) == [
        ev.MESSAGE_UPDATED,
        ev.MESSAGE_DELTA,
        ev.MESSAGE_DELTA,
        ev.MESSAGE_COMPLETED,
    ]
    assert await store.reply_queue_head(cid) is None
    assert not await store.publish_delta(cid, reply.id, "!", 1)  # ended: refused
    assert await store.get_message(cid, None, reply.id) == done


async def test_a_failed_reply_ends_with_its_event(store: Store) -> None:
    cid, reply = await _queued(store)
    mark = await store.last_event_id(cid)
    failed = reply.replace(status=MessageStatus.FAILED, error="no", version=2)
    assert await store.finish_reply(cid, failed, reply) == failed
    assert await _types_after(store, cid, mark) == [ev.MESSAGE_FAILED]
    assert await store.reply_queue_head(cid) is None


async def test_a_new_attempt_fences_the_old_one(store: Store) -> None:
    cid, reply = await _queued(store)
    first = reply.replace(status=MessageStatus.STREAMING, version=2)
    assert await store.start_attempt(cid, first, reply, 1)
    assert await store.publish_delta(cid, reply.id, "old ", 1)
    second = first.replace(version=3, context={"attempts": 2})
    assert await store.start_attempt(cid, second, first, 2)
    # The worker that lost the reply writes no more into it; the new one starts from nothing.
    assert not await store.publish_delta(cid, reply.id, "stale", 1)
    assert await store.publish_delta(cid, reply.id, "new", 2)
    assert await store.stop_reply(cid, reply.id) == [{"type": "text", "text": "new"}]
    assert not await store.publish_delta(cid, reply.id, "late", 2)


async def test_a_cancelled_reply_keeps_what_its_clients_received(store: Store) -> None:
    cid, reply = await _queued(store)
    streaming = reply.replace(status=MessageStatus.STREAMING, version=2)
    assert await store.start_attempt(cid, streaming, reply, 1)
    assert await store.publish_delta(cid, reply.id, "Hel", 1)
    assert await store.publish_delta(cid, reply.id, "lo", 1)
    assert await store.stop_reply(cid, reply.id) == [{"type": "text", "text": "Hello"}]
    assert not await store.publish_delta(cid, reply.id, "!", 1)
    cancelled = streaming.replace(status=MessageStatus.CANCELLED, content="Hello", version=3)
    with pytest.raises(NotFound):  # only its owner (or a caller that names no owner)
        await store.cancel_reply(cid, "bob", cancelled, streaming)
    mark = await store.last_event_id(cid)
    assert await store.cancel_reply(cid, "alice", cancelled, streaming) == cancelled
    assert await _types_after(store, cid, mark) == [ev.MESSAGE_CANCELLED]
    assert await store.reply_queue_head(cid) is None
    # Nothing stopped a reply that was never published: None.
    assert await store.stop_reply(cid, new_id()) is None


async def test_changes_against_a_stale_copy_write_and_emit_nothing(store: Store) -> None:
    cid, reply = await _queued(store)
    mark = await store.last_event_id(cid)
    stale = reply.replace(content="stale")
    newer = reply.replace(status=MessageStatus.STREAMING, version=2)
    assert await store.update_message(cid, "alice", newer, stale) is None
    assert await store.start_attempt(cid, newer, stale, 1) is None
    assert await store.flush_reply(cid, newer, stale) is None
    assert await store.finish_reply(cid, newer.replace(status=MessageStatus.FAILED), stale) is None
    assert (
        await store.cancel_reply(cid, None, newer.replace(status=MessageStatus.CANCELLED), stale)
        is None
    )
    assert await store.last_event_id(cid) == mark
    assert await store.get_message(cid, None, reply.id) == reply
    with pytest.raises(NotFound):
        await store.update_message(cid, "alice", message(cid), message(cid))


async def test_deleting_a_reply_stops_its_deltas_and_dequeues_it(store: Store) -> None:
    cid, first = await _queued(store)
    second = _reply(cid)  # a new root: not in the first reply's subtree
    await store.append_messages(cid, None, [second], utcnow(), reply_id=second.id, parent=None)
    assert await store.publish_delta(cid, first.id, "a")
    assert await store.publish_delta(cid, second.id, "b")
    assert not await store.publish_delta(cid, new_id(), "x")  # no such message
    await store.delete_message(cid, None, first.id)
    assert not await store.publish_delta(cid, first.id, "a")
    assert await store.reply_queue_head(cid) == second.id
    deleted = (await store.read_events(cid, None, 100))[-1]
    assert deleted.type == ev.MESSAGE_DELETED
    assert deleted.data == ev.message_deleted_data(first.id, [first.id])

    updated = await store.update_conversation(cid, None, {"title": "x"}, None, utcnow())
    [changed] = await store.read_events(cid, deleted.id, 10)
    assert changed.data == ev.conversation_data(updated)
    await store.delete_conversation(cid, None)
    assert not await store.publish_delta(cid, second.id, "b")
    assert await store.reply_queue_head(cid) is None
