"""The durable job queue on Redis: a Redis Stream with a consumer group, plus leases.

Why a hand-written Streams consumer rather than arq, Celery or RQ: the job is tiny (a
conversation id) and the latency goal (a few ms from the user's message to a worker) rules out
polling queues (arq polls a sorted set every 0.5 s by default); none of them would let the
reply be queued atomically with the message in the conversation's own Lua script; and what we
need of a queue — at-least-once delivery, reclaiming the jobs of a dead worker, a delivery
count — is exactly what consumer groups give (XREADGROUP, XAUTOCLAIM, XACK).

Design (see base.JobQueue for the protocol):
- The reply itself is queued in the conversation's list `P:{cid}:q`, atomically with the
  messages; the stream `P:{jobs}:s` only carries "conversation X has work" signals.
- A worker takes signals with XREADGROUP (new) and XAUTOCLAIM (signals whose worker has not
  renewed them for a lease time: it died). It holds the conversation's lease `P:{cid}:l`
  (SET NX PX) while it writes that conversation's replies, renewing it and re-claiming its
  signal (XCLAIM, which resets the idle time) every third of the lease.
- Releasing the lease is one script that first checks the conversation's queue is empty, so a
  reply queued meanwhile is never left behind: either the releasing worker sees it, or the new
  signal finds the lease free.
- A signal whose lease is held by a live worker is left unacknowledged; it comes back after a
  lease time and is then acknowledged as a no-op. A worker that crashes leaves its signal pending:
  another worker reclaims it after the lease time and carries on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis.exceptions import ResponseError

from conversational_core.storage.base import Job, JobQueue
from conversational_core.storage.redis import RedisStore, _guard

GROUP = "workers"

# KEYS: lease, queue.  ARGV: token, ttl ms.
# 1 released; 0 the queue has work (lease kept, or taken back if it had lapsed); -1 not ours
_RELEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lease.  ARGV: token
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease.  ARGV: token, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class RedisJobQueue(JobQueue):
    def __init__(self, store: RedisStore, *, lease_seconds: float = 15.0) -> None:
        self._store = store
        self._redis = store.client
        self._key = store.jobs_key
        self._lease_ms = int(lease_seconds * 1000)
        self._group_ready = False
        self._release = store.register_script(_RELEASE)
        self._renew = store.register_script(_RENEW)
        self._give_back = store.register_script(_GIVE_BACK)

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        with _guard():
            try:
                await self._redis.xgroup_create(self._key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True

    async def take(self, consumer: str, count: int, wait_seconds: float) -> list[Job]:
        await self._ensure_group()
        try:
            with _guard():
                # Jobs of workers that stopped renewing them first: they have waited longest.
                claimed: Any = await self._redis.xautoclaim(
                    self._key, GROUP, consumer, min_idle_time=self._lease_ms, count=count
                )
                rows = [row for row in claimed[1] if row and row[1]]
                if not rows:
                    response: Any = await self._redis.xreadgroup(
                        GROUP,
                        consumer,
                        {self._key: ">"},
                        count=count,
                        block=max(1, int(wait_seconds * 1000)),
                    )
                    rows = response[0][1] if response else []
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # the stream is gone (e.g. Redis restarted empty)
            return []
        return [
            Job(entry_id.decode(), fields[b"c"].decode(), consumer) for entry_id, fields in rows
        ]

    # Lease and acknowledgement calls go through the store's fast client (see resp.py): a
    # worker writing hundreds of replies at once would otherwise hold as many pooled connections.

    async def acquire(self, conversation_id: str, token: str) -> bool:
        reply = await self._store.command(
            "SET", self._store.lease_key(conversation_id), token, "NX", "PX", self._lease_ms
        )
        return reply is not None

    async def renew(self, conversation_id: str, token: str, job: Job) -> bool:
        held, _ = await asyncio.gather(
            self._store.script(
                self._renew, [self._store.lease_key(conversation_id)], [token, self._lease_ms]
            ),
            # Reset the signal's idle time so that no other worker reclaims it meanwhile.
            self._store.command(
                "XCLAIM", self._key, GROUP, job.consumer or "worker", 0, job.id, "JUSTID"
            ),
        )
        return bool(held)

    async def release(self, conversation_id: str, token: str) -> bool:
        result = await self._store.script(
            self._release,
            [self._store.lease_key(conversation_id), self._store.queue_key(conversation_id)],
            [token, self._lease_ms],
        )
        return int(result) != 0

    async def ack(self, job: Job) -> None:
        await asyncio.gather(
            self._store.command("XACK", self._key, GROUP, job.id),
            self._store.command("XDEL", self._key, job.id),  # the stream keeps only jobs to do
        )

    async def hand_back(self, job: Job, token: str) -> None:
        cid = job.conversation_id
        await self._store.script(self._give_back, [self._store.lease_key(cid)], [token])
        # A new signal first, then forget the old one: never a moment without one.
        await self._store.command("XADD", self._key, "*", "c", cid)
        await self.ack(job)

    async def stats(self) -> tuple[int, float]:
        with _guard():
            pipe = self._redis.pipeline(transaction=False)
            pipe.xlen(self._key)
            pipe.xrange(self._key, count=1)
            depth, oldest = await pipe.execute()
        if not oldest:
            return int(depth), 0.0
        ms = int(oldest[0][0].split(b"-")[0])
        return int(depth), max(0.0, time.time() - ms / 1000)

    async def close(self) -> None:
        """The store owns the connection pool."""
