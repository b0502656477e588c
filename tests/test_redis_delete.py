"""Deleting a conversation on Redis leaves none of its text behind: not its idempotency records
(they hold the messages of the requests), not the deltas of a reply being written, not its past
events - only the `conversation.deleted` event, for the clients connected at that moment, until
it expires."""

from __future__ import annotations

from conversational_core.storage import events as ev
from conversational_core.storage.base import Idempotency
from conversational_core.storage.models import MessageStatus, Role, utcnow
from conversational_core.storage.redis.store import RedisStore
from tests.test_store_contract import conversation, message


def _named(store: RedisStore, cid: str, reply_id: str) -> list[str]:
    """Every key the conversation's writes below can have made (keys.py's table)."""
    keys = store.keys
    return [
        *keys.tree_keys(cid),
        keys.events(cid),
        keys.replies(cid),
        keys.lease(cid),
        keys.records(cid),
        keys.stopped(cid, reply_id),
        keys.published(cid, reply_id),
        keys.attempt(cid, reply_id),
        *(keys.append_idempotency(cid, "alice", key) for key in ("k0", "k1", "k2", "ask")),
    ]


async def _existing(store: RedisStore, names: list[str]) -> list[str]:
    return [name for name in names if await store.redis.call("EXISTS", name)]


async def test_deleting_a_conversation_leaves_none_of_its_text(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    conv, _ = await store.create_conversation(conversation())
    cid = conv.id
    for n in range(3):  # appends made with idempotency keys: their records hold the text
        note = message(cid, f"secret {n}")
        await store.append_messages(cid, "alice", [note], utcnow(), Idempotency(f"k{n}", "fp", 600))
    ask = message(cid, "secret question")
    reply = message(cid, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)
    await store.append_messages(
        cid, "alice", [ask, reply], utcnow(), Idempotency("ask", "fp", 600), reply_id=reply.id
    )
    streaming = reply.replace(status=MessageStatus.STREAMING, version=2)
    assert await store.start_attempt(cid, streaming, reply, 1) == streaming
    assert await store.publish_delta(cid, reply.id, "secret answer, half written", 1)
    names = _named(store, cid, reply.id)
    before = await _existing(store, names)
    assert store.keys.published(cid, reply.id) in before
    assert store.keys.append_idempotency(cid, "alice", "k0") in before

    await store.delete_conversation(cid, "alice")

    assert await _existing(store, names) == [store.keys.events(cid)]
    left = await store.read_events(cid, None, 100)
    assert [e.type for e in left] == [ev.CONVERSATION_DELETED]
    assert not await store.publish_delta(cid, reply.id, " more", 1)  # the writer stops
