"""Rate limits: per user (RATE_LIMIT), per user's AI replies (AI_RATE_LIMIT), and per client
address for requests that fail authentication (ANONYMOUS_RATE_LIMIT).

Fixed windows that start at a key's first hit, counted by the backend's `Counters`: on Redis one
counter per (scope, identity) shared by every process and instance (storage/redis/limiter.py);
on the embedded store, in memory (storage/embedded/limiter.py). This module is the policy.

When the store cannot serve the limiter lets requests through (fail open) rather than refusing
every user: the request then meets the same outage in the store and gets its 503. Checks are
skipped for a second after a failure so that an outage does not double every request's wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from dataclasses import dataclass

from loguru import logger

from conversational_core.errors import AppError
from conversational_core.observability import metrics
from conversational_core.settings import Settings
from conversational_core.storage.base import Counters
from conversational_core.storage.errors import Unavailable

_SKIP_AFTER_FAILURE_SECONDS = 1.0
_SEEN_MAX = 10_000  # identities whose last count this process remembers (the oldest go first)
_LEASE_SHARE = 64  # a lease counts this share of what is left of a window...
_LEASE_MAX = 256  # ... and at most this many requests
# Far from the limit (where a full lease is a 64th of less than half of what is left), the next
# lease is counted as soon as this one is being used: requests rarely find none, which costs
# each of them a round trip (waiting for the next lease, or counting itself: with 32 requests
# at once, one in 14 did). At most two leases are held unused: still under a 64th of what is left.
_REFILL_BELOW = _LEASE_MAX
_REFILL_FROM = 2 * _LEASE_SHARE * _LEASE_MAX
_SAME_WINDOW_SECONDS = 1.0  # a count whose window ends later than that is of a new window


# The `limits` library's notation (parsed here: that library is only needed on the embedded
# store).
_RATE = re.compile(r"(\d+)\s*/\s*(?:(\d+)\s*)?(second|minute|hour|day)s?")
_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


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


@dataclass(slots=True)  # not frozen: made per request; frozen, each field costs 10x to set
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

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The same, as ASGI headers: built on every limited request (a third of the cost of
        the dictionary above, encoded)."""
        whole = int(self.reset_seconds)  # (math.ceil and max cost twice the rest of this)
        whole += whole < self.reset_seconds
        reset = b"%d" % (whole if whole > 0 else 1)
        limit = _LIMIT_HEADERS.get(self.limit)
        if limit is None:
            limit = _LIMIT_HEADERS[self.limit] = (b"ratelimit-limit", b"%d" % self.limit)
        headers = [
            limit,
            (b"ratelimit-remaining", b"%d" % self.remaining),
            (b"ratelimit-reset", reset),
        ]
        if not self.allowed:
            headers.append((b"retry-after", reset))
        return headers


_LIMIT_HEADERS: dict[int, tuple[bytes, bytes]] = {}  # by limit (one per configured rate)


class RateLimited(AppError):
    status, code = 429, "rate-limited"

    def __init__(self, decision: Decision, what: str) -> None:
        super().__init__(
            f"Too many {what}: at most {decision.limit} per window; retry in "
            f"{decision.headers()['Retry-After']} s.",
            headers=decision.headers(),
        )


class _Seen:
    """This process's view of an identity's current window, from its last count."""

    __slots__ = ("leased", "left", "until")

    def __init__(self, left: int, leased: int, until: float) -> None:
        self.left = left  # requests left in the store's count (less those let run ahead since)
        self.leased = leased  # requests counted in the store that this process has yet to use
        self.until = until  # when the window ends (monotonic)


