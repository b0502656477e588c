"""The embedded backend's event log: each conversation's recent events in this process's memory,
fanned out to the clients connected to it (the embedded store runs in one process).

:class:`MemoryEventLog` keeps each conversation's recent events (a bounded deque, like the Redis
stream's `MAXLEN`) and is the process's EventHub. Event ids come from one process-wide counter,
so they increase within a conversation however much of its deque was trimmed. The counter starts
at the wall clock in microseconds, so that ids given after a restart are larger than those of
the previous run. Events are not kept across a restart: a client reconnecting with an id of
before is told to resync (`conversation.resync`, EventHub.subscribe), then gets what happens
from then on.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import re
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final

from conversational_core.storage.base import Event, EventHub, SlowConsumer
from conversational_core.storage.resync import resync_event

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

_BATCH: Final = 500  # events handed over at once, at most (one write to a client)


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
        self._first = time.time_ns() // 1000  # ids before it were given before a restart
        self._ids = itertools.count(self._first)
        self._latest = 0  # the newest id given out
        self._last_sweep = time.monotonic()
        self._closed = False

    # Writing ---------------------------------------------------------------------------------

    def publish(self, conversation_id: str, type: str, data: bytes) -> Event:
        number = self._latest = next(self._ids)
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

    async def resumes(self, conversation_id: str, after: str) -> bool:
        try:
            number = parse_event_id(after)
        except ValueError:
            return False  # (e.g. a Redis stream id, after a move between stores)
        # (an id of before a restart is of the past too: the subscription says to resync)
        return number < self._first or number <= self._latest

    def subscribe(
        self, conversation_id: str, after: str | None
    ) -> contextlib.AbstractAsyncContextManager[AsyncIterator[list[Event]]]:
        start = None if after is None else parse_event_id(after)  # ValueError at once
        return self._subscription(conversation_id, start)

    @contextlib.asynccontextmanager
    async def _subscription(
        self, conversation_id: str, after: int | None
    ) -> AsyncIterator[AsyncIterator[list[Event]]]:
        log = self._logs.get(conversation_id)
        backlog: list[Event] = []
        if after is not None and after != 0 and self._lost(log, after):
            # Events after the client's last may be gone: it resyncs, then goes on from the
            # newest event (EventHub.subscribe), or gets the deletion when that is the newest.
            newest = log.entries[-1] if log is not None and log.entries else None
            at = after if newest is None else max(newest[0], after)
            told = resync_event(conversation_id, str(after), newest[1] if newest else None, str(at))
            backlog, after = [told], at
        elif after is not None and log is not None:
            backlog = log.after(after)
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

    def _lost(self, log: _Log | None, after: int) -> bool:
        """Whether events after `after` may be gone: it is of before a restart (events are not
        kept across one), the log was dropped (idle), or it is older than the oldest event
        kept (trimmed; only the last one trimmed would have lost nothing after it)."""
        if after < self._first or log is None:
            return True
        return bool(log.entries) and after < log.entries[0][0]

    @staticmethod
    async def _iterate(sub: _Subscriber) -> AsyncGenerator[list[Event], None]:
        while True:
            if sub.state == _OVERFLOWED:
                raise SlowConsumer()
            if sub.state == _CLOSED:
                return
            pending = sub.backlog or sub.buffer
            if pending:
                yield [pending.popleft() for _ in range(min(len(pending), _BATCH))]
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
