"""The in-process event log and job queue of the embedded store (SqliteStore).

The embedded store runs in one process, so its live machinery lives in memory:

* :class:`MemoryEventLog` keeps each conversation's recent events (a bounded deque, like the
  Redis stream `MAXLEN`) and fans them out to the clients connected to this process. Event ids
  come from one process-wide counter, so they increase within a conversation however much of
  its deque was trimmed. The counter starts at the wall clock in microseconds, so that ids given
  after a restart are larger than those of the previous run (a client reconnecting with an old
  Last-Event-ID then gets what is retained, rather than nothing).
* :class:`MemoryJobQueue` signals conversations with replies to write, and leases conversations
  to workers, with the semantics of :class:`~conversational_core.storage.base.JobQueue`.

Neither survives a restart: the events are gone (clients reconnecting get what happens from
then on), and :func:`recover` re-signals every conversation whose reply queue (a table of the
SQLite file) is not empty. Neither is shared between processes either: with the embedded store,
the API and the reply worker must run in one process (WORKER_IN_API), with one uvicorn worker.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from conversational_core.storage.base import Event, EventHub, Job, JobQueue, SlowConsumer

if TYPE_CHECKING:
    from conversational_core.storage.sqlite import SqliteStore

_EVENT_ID: Final = re.compile(r"^[0-9]{1,20}$")

# A conversation's log with no subscriber and no event for this long is dropped (Redis: the
# stream's TTL), so that memory follows the active conversations, not every one ever seen.
DEFAULT_IDLE_TTL_S: Final = 86_400.0
# At most this often, a publish looks for such logs.
_SWEEP_INTERVAL_S: Final = 60.0


def parse_event_id(value: str) -> int:
    """An event id as the integer it stands for; ValueError for anything else."""
    if not _EVENT_ID.fullmatch(value):
        raise ValueError("not an event id")
    return int(value)


# --- Events -------------------------------------------------------------------------------------


class _Log:
    __slots__ = ("entries", "forgotten", "touched")

    def __init__(self, max_len: int) -> None:
        # (id as int, event), ids increasing.
        self.entries: deque[tuple[int, Event]] = deque(maxlen=max_len)
        self.touched = time.monotonic()
        # The conversation was deleted: drop the log once its last subscriber leaves.
        self.forgotten = False

    def after(self, after: int | None, limit: int | None = None) -> list[Event]:
        start = 0 if after is None else bisect.bisect_right(self.entries, after, key=_entry_id)
        stop = None if limit is None else start + limit
        return [event for _, event in itertools.islice(self.entries, start, stop)]


def _entry_id(entry: tuple[int, Event]) -> int:
    return entry[0]


_LIVE: Final = 0
_OVERFLOWED: Final = 1
_CLOSED: Final = 2


class _Subscriber:
    """One client: what it missed (`backlog`, retained events, already in memory) and then a
    bounded buffer of live events; a publish that finds the buffer full marks it overflowed."""

    __slots__ = ("after", "backlog", "buffer", "limit", "state", "wake")

    def __init__(self, after: int, backlog: list[Event], limit: int) -> None:
        self.after = after
        self.backlog: deque[Event] = deque(backlog)
        self.buffer: deque[Event] = deque()
        self.limit = limit
        self.state = _LIVE
        self.wake = asyncio.Event()

    def offer(self, number: int, event: Event) -> None:
        if self.state != _LIVE or number <= self.after:
            return
        if len(self.buffer) >= self.limit:
            self.state = _OVERFLOWED
            self.buffer.clear()
        else:
            self.buffer.append(event)
        self.wake.set()

    def end(self) -> None:
        if self.state == _LIVE:
            self.state = _CLOSED
        self.wake.set()


class MemoryEventLog(EventHub):
    """Per-process event log and fan-out (see the module doc).

    `publish` is synchronous and never blocks: the store calls it right after a commit, so events
    are logged in commit order. Subscribing is synchronous too (copy of the retained events plus
    registration, with no await in between), which is what makes a subscription free of gaps and
    duplicates.
    """

    def __init__(
        self,
        max_len: int = 10_000,
        client_buffer: int = 1000,
        *,
        idle_ttl_seconds: float = DEFAULT_IDLE_TTL_S,
    ) -> None:
        if max_len < 1 or client_buffer < 1:
            raise ValueError("max_len and client_buffer must be positive")
        self._max_len = max_len
        self._client_buffer = client_buffer
        self._idle_ttl = idle_ttl_seconds
        self._logs: dict[str, _Log] = {}
        self._subs: dict[str, set[_Subscriber]] = {}
        self._ids = itertools.count(time.time_ns() // 1000)
        self._last_sweep = time.monotonic()
        self._closed = False

    # Writing ---------------------------------------------------------------------------------

    def publish(self, conversation_id: str, type: str, data: bytes) -> Event:
        number = next(self._ids)
        event = Event(str(number), type, data)
        now = time.monotonic()
        log = self._logs.get(conversation_id)
        if log is None:
            log = self._logs[conversation_id] = _Log(self._max_len)
        log.forgotten = False  # an event after forget(): the id is in use again
        log.touched = now
        log.entries.append((number, event))
        subs = self._subs.get(conversation_id)
        if subs:
            for sub in subs:
                sub.offer(number, event)
        if now - self._last_sweep >= _SWEEP_INTERVAL_S:
            self._sweep(now)
        return event

    def forget(self, conversation_id: str) -> None:
        """The conversation is gone (call after publishing its last event): drop its log now,
        or when its last subscriber leaves, so that connected clients still get that event."""
        if self._subs.get(conversation_id):
            log = self._logs.get(conversation_id)
            if log is not None:
                log.forgotten = True
        else:
            self._logs.pop(conversation_id, None)

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        idle = [
            cid
            for cid, log in self._logs.items()
            if now - log.touched >= self._idle_ttl and not self._subs.get(cid)
        ]
        for cid in idle:
            del self._logs[cid]

    # Reading -----------------------------------------------------------------------------------

    def read(self, conversation_id: str, after: str | None, limit: int) -> list[Event]:
        """Retained events strictly after `after` (from the oldest when None), oldest first."""
        start = None if after is None else parse_event_id(after)
        log = self._logs.get(conversation_id)
        if log is None or limit <= 0:
            return []
        return log.after(start, limit)

    def last_id(self, conversation_id: str) -> str | None:
        log = self._logs.get(conversation_id)
        if log is None or not log.entries:
            return None
        return log.entries[-1][1].id

    # Subscribing -------------------------------------------------------------------------------

    def subscribe(
        self, conversation_id: str, after: str | None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Event]]:
        start = None if after is None else parse_event_id(after)  # ValueError at once
        return self._subscription(conversation_id, start)

    @contextlib.asynccontextmanager
    async def _subscription(
        self, conversation_id: str, after: int | None
    ) -> AsyncIterator[AsyncIterator[Event]]:
        log = self._logs.get(conversation_id)
        backlog = log.after(after) if after is not None and log is not None else []
        sub = _Subscriber(-1 if after is None else after, backlog, self._client_buffer)
        if self._closed:
            sub.end()
        else:
            self._subs.setdefault(conversation_id, set()).add(sub)
        iterator = self._iterate(sub)
        try:
            yield iterator
        finally:
            await iterator.aclose()
            self._unsubscribe(conversation_id, sub)

    @staticmethod
    async def _iterate(sub: _Subscriber) -> AsyncGenerator[Event, None]:
        while True:
            if sub.state == _OVERFLOWED:
                raise SlowConsumer()
            if sub.state == _CLOSED:
                return
            if sub.backlog:
                yield sub.backlog.popleft()
            elif sub.buffer:
                yield sub.buffer.popleft()
            else:
                sub.wake.clear()
                await sub.wake.wait()

    def _unsubscribe(self, conversation_id: str, sub: _Subscriber) -> None:
        subs = self._subs.get(conversation_id)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[conversation_id]
            log = self._logs.get(conversation_id)
            if log is not None and log.forgotten:
                del self._logs[conversation_id]

    def subscriber_count(self, conversation_id: str | None = None) -> int:
        """Clients subscribed (to one conversation, or to any), for metrics and tests."""
        if conversation_id is not None:
            return len(self._subs.get(conversation_id, ()))
        return sum(len(subs) for subs in self._subs.values())

    async def close(self) -> None:
        """End every subscription; later ones end at once. Publishing still logs (the store may
        write while the service shuts down)."""
        self._closed = True
        subs, self._subs = self._subs, {}
        for group in subs.values():
            for sub in group:
                sub.end()
        for cid in [cid for cid, log in self._logs.items() if log.forgotten]:
            del self._logs[cid]


# --- Jobs ---------------------------------------------------------------------------------------


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
        # The job stays taken and unacknowledged: it returns to the queue after the lease time
        # (or, when the process is stopping, the store's recovery queues it at the next start).

    async def stats(self) -> tuple[int, float]:
        entries = [*self._ready.values(), *self._taken.values()]
        if not entries:
            return 0, 0.0
        oldest = min(e.created for e in entries)
        return len(entries), max(time.monotonic() - oldest, 0.0)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()


async def recover(store: SqliteStore) -> int:
    """After a start: signal a job for every conversation with replies still queued (their jobs
    were in the memory of the previous run). Returns how many were signalled."""
    conversation_ids = await store.conversations_with_replies()
    for cid in conversation_ids:
        store.jobs.signal(cid)
    return len(conversation_ids)
