"""One contract suite for the job queue, run on every backend (Redis, Redis Cluster, embedded):
a queued reply is a job; leases; a job whose worker stopped is taken again after the lease time;
a job handed back is taken again at once; and a reply past its tries fails."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conversational_core.replies.generation import ReplyWriter
from conversational_core.replies.providers.dev import DevProvider
from conversational_core.settings import Settings
from conversational_core.storage.base import Job, JobQueue, Store
from conversational_core.storage.embedded.sqlite import open_sqlite_store
from conversational_core.storage.models import MessageStatus, Role, utcnow
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import backend_for, make_settings
from tests.test_store_contract import conversation, message

_LEASE = 0.5  # JOB_LEASE_SECONDS, its smallest allowed value


@contextlib.asynccontextmanager
async def _leased(
    store: Store, lease: float, tmp_path: Path
) -> AsyncIterator[tuple[Store, JobQueue]]:
    """The backend's job queue with leases of `lease` seconds (the embedded store's queue is
    made with the store: a store of its own)."""
    if isinstance(store, RedisStore):
        queue = backend_for(store, make_settings(JOB_LEASE_SECONDS=lease)).jobs
        try:
            yield store, queue
        finally:
            await queue.close()
        return
    async with open_sqlite_store(tmp_path / f"lease-{lease}", lease_seconds=lease) as own:
        yield own, own.jobs


@pytest.fixture
async def backend(store: Store, tmp_path: Path) -> AsyncIterator[tuple[Store, JobQueue]]:
    async with _leased(store, _LEASE, tmp_path) as pair:
        yield pair


async def _queue_reply(store: Store) -> tuple[str, str]:
    conv, _ = await store.create_conversation(conversation())
    ask = message(conv.id)
    reply = message(conv.id, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)
    await store.append_messages(conv.id, "alice", [ask, reply], utcnow(), reply_id=reply.id)
    return conv.id, reply.id


async def _take_one(jobs: JobQueue, wait: float = 5.0) -> Job:
    taken = await jobs.take("worker-a", 10, wait_seconds=wait)
    assert len(taken) == 1, taken
    return taken[0]


async def test_a_queued_reply_is_a_job_and_its_lease_is_exclusive(
    backend: tuple[Store, JobQueue],
) -> None:
    store, jobs = backend
    cid, reply_id = await _queue_reply(store)
    assert await jobs.waiting() == 1  # queued, not yet taken by a worker
    job = await _take_one(jobs)
    assert await jobs.waiting() == 0
    assert job.conversation_id == cid
    assert await jobs.acquire(cid, "a")
    assert not await jobs.acquire(cid, "b")  # one worker at a time writes a conversation
    assert await jobs.renew(cid, "a", job)
    assert not await jobs.renew(cid, "b", job)
    assert (await jobs.stats())[0] == 1
    # Replies left: releasing keeps the lease, so the holder goes on writing.
    assert not await jobs.release(cid, "a")
    assert not await jobs.acquire(cid, "b")
    await store.delete_message(cid, None, reply_id)  # nothing left to write
    assert await jobs.release(cid, "a")
    await jobs.ack(job)
    assert await jobs.acquire(cid, "b")
    assert await jobs.take("worker-a", 10, wait_seconds=0.1) == []  # acknowledged: done
    assert await jobs.stats() == (0, 0.0)


async def test_a_job_its_worker_stopped_renewing_is_taken_again_after_the_lease(
    backend: tuple[Store, JobQueue],
) -> None:
    store, jobs = backend
    cid, _ = await _queue_reply(store)
    first = await _take_one(jobs)
    assert await jobs.acquire(cid, "dead")
    began = time.monotonic()
    # The worker dies: no renewal, no acknowledgement. Nobody gets the job within the lease...
    assert await jobs.take("worker-b", 10, wait_seconds=_LEASE / 4) == []
    # ... and then somebody does, and may take the lease. (A worker asks again and again, a
    # second at a time: a blocking read on Redis waits for new jobs only.)
    taken: list[Job] = []
    for _ in range(10):
        taken = await jobs.take("worker-b", 10, wait_seconds=_LEASE)
        if taken:
            break
    [again] = taken
    assert again.conversation_id == cid and again.id == first.id
    assert time.monotonic() - began >= _LEASE * 0.9
    assert await jobs.acquire(cid, "rescuer")
    await jobs.ack(again)


async def test_a_job_handed_back_is_taken_again_at_once(store: Store, tmp_path: Path) -> None:
    async with _leased(store, 60, tmp_path) as (store, long_lease):
        cid, _ = await _queue_reply(store)
        job = await _take_one(long_lease)
        assert await long_lease.acquire(cid, "stopping")
        began = time.monotonic()
        await long_lease.hand_back(job, "stopping")
        again = await _take_one(long_lease, wait=5)
        assert again.conversation_id == cid
        assert time.monotonic() - began < 5  # not after the 60 s lease
        assert await long_lease.acquire(cid, "next")  # the lease was freed too
        await long_lease.ack(again)


async def test_take_waits_for_work(backend: tuple[Store, JobQueue]) -> None:
    store, jobs = backend
    waiting = asyncio.create_task(jobs.take("worker-a", 10, wait_seconds=5))
    await asyncio.sleep(0)  # (the take is waiting when the reply is queued)
    cid, _ = await _queue_reply(store)
    taken = await asyncio.wait_for(waiting, 10)
    assert [job.conversation_id for job in taken] == [cid]


async def test_a_reply_past_its_tries_fails(store: Store, settings: Settings) -> None:
    cid, reply_id = await _queue_reply(store)
    reply = await store.get_message(cid, None, reply_id)
    tried = reply.replace(context={"attempts": settings.JOB_MAX_TRIES})
    assert await store.flush_reply(cid, tried, reply)
    await ReplyWriter(store, DevProvider(0), settings).write(cid, reply_id)
    failed = await store.get_message(cid, None, reply_id)
    assert failed.status is MessageStatus.FAILED
    assert failed.error == (
        f"The reply could not be written after {settings.JOB_MAX_TRIES} attempts."
    )
    assert await store.reply_queue_head(cid) is None


async def test_an_ended_reply_left_on_the_queue_is_taken_off(
    store: Store, settings: Settings
) -> None:
    """A reply that ended by a path that did not take it off the reply queue (none should) is
    taken off when a worker comes to it, with no second event: the conversation's next
    replies are not held behind it."""
    cid, reply_id = await _queue_reply(store)
    reply = await store.get_message(cid, None, reply_id)
    ended = reply.replace(status=MessageStatus.COMPLETED, content="done", version=reply.version + 1)
    assert await store.flush_reply(cid, ended, reply)  # written, but left on the queue
    assert await store.reply_queue_head(cid) == reply_id
    mark = await store.last_event_id(cid)
    await ReplyWriter(store, DevProvider(0), settings).write(cid, reply_id)
    assert await store.reply_queue_head(cid) is None
    assert await store.get_message(cid, None, reply_id) == ended
    assert await store.read_events(cid, mark, 10) == []
