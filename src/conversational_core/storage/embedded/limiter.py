"""Rate-limit counters of the embedded store (one process): the `limits` library's fixed windows
in memory."""

from __future__ import annotations

import time

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter

from conversational_core.storage.base import Counters


class MemoryCounters(Counters):
    def __init__(self) -> None:
        self._storage = MemoryStorage()
        self._strategy = FixedWindowRateLimiter(self._storage)

    async def hit(
        self, scope: str, identity: str, amount: int, seconds: int, want: int = 1
    ) -> tuple[int, float, int]:
        # One hit at a time: a lease (`want`) saves a round trip to a store shared by processes;
        # this one is in the process's memory.
        item = RateLimitItemPerSecond(amount, seconds)
        allowed = await self._strategy.hit(item, scope, identity)
        stats = await self._strategy.get_window_stats(item, scope, identity)
        hits = amount - stats.remaining if allowed else amount + 1
        return hits, max(0.0, stats.reset_time - time.time()), 1

    async def refund(self, scope: str, identity: str, amount: int, seconds: int) -> None:
        key = RateLimitItemPerSecond(amount, seconds).key_for(scope, identity)
        if await self._storage.get(key) > 0:
            await self._storage.incr(key, seconds, amount=-1)
