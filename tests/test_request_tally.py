"""The metrics' tallies (observability/metrics.py: RequestTally, CountTally): what they hand to
prometheus_client is what the same requests counted one by one would have given."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from conversational_core.observability.metrics import _DURATION_BUCKETS, CountTally, RequestTally
from tests.fixtures.metrics import samples, value

ENDPOINT = "/conversations/{conversation_id}/messages"
# Below the first bucket, on bounds, between them, past the last, and a stream (not timed).
REQUESTS = [
    ("POST", 201, 0.0004),
    ("POST", 201, 0.001),
    ("POST", 201, 0.0011),
    ("POST", 409, 0.0025),
    ("GET", 200, 0.3),
    ("GET", 200, 7.0),
    ("GET", 200, 11.0),
    ("GET", 200, None),
]


def _metrics() -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    counter = Counter("t_requests_total", "t", ["method", "endpoint", "status"], registry=registry)
    histogram = Histogram(
        "t_request_duration_seconds",
        "t",
        ["method", "endpoint"],
        buckets=_DURATION_BUCKETS,
        registry=registry,
    )
    return registry, counter, histogram


def _without_times(registry: CollectorRegistry) -> dict[object, float]:
    text = generate_latest(registry).decode()
    return {k: v for k, v in samples(text).items() if not k[0].endswith("_created")}


async def test_a_flush_gives_what_counting_each_request_gives() -> None:
    one_by_one, counter, histogram = _metrics()
    for method, status, seconds in REQUESTS * 3:
        counter.labels(method, ENDPOINT, str(status)).inc()
        if seconds is not None:
            histogram.labels(method, ENDPOINT).observe(seconds)
    tallied, counter, histogram = _metrics()
    tally = RequestTally(counter, histogram, _DURATION_BUCKETS)
    for method, status, seconds in REQUESTS * 3:  # (in a loop: held until the flush)
        tally.record(method, ENDPOINT, status, seconds)
    assert value(generate_latest(tallied).decode(), "t_requests_total",
                 method="GET", endpoint=ENDPOINT, status="200") == 0  # fmt: skip
    tally.flush()
    tally.flush()  # (nothing left: nothing added twice)
    assert _without_times(tallied) == _without_times(one_by_one)
    text = generate_latest(tallied).decode()
    assert value(text, "t_request_duration_seconds_count", method="GET", endpoint=ENDPOINT) == 9
    assert value(text, "t_requests_total", method="GET", endpoint=ENDPOINT, status="200") == 12


async def _counted(registry: CollectorRegistry, n: int) -> float:
    """The POST count once it is `n` (the loop's timer hands it over: a few turns of 5 ms)."""
    for _ in range(200):
        text = generate_latest(registry).decode()
        count = value(text, "t_requests_total", method="POST", endpoint=ENDPOINT, status="201")
        if count >= n:
            return count
        await asyncio.sleep(0.005)
    return count


def test_a_flush_due_on_a_loop_that_closed_is_due_again_on_the_next() -> None:
    registry, counter, histogram = _metrics()
    tally = RequestTally(counter, histogram, _DURATION_BUCKETS)

    async def first() -> None:
        tally.record("POST", ENDPOINT, 201, 0.004)  # due in a second: the loop is gone by then

    async def second() -> float:
        tally.FLUSH_SECONDS = 0.02
        tally.record("POST", ENDPOINT, 201, 0.004)
        return await _counted(registry, 2)

    asyncio.run(first())
    assert asyncio.run(second()) == 2


async def test_requests_reach_the_metrics_within_the_flush_time() -> None:
    registry, counter, histogram = _metrics()
    tally = RequestTally(counter, histogram, _DURATION_BUCKETS)
    tally.FLUSH_SECONDS = 0.02
    tally.record("POST", ENDPOINT, 201, 0.004)
    text = generate_latest(registry).decode()
    assert value(text, "t_requests_total", method="POST", endpoint=ENDPOINT, status="201") == 0
    assert await _counted(registry, 1) == 1
    text = generate_latest(registry).decode()
    count = value(text, "t_request_duration_seconds_count", method="POST", endpoint=ENDPOINT)
    assert count == 1


async def test_counter_increments_are_handed_over_added_up_once() -> None:
    registry = CollectorRegistry()
    counter = Counter("t_messages_total", "t", ["role"], registry=registry)
    tally = CountTally()
    user, assistant = counter.labels("user"), counter.labels("assistant")
    for _ in range(3):  # (in a loop: held until the flush)
        tally.add(user)
        tally.add(assistant, 2.5)
    assert value(generate_latest(registry).decode(), "t_messages_total", role="user") == 0
    tally.flush()
    tally.flush()  # (nothing left: nothing added twice)
    text = generate_latest(registry).decode()
    assert value(text, "t_messages_total", role="user") == 3
    assert value(text, "t_messages_total", role="assistant") == 7.5


async def test_an_amount_below_zero_is_left_out_and_the_rest_counted() -> None:
    """A provider's usage that makes no sense (negative tokens) must not cost the batch: a
    counter's `inc` refuses it, and the flush would lose the other counts with it. (In a
    loop: both are held for the same flush.)"""
    registry = CollectorRegistry()
    counter = Counter("t_tokens_total", "t", ["kind"], registry=registry)
    tally = CountTally()
    tally.add(counter.labels("prompt"), -3)
    tally.add(counter.labels("completion"), 5)
    tally.flush()
    text = generate_latest(registry).decode()
    assert value(text, "t_tokens_total", kind="completion") == 5
    assert value(text, "t_tokens_total", kind="prompt") == 0
