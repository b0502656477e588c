"""The request metrics' tally (observability/metrics.py:RequestTally): what it hands to
prometheus_client is what the same requests counted one by one would have given."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from conversational_core.observability.metrics import _DURATION_BUCKETS, RequestTally
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


def test_a_flush_gives_what_counting_each_request_gives() -> None:
    one_by_one, counter, histogram = _metrics()
    for method, status, seconds in [*REQUESTS, *REQUESTS[4:5]]:
        counter.labels(method, ENDPOINT, str(status)).inc()
        if seconds is not None:
            histogram.labels(method, ENDPOINT).observe(seconds)
    tallied, counter, histogram = _metrics()
    tally = RequestTally(counter, histogram, _DURATION_BUCKETS)
    for method, status, seconds in REQUESTS:
        tally.record(method, ENDPOINT, status, seconds)  # (no loop: each handed over at once)
    tally._scheduled = True  # as in a running loop: held until the flush
    tally.record("GET", ENDPOINT, 200, 0.3)
    assert _without_times(tallied) != _without_times(one_by_one)
    tally.flush()
    tally.flush()  # (nothing left: nothing added twice)
    assert _without_times(tallied) == _without_times(one_by_one)
    text = generate_latest(tallied).decode()
    assert value(text, "t_request_duration_seconds_count", method="GET", endpoint=ENDPOINT) == 4
    assert value(text, "t_requests_total", method="GET", endpoint=ENDPOINT, status="200") == 5


async def test_requests_reach_the_metrics_within_the_flush_time() -> None:
    registry, counter, histogram = _metrics()
    tally = RequestTally(counter, histogram, _DURATION_BUCKETS)
    tally.FLUSH_SECONDS = 0.02
    tally.record("POST", ENDPOINT, 201, 0.004)
    text = generate_latest(registry).decode()
    assert value(text, "t_requests_total", method="POST", endpoint=ENDPOINT, status="201") == 0
    for _ in range(200):  # (the loop's timer hands it over: at most a few turns of 5 ms)
        await asyncio.sleep(0.005)
        text = generate_latest(registry).decode()
        if value(text, "t_requests_total", method="POST", endpoint=ENDPOINT, status="201"):
            break
    assert value(text, "t_requests_total", method="POST", endpoint=ENDPOINT, status="201") == 1
    count = value(text, "t_request_duration_seconds_count", method="POST", endpoint=ENDPOINT)
    assert count == 1
