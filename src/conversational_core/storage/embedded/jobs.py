"""The embedded backend's job queue: signals of conversations with replies to write, and leases of
conversations to workers, in this process's memory, with the semantics of the Redis queue.

It does not survive a restart: :func:`recover` signals again every conversation whose reply
queue (a table of the SQLite file) is not empty. Nor is it shared between processes: with the
embedded store the API and the reply worker run in one process (WORKER_IN_API), with one
uvicorn worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conversational_core.storage.base import Job, JobQueue

if TYPE_CHECKING:
    from conversational_core.storage.embedded.sqlite import SqliteStore


@dataclass(slots=True, eq=False)
class _Entry:
    job: Job
    created: float
    # While taken: when the job goes back to the ready queue unless renewed or acknowledged.
    deadline: float = 0.0
    consumer: str = field(default="")


class MemoryJobQueue(JobQueue):
    """In-process job queue and leases, with the semantics of the Redis one.

    * :meth:`signal` (synchronous, called by the store after the commit that queued a reply)
      adds a job, unless the conversation already has one that no worker has taken yet: that one
      will see the new reply, since whoever takes it drains the conversation's reply queue. So
      the queue holds at most one waiting job per conversation.
    * A taken job that is neither acknowledged nor renewed within the lease time goes back to
      the queue (as an unacknowledged Redis stream entry is claimed again). That covers both a
      job whose :meth:`acquire` failed because another worker held the lease (the worker leaves
      it unacknowledged, it is delivered again later) and a worker task that died.
    * :meth:`release` reads the reply queue head, then gives the lease back only if the head was
      empty and the lease is still the caller's, with no await in between. An append committed
      after that read signals a new job, which a worker takes and, the lease being free, runs:
      no reply is left without a job. If another job of the conversation was taken while the
      lease was held (its acquire failed), a fresh job is signalled on release, so that the
      conversation does not wait a whole lease time to be looked at again.
    """

    def __init__(
        self,
        reply_queue_head: Callable[[str], Awaitable[str | None]],
        *,
        lease_seconds: float = 15.0,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self._head = reply_queue_head
        self._lease = lease_seconds
        self._ids = itertools.count(1)
        self._ready: OrderedDict[str, _Entry] = OrderedDict()  # job id -> entry, oldest first
        self._ready_by_conversation: dict[str, str] = {}  # conversation id -> ready job id
        self._taken: dict[str, _Entry] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # conversation id -> (token, expiry)
        self._deadlines: dict[tuple[str, str], float] = {}  # (cid, mid) -> when (epoch s)
        self._wake = asyncio.Event()
        self._closed = False

    def signal(self, conversation_id: str) -> None:
        if conversation_id in self._ready_by_conversation:
            return
        job = Job(str(next(self._ids)), conversation_id)
        self._make_ready(_Entry(job, time.monotonic()))

    def _make_ready(self, entry: _Entry) -> None:
        cid = entry.job.conversation_id
        if cid in self._ready_by_conversation:
            return  # one waiting job per conversation is enough
        self._ready[entry.job.id] = entry
        self._ready_by_conversation[cid] = entry.job.id
        self._wake.set()

    def _reclaim(self, now: float) -> float | None:
        """Put back expired taken jobs; returns the next deadline of a taken job, if any."""
        expired = [e for e in self._taken.values() if e.deadline <= now]
        for entry in expired:
            del self._taken[entry.job.id]
            self._make_ready(entry)
        for cid in [c for c, (_, expiry) in self._leases.items() if expiry <= now]:
            del self._leases[cid]
        return min((e.deadline for e in self._taken.values()), default=None)

    async def take(self, consumer: str, count: int, wait_seconds: float) -> list[Job]:
        deadline = time.monotonic() + wait_seconds
        while True:
            if self._closed:
                return []
            now = time.monotonic()
            next_expiry = self._reclaim(now)
            if self._ready:
                break
            remaining = deadline - now
            if remaining <= 0:
                return []
            if next_expiry is not None:
                remaining = min(remaining, max(next_expiry - now, 0.0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
        now = time.monotonic()
        jobs: list[Job] = []
        while self._ready and len(jobs) < count:
            _, entry = self._ready.popitem(last=False)
            del self._ready_by_conversation[entry.job.conversation_id]
            entry.deadline = now + self._lease
            entry.consumer = consumer
            self._taken[entry.job.id] = entry
            jobs.append(entry.job)
        return jobs

    async def acquire(self, conversation_id: str, token: str) -> bool:
        now = time.monotonic()
        held = self._leases.get(conversation_id)
        if held is not None and held[0] != token and held[1] > now:
            return False
        self._leases[conversation_id] = (token, now + self._lease)
        return True

    async def renew(self, conversation_id: str, token: str, job: Job) -> bool:
        now = time.monotonic()
        held = self._leases.get(conversation_id)
        if held is None or held[0] != token or held[1] <= now:
            return False
        self._leases[conversation_id] = (token, now + self._lease)
        entry = self._taken.get(job.id)
        if entry is not None:
            entry.deadline = now + self._lease
        return True

    async def release(self, conversation_id: str, token: str) -> bool:
        head = await self._head(conversation_id)
        # From here on, no await: the check above and the release below are one step.
        now = time.monotonic()
        held = self._leases.get(conversation_id)
        mine = held is not None and held[0] == token
        if head is None:
            if mine:
                del self._leases[conversation_id]
                others = sum(
                    1 for e in self._taken.values() if e.job.conversation_id == conversation_id
                )
                if others > 1:  # the caller's own job, and one taken while we held the lease
                    self.signal(conversation_id)
            return True
        if mine or held is None or held[1] <= now:
            # Replies left: keep (or take back) the lease and go on writing.
            self._leases[conversation_id] = (token, now + self._lease)
            return False
        return True  # another worker holds the lease now; it writes them

    async def ack(self, job: Job) -> None:
        self._taken.pop(job.id, None)
        entry = self._ready.pop(job.id, None)
        if entry is not None:  # it had expired back into the queue meanwhile
            del self._ready_by_conversation[job.conversation_id]

    async def hand_back(self, job: Job, token: str) -> None:
        held = self._leases.get(job.conversation_id)
        if held is not None and held[0] == token:
            del self._leases[job.conversation_id]
        # Ready again at once, for another worker (as on Redis); if the process is stopping,
        # the store's recovery queues it at the next start.
        entry = self._taken.pop(job.id, None)
        if entry is not None:
            self._make_ready(entry)

    async def add_deadline(self, conversation_id: str, message_id: str, at: float) -> None:
        self._deadlines[(conversation_id, message_id)] = at

    async def due_deadlines(self, now: float, limit: int) -> list[tuple[str, str]]:
        due = sorted((at, key) for key, at in self._deadlines.items() if at <= now)
        return [key for _, key in due[:limit]]

    async def remove_deadline(self, conversation_id: str, message_id: str) -> None:
        self._deadlines.pop((conversation_id, message_id), None)

    async def stats(self) -> tuple[int, float]:
        entries = [*self._ready.values(), *self._taken.values()]
        if not entries:
            return 0, 0.0
        oldest = min(e.created for e in entries)
        return len(entries), max(time.monotonic() - oldest, 0.0)

    async def waiting(self) -> int:
        return len(self._ready)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()


async def recover(store: SqliteStore) -> int:
    """After a start: signal a job for every conversation with replies still queued (their jobs
    were in the memory of the previous run), and look again at once at every reply waiting for
    tool results (the worker knows their deadline). Returns how many jobs were signalled."""
    conversation_ids = await store.conversations_with_replies()
    for cid in conversation_ids:
        store.jobs.signal(cid)
    for cid, mid in await store.replies_waiting_for_tools():
        await store.jobs.add_deadline(cid, mid, 0.0)
    return len(conversation_ids)
