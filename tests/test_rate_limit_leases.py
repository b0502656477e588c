"""The rate limiter's leases under load (ratelimit.RateLimiter): far from a generous limit a
process counts a user's requests a lease at a time, ahead of need, on the real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conversational_core.ratelimit import Decision, Rate, RateLimiter
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import backend_for, make_settings


async def test_far_from_the_limit_the_next_lease_is_counted_before_this_one_is_spent(
    redis_store: RedisStore,
) -> None:
    """A busy user far from a generous limit, on 32 connections sending one request after
    another to one process (AuthMiddleware's calls: `take`, else `hit`): after the first
    requests, every one finds a lease counted ahead of it (none waits a round trip), the
    store counts one lease at a time (requests that find a lease being counted wait for it
    rather than count themselves), and no more is leased than the requests and two leases."""
    counters = backend_for(redis_store, make_settings()).counters
    counts = []

    class Counted:
        async def hit(self, *args: Any) -> tuple[int, float, int]:
            counts.append(args)
            return await counters.hit(*args)

    limiter = RateLimiter(Counted())  # type: ignore[arg-type]
    rate = Rate(10_000_000, 60)
    found_none = 0

    async def request() -> Decision:
        nonlocal found_none
        decision = limiter.take("user", "alice", rate)
        if decision is None:
            found_none += 1
            decision = await limiter.hit("user", "alice", rate, lease=True)
        return decision

    async def client() -> None:  # one connection: a request after another
        for _ in range(200):
            assert (await request()).allowed
            await asyncio.sleep(0)  # (the request's own work: other requests meanwhile)

    await asyncio.gather(*(client() for _ in range(32)))
    # Only the first requests came before any lease (about two rounds of 32; without counting
    # ahead, every 256 requests 32 waited again: 800 in all).
    assert found_none <= 2 * 32, found_none
    # One count a lease of 256 (without waiting for the lease being counted, the requests that
    # found none counted themselves: about 230 counts).
    assert len(counts) <= 6400 // 256 + 4, len(counts)
    key = redis_store.keys.rate("user", "alice", 10_000_000, 60)
    stored = int(await redis_store.redis.call("GET", key))
    assert 6400 <= stored <= 6400 + 2 * 256, stored


@pytest.mark.parametrize("allowed", [True, False])
@pytest.mark.parametrize("reset", [0.0, 0.2, 1.0, 59.01, 3600.000001])
def test_quota_headers_as_sent_match_the_decision(allowed: bool, reset: float) -> None:
    """The RateLimit-* headers a response carries (raw, lower-case) say what the decision's
    own headers say."""
    decision = Decision(allowed, 600, 0 if not allowed else 17, reset)
    assert decision.raw_headers() == [
        (name.lower().encode(), value.encode()) for name, value in decision.headers().items()
    ]
