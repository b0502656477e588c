"""Rate-limit counters on Redis: one fixed-window counter per (scope, identity, rate), shared by
every process and instance, each count (INCRBY, PEXPIRE) one script in the counter's own slot. A
count may be a process's lease of several requests (RateLimiter).

Hand-written rather than the `limits` library's Redis storage: that one opens a connection pool
of its own beside the store's and costs a redis-py call per request; this is one EVALSHA on the
store's pipelined client (client.py), which the throughput goals need.
"""

from __future__ import annotations

from conversational_core.storage.base import Counters
from conversational_core.storage.redis import scripts
from conversational_core.storage.redis.client import Connection
from conversational_core.storage.redis.keys import Keys


class RedisCounters(Counters):
    def __init__(self, redis: Connection, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def hit(
        self, scope: str, identity: str, amount: int, seconds: int, want: int = 1
    ) -> tuple[int, float, int]:
        key = self._keys.rate(scope, identity, amount, seconds)
        hits, ttl_ms, counted = await self._redis.script(
            scripts.HIT, [key], [seconds * 1000, amount, want]
        )
        return int(hits), int(ttl_ms) / 1000, int(counted)

    async def refund(self, scope: str, identity: str, amount: int, seconds: int) -> None:
        key = self._keys.rate(scope, identity, amount, seconds)
        await self._redis.script(scripts.REFUND, [key], [])
