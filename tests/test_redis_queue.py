"""The Redis job queue's sweep for lost signals, on a single server and on a cluster."""

from __future__ import annotations

from conversational_core.storage.redis.queue import RedisJobQueue
from conversational_core.storage.redis.store import RedisStore
from tests.test_store_contract import conversation, message


async def _queued_reply_without_signal(store: RedisStore) -> str:
    """A reply queued by an API process that died before sending its signal."""
    conv, _ = await store.create_conversation(conversation())
    ask, reply = message(conv.id), message(conv.id)
    await store.append_messages(conv.id, "alice", [ask], ask.created_at, reply_id=reply.id)
    await store.redis.call("DEL", store.keys.jobs)  # the signal never made it
    return conv.id


async def test_sweep_signals_queued_replies_that_lost_theirs(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    jobs = RedisJobQueue(store.redis, store.keys)
    lost = await _queued_reply_without_signal(store)
    held = await _queued_reply_without_signal(store)
    assert await jobs.acquire(held, "token")  # a worker is on it: it drains the queue itself
    await store.create_conversation(conversation())  # nothing queued: not signalled

    assert await jobs.sweep() == 1
    assert await jobs.sweep() == 0  # now signalled: not again
    taken = await jobs.take("w", 10, wait_seconds=0.1)
    assert [job.conversation_id for job in taken] == [lost]
    await jobs.close()


async def test_a_worker_sweeps_when_it_starts_taking(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    lost = await _queued_reply_without_signal(store)
    jobs = RedisJobQueue(store.redis, store.keys)
    # The first take starts the sweep; its signal arrives while the take waits for work.
    taken = await jobs.take("w", 10, wait_seconds=5)
    assert [job.conversation_id for job in taken] == [lost]
    await jobs.close()


async def test_renewing_keeps_the_lease_and_the_job(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    jobs = RedisJobQueue(store.redis, store.keys, lease_seconds=5)
    conv, _ = await store.create_conversation(conversation())
    ask, reply = message(conv.id), message(conv.id)
    await store.append_messages(conv.id, "alice", [ask], ask.created_at, reply_id=reply.id)
    [job] = await jobs.take("w", 10, wait_seconds=0.1)
    assert await jobs.acquire(conv.id, "token")
    assert await jobs.renew(conv.id, "token", job)
    assert not await jobs.renew(conv.id, "another token", job)
    await jobs.close()
