"""Rate limits: per user (RATE_LIMIT), per user's AI replies (AI_RATE_LIMIT), and per client
address for requests that fail authentication (ANONYMOUS_RATE_LIMIT).

Fixed windows that start at a key's first hit (the `limits` library's "fixed window"):
- on Redis, one counter per (scope, identity) shared by every process and instance: INCR and
  PEXPIRE in one script, in the key's own slot (cluster-safe). Hand-written rather than the
  `limits` library's Redis storage because that one opens its own connection pool beside the
  store's and costs a redis-py call per request; this is one EVALSHA on the store's pipelined
  client (see storage/resp.py), which the throughput goals need.
- on the embedded store (one process), the `limits` library's in-memory storage.

When Redis cannot be reached the limiter lets requests through (fail open) rather than refusing
every user: the request then meets the same outage in the store and gets its 503. Checks are
skipped for a second after a failure so that an outage does not double every request's wait.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import cast

from loguru import logger
from redis.exceptions import RedisError

from conversational_core.errors import AppError, StoreUnavailable
from conversational_core.observability import metrics
from conversational_core.settings import Settings
from conversational_core.storage.base import Store
from conversational_core.storage.resp import ReplyError

_SKIP_AFTER_FAILURE_SECONDS = 1.0

# KEYS: counter.  ARGV: window ms.  Returns {hits in this window, ms until it resets}.
_HIT = """
local n = redis.call('INCR', KEYS[1])
local ttl = -1
if n > 1 then ttl = redis.call('PTTL', KEYS[1]) end
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


# The `limits` library's notation (parsed here: that library is only needed, and imported, on
# the embedded store).
_RATE = re.compile(r"(\d+)\s*/\s*(?:(\d+)\s*)?(second|minute|hour|day)s?")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

# KEYS: counter.  A refund never creates a window.
_REFUND = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class Rate:
    amount: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """`600/minute`, `10/30 seconds` → Rate; `off` → None (validated by Settings)."""
        if text.strip().lower() == "off":
            return None
        match = _RATE.fullmatch(text.strip().lower())
        if match is None:
            raise ValueError(f"not a rate: {text!r}")
        amount, multiple, unit = match.groups()
        return cls(int(amount), int(multiple or 1) * _UNIT_SECONDS[unit])


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: float

    def headers(self) -> dict[str, str]:
        """RateLimit-* (IETF draft, as GitHub and Cloudflare send them), Retry-After on a 429."""
        reset = str(max(1, math.ceil(self.reset_seconds)))
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": reset,
        }
        if not self.allowed:
            headers["Retry-After"] = reset
        return headers


class RateLimited(AppError):
    status, code = 429, "rate-limited"

    def __init__(self, decision: Decision, what: str) -> None:
        super().__init__(
            f"Too many {what}: at most {decision.limit} per window; retry in "
            f"{decision.headers()['Retry-After']} s.",
            headers=decision.headers(),
        )


class RateLimiter(ABC):
    def __init__(self) -> None:
        self._skip_until = 0.0

    async def hit(self, scope: str, identity: str, rate: Rate) -> Decision:
        """Count one request of `identity` against `rate`; whether it may pass."""
        if time.monotonic() < self._skip_until:
            return Decision(True, rate.amount, rate.amount, rate.seconds)
        try:
            hits, reset = await self._hit(scope, identity, rate)
        except (StoreUnavailable, ReplyError, RedisError):  # down, or refusing (OOM, READONLY…)
            metrics.RATE_LIMITER_ERRORS.inc()
            self._skip_until = time.monotonic() + _SKIP_AFTER_FAILURE_SECONDS
            logger.warning("rate limiter: store unavailable, letting requests through")
            return Decision(True, rate.amount, rate.amount, rate.seconds)
        allowed = hits <= rate.amount
        if not allowed:
            metrics.RATE_LIMITED.labels(scope).inc()
        return Decision(allowed, rate.amount, max(0, rate.amount - hits), reset)

    async def refund(self, scope: str, identity: str, rate: Rate) -> None:
        """Give back one hit (a request that turned out to cost nothing, e.g. a replay)."""
        # Unreachable: the hit stays counted (at worst one request too few in this window).
        with contextlib.suppress(StoreUnavailable, ReplyError, RedisError):
            await self._refund(scope, identity, rate)

    @abstractmethod
    async def _hit(self, scope: str, identity: str, rate: Rate) -> tuple[int, float]:
        """(hits in the current window including this one, seconds until it resets)."""

    @abstractmethod
    async def _refund(self, scope: str, identity: str, rate: Rate) -> None: ...


class RedisRateLimiter(RateLimiter):
    def __init__(self, store: Store) -> None:
        from conversational_core.storage.redis import RedisStore

        super().__init__()
        self._store = cast(RedisStore, store)  # (store.backend == "redis")
        self._script = self._store.register_script(_HIT)
        self._refund_script = self._store.register_script(_REFUND)

    def _key(self, scope: str, identity: str, rate: Rate) -> str:
        return self._store.tagged_key(f"rl:{scope}:{identity}", f"{rate.amount}/{rate.seconds}")

    async def _hit(self, scope: str, identity: str, rate: Rate) -> tuple[int, float]:
        key = self._key(scope, identity, rate)
        hits, ttl_ms = await self._store.script(self._script, [key], [rate.seconds * 1000])
        return int(hits), int(ttl_ms) / 1000

    async def _refund(self, scope: str, identity: str, rate: Rate) -> None:
        await self._store.script(self._refund_script, [self._key(scope, identity, rate)], [])


class MemoryRateLimiter(RateLimiter):
    def __init__(self) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import FixedWindowRateLimiter

        super().__init__()
        self._item = RateLimitItemPerSecond
        self._storage = MemoryStorage()
        self._strategy = FixedWindowRateLimiter(self._storage)

    async def _hit(self, scope: str, identity: str, rate: Rate) -> tuple[int, float]:
        item = self._item(rate.amount, rate.seconds)
        allowed = await self._strategy.hit(item, scope, identity)
        stats = await self._strategy.get_window_stats(item, scope, identity)
        hits = rate.amount - stats.remaining if allowed else rate.amount + 1
        return hits, max(0.0, stats.reset_time - time.time())

    async def _refund(self, scope: str, identity: str, rate: Rate) -> None:
        item = self._item(rate.amount, rate.seconds)
        key = item.key_for(scope, identity)
        if await self._storage.get(key) > 0:
            await self._storage.incr(key, rate.seconds, amount=-1)


@dataclass(frozen=True, slots=True)
class Limits:
    """The limiter and the configured rates (None: that limit is off)."""

    limiter: RateLimiter
    user: Rate | None
    ai: Rate | None
    anonymous: Rate | None

    @classmethod
    def build(cls, settings: Settings, store: Store) -> Limits:
        limiter = RedisRateLimiter(store) if store.backend == "redis" else MemoryRateLimiter()
        return cls(
            limiter,
            Rate.parse(settings.RATE_LIMIT),
            Rate.parse(settings.AI_RATE_LIMIT),
            Rate.parse(settings.ANONYMOUS_RATE_LIMIT),
        )