class RateLimiter:
    """Counts requests against rates (fail open when the store cannot serve).

    A user's requests are counted in leases: a count in the store may count several requests at
    once (a 64th of what is left of the window, at most 256), which this process then lets run
    with no count of their own (`take`) - so that a user with a generous rate costs the store a
    command every few hundred requests, not one each; far from the limit the next lease is
    counted before this one is spent (`_refill`). Near the limit the lease is one request:
    the limit holds exactly, in one process as across many. What a lease cannot do is give back
    what it did not use: requests leased by a process that the user then no longer sends to
    stay counted until the window ends (at most a 64th of the window's rate per process)."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._skip_until = 0.0
        self._seen: dict[tuple[str, str], _Seen] = {}
        # Identities with a lease being counted, and its end: one at a time (the requests
        # meanwhile wait for it, and are counted one by one if it is spent by then), or requests
        # arriving together would each lease a share of the window, and this process would hold
        # most of it unused while refusing the user.
        self._leasing: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._refills: set[asyncio.Task[None]] = set()

    def _current(self, scope: str, identity: str, now: float | None = None) -> _Seen | None:
        seen = self._seen.get((scope, identity))
        if seen is not None and seen.until <= (time.monotonic() if now is None else now):
            del self._seen[(scope, identity)]
            return None
        return seen

    def take(self, scope: str, identity: str, rate: Rate) -> Decision | None:
        """A request of `identity` let run on this process's lease (no count in the store), or
        None when the lease is spent (or there is none): then the request is counted (`hit`)."""
        now = time.monotonic()
        seen = self._current(scope, identity, now)
        if seen is None or seen.leased <= 0:
            return None
        seen.leased -= 1
        if (
            seen.leased < _REFILL_BELOW
            and seen.left >= _REFILL_FROM
            and (scope, identity) not in self._leasing
            and now >= self._skip_until
        ):
            self._refill(scope, identity, rate)
        return Decision(True, rate.amount, seen.left + seen.leased, seen.until - now)

    def _refill(self, scope: str, identity: str, rate: Rate) -> None:
        """Count the next lease now, in the background (see _REFILL_BELOW)."""
        key = (scope, identity)
        done = self._lease_begins(key)
        task = asyncio.get_running_loop().create_task(self._lease(key, rate, done))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    def _lease_size(self, scope: str, identity: str, rate: Rate) -> int:
        """How many requests the next count leases: a 64th of what is left, at most 256."""
        seen = self._current(scope, identity)
        left = rate.amount if seen is None else seen.left
        return min(_LEASE_MAX, max(1, left // _LEASE_SHARE))

    def _lease_begins(self, key: tuple[str, str]) -> asyncio.Future[None]:
        """A lease of `key` is being counted: requests that find none wait for it (`hit`)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leasing[key] = done
        return done

    def _lease_ends(self, key: tuple[str, str], done: asyncio.Future[None]) -> None:
        if self._leasing.get(key) is done:
            del self._leasing[key]
        if not done.done():
            done.set_result(None)

    async def _lease(self, key: tuple[str, str], rate: Rate, done: asyncio.Future[None]) -> None:
        scope, identity = key
        try:
            want = self._lease_size(scope, identity, rate)
            hits, reset, counted = await self._counters.hit(
                scope, identity, rate.amount, rate.seconds, want
            )
            within = max(0, min(counted, rate.amount - (hits - counted)))  # (all, far from it)
            self._note(scope, identity, max(0, rate.amount - hits), within, reset)
        except Exception:  # noqa: S110 - (the store down or closing): the next request counts
            pass
        finally:
            self._lease_ends(key, done)

    def ahead(self, scope: str, identity: str, rate: Rate) -> bool:
        """Whether a request of `identity` may run while it is counted, not after its count: this
        process counted the identity in the current window and saw more than a margin (a tenth
        of the rate, at least 1) left, less the requests it has let run so since then. Such a
        request's count runs at the same time as its own work, not a round trip before it. Near
        the limit requests are counted first again, so that a client writing one request
        after another meets its limit exactly; only requests running at the same moment in
        other processes, past that margin, can pass over it (each process stops at its next
        count). Reserves one of the requests left when it answers True."""
        seen = self._current(scope, identity)
        if seen is None or seen.left <= max(1, rate.amount // 10):
            return False
        seen.left -= 1
        return True

    def _note(self, scope: str, identity: str, left: int, leased: int, reset: float) -> None:
        key = (scope, identity)
        seen = self._current(scope, identity)
        until = time.monotonic() + reset
        if seen is not None and until < seen.until + _SAME_WINDOW_SECONDS:
            # (Counts of the same window may land in any order.)
            seen.left = min(seen.left, left)
            seen.leased += leased
            return
        # The first count of the window here, or of a new window the store began while this
        # process still saw the old one (its end measured a round trip late).
        if len(self._seen) >= _SEEN_MAX:
            for stale in list(self._seen)[: _SEEN_MAX // 2]:
                del self._seen[stale]
        self._seen[key] = _Seen(left, leased, until)

    async def hit(self, scope: str, identity: str, rate: Rate, lease: bool = False) -> Decision:
        """Count one request of `identity` against `rate`; whether it may pass. With `lease`,
        count more than this one where the window has room (see the class)."""
        if time.monotonic() < self._skip_until:
            return Decision(True, rate.amount, rate.amount, rate.seconds)
        want = 1
        key = (scope, identity)
        pending = self._leasing.get(key) if lease else None
        if pending is not None:
            # A lease is being counted: this request waits for it (a round trip that is under
            # way already) rather than counting itself, and is counted alone only if the lease
            # is spent by then.
            await asyncio.shield(pending)
            taken = self.take(scope, identity, rate)
            if taken is not None:
                return taken
            pending = self._leasing.get(key)
        counting = None
        if lease and pending is None:
            want = self._lease_size(scope, identity, rate)
            counting = self._lease_begins(key)
        try:
            hits, reset, counted = await self._counters.hit(
                scope, identity, rate.amount, rate.seconds, want
            )
        except Unavailable:  # down, or refusing (OOM, READONLY…)
            metrics.RATE_LIMITER_ERRORS.inc()
            self._skip_until = time.monotonic() + _SKIP_AFTER_FAILURE_SECONDS
            logger.warning("rate limiter: store unavailable, letting requests through")
            return Decision(True, rate.amount, rate.amount, rate.seconds)
        finally:
            if counting is not None:
                # (Ended before the lease is noted below: the waiters it wakes run after this
                # task's next await, when it has been.)
                self._lease_ends(key, counting)
        allowed = hits - counted < rate.amount  # (this request is the first of those counted)
        if not allowed:
            metrics.RATE_LIMITED.labels(scope).inc()
        left = max(0, rate.amount - hits)
        leased = counted - 1 if allowed else 0
        self._note(scope, identity, left, leased, reset)
        if not allowed:
            # Over the limit in the store, but this process may hold requests leased for the
            # window (by a count that landed meanwhile): this request is one of them.
            return self.take(scope, identity, rate) or Decision(False, rate.amount, 0, reset)
        return Decision(allowed, rate.amount, left + leased, reset)

    async def refund(self, scope: str, identity: str, rate: Rate) -> None:
        """Give back one hit (a request that turned out to cost nothing, e.g. a replay)."""
        # Unreachable: the hit stays counted (at worst one request too few in this window).
        with contextlib.suppress(Unavailable):
            await self._counters.refund(scope, identity, rate.amount, rate.seconds)


@dataclass(frozen=True, slots=True)
class Limits:
    """The limiter and the configured rates (None: that limit is off)."""

    limiter: RateLimiter
    user: Rate | None
    ai: Rate | None
    anonymous: Rate | None

    @classmethod
    def build(cls, settings: Settings, counters: Counters) -> Limits:
        return cls(
            RateLimiter(counters),
            Rate.parse(settings.RATE_LIMIT),
            Rate.parse(settings.AI_RATE_LIMIT),
            Rate.parse(settings.ANONYMOUS_RATE_LIMIT),
        )
