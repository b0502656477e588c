"""The Redis job queue's sweep for lost signals, on a single server and on a cluster."""

from __future__ import annotations

import asyncio

from conversational_core.storage.redis.queue import RedisJobQueue
from conversational_core.storage.redis.store import RedisStore
from tests.test_store_contract import conversation, message


async def _signalled(store: RedisStore) -> str:
    """A conversation with a reply queued (and its job signalled)."""
    conv, _ = await store.create_conversation(conversation())
    ask, reply = message(conv.id), message(conv.id)
    await store.append_messages(conv.id, "alice", [ask], ask.created_at, reply_id=reply.id)
    return conv.id


async def _queued_reply_without_signal(store: RedisStore) -> str:
    """A reply queued by an API process that died before sending its signal."""
    cid = await _signalled(store)
    await store.redis.call("DEL", store.keys.jobs)  # the signal never made it
    return cid


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


async def test_a_job_done_leaves_the_stream_and_is_not_taken_again(
    any_redis_store: RedisStore,
) -> None:
    store = any_redis_store
    jobs = RedisJobQueue(store.redis, store.keys, lease_seconds=0.05)
    cid = await _signalled(store)
    [job] = await jobs.take("w", 10, wait_seconds=0.1)
    assert (job.conversation_id, await store.redis.call("XLEN", store.keys.jobs)) == (cid, 1)
    # Its reply written and off the conversation's queue (else the sweep would signal it again).
    await store.redis.call("DEL", store.keys.replies(cid))
    await jobs.ack(job)
    # Neither pending (a dead worker's job to reclaim, once its lease time has passed) nor in
    # the stream (which keeps only jobs to do: a sweep would signal none).
    assert await store.redis.call("XLEN", store.keys.jobs) == 0
    await asyncio.sleep(0.1)  # past the lease time: time is the point
    assert await jobs.take("w2", 10, wait_seconds=0.05) == []
    await jobs.close()


async def test_a_dead_workers_jobs_are_reclaimed_behind_many_live_ones(
    any_redis_store: RedisStore,
) -> None:
    # XAUTOCLAIM looks at ten times COUNT pending signals a call: one started from the
    # beginning on every take never got past those of live workers to a dead one's, and one
    # going on from where the last stopped would need a take (after a blocking read) a step.
    store = any_redis_store
    lease = 1.0
    alive = RedisJobQueue(store.redis, store.keys, lease_seconds=lease)
    for _ in range(80):
        await _signalled(store)
    held = await alive.take("alive", 60, wait_seconds=0.1)
    lost = await alive.take("dead", 20, wait_seconds=0.1)
    assert (len(held), len(lost)) == (60, 20)
    await asyncio.sleep(lease + 0.05)  # the dead worker's lease time passes: time is the point
    # The live worker renews its signals (as Worker._keep_lease does; it holds no lease here,
    # so only the signals' idle time is reset, which is what a claim looks at).
    await asyncio.gather(*(alive.renew(job.conversation_id, "token", job) for job in held))
    other = RedisJobQueue(store.redis, store.keys, lease_seconds=lease)
    claimed: list[str] = []
    for _ in range(len(lost) // 4):  # each take claims as many as it asks for, at once
        claimed += [job.id for job in await other.take("other", 4, wait_seconds=1.0)]
    assert sorted(claimed) == sorted(job.id for job in lost)
    await alive.close()
    await other.close()
