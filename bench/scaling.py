"""Benchmark 2: do appending and paging cost the same at 100,000 messages as at 10?

What it measures: the p50 latency over HTTP of
- appending a message (`POST …/messages`, 200 characters),
- reading the first page (`GET …/messages?limit=10`),
- reading a page in the middle (`GET …/messages?after=<id>&limit=5`),
in a conversation of 100,000 messages and in conversations of 10, and the ratio 100k/10. The
pages are sized so that both conversations return the same number of messages (a conversation
of 10 has no full page of 50, and 50 items against 10 would measure JSON size, not the store).
It also reads, in the big conversation only, a page of 50 at the start and one in the middle,
to show that a deep page costs what the first one does.

Why this way: the service's Redis layout promises O(log N) appends and O(log N + page) reads;
a difference of a few percent is what to look for, which needs many samples of single requests
rather than throughput under load. One keep-alive connection sends the requests one at a time
(`bench/client.py`: almost no client time in the figure), alternating between the big and a small
conversation request by request, so that noise on this shared machine hits both sides alike.
Appends in the small case rotate over a pool of conversations of 10 messages so that none of
them grows past 20.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass

from bench.client import RawClient, encode_request

SAMPLES = 2_000
WARMUP = 200
BIG = 100_000
SMALL = 10
SMALL_POOL = (SAMPLES + WARMUP) // SMALL  # each gets SMALL appends: 10 -> 20
GOAL_MAX_RATIO = 1.1


@dataclass
class Pair:
    """Latencies of one operation at 100k messages and at 10 (or at two places, for `name`)."""

    name: str
    big_label: str
    small_label: str
    big_ms: list[float]
    small_ms: list[float]
    goal: float | None = GOAL_MAX_RATIO

    @property
    def big_p50(self) -> float:
        return statistics.median(self.big_ms)

    @property
    def small_p50(self) -> float:
        return statistics.median(self.small_ms)

    @property
    def ratio(self) -> float:
        return self.big_p50 / self.small_p50

    def to_json(self) -> dict[str, object]:
        def stats(values: list[float]) -> dict[str, float]:
            ordered = sorted(values)
            return {
                "p50_ms": statistics.median(ordered),
                "p90_ms": ordered[int(0.90 * (len(ordered) - 1))],
                "p99_ms": ordered[int(0.99 * (len(ordered) - 1))],
                "mean_ms": statistics.fmean(ordered),
                "samples": len(ordered),
            }

        return {
            self.big_label: stats(self.big_ms),
            self.small_label: stats(self.small_ms),
            "ratio_p50": self.ratio,
            "goal_max_ratio": self.goal,
        }


def interleave(
    client: RawClient,
    big: list[bytes],
    small: list[bytes],
    *,
    expected: int,
    samples: int = SAMPLES,
) -> tuple[list[float], list[float]]:
    """Send big[i % len] and small[i % len] alternately (which goes first alternates too);
    return their latencies in ms. A warm-up of WARMUP pairs is discarded."""
    big_ms: list[float] = []
    small_ms: list[float] = []
    gc.collect()
    gc.disable()  # no collection pause of the client inside a sample
    try:
        for i in range(-WARMUP, samples):
            a = big[i % len(big)]
            b = small[i % len(small)]
            if i % 2:
                tb = client.timed(b, expected)
                ta = client.timed(a, expected)
            else:
                ta = client.timed(a, expected)
                tb = client.timed(b, expected)
            if i >= 0:
                big_ms.append(ta)
                small_ms.append(tb)
    finally:
        gc.enable()
    return big_ms, small_ms


@dataclass(frozen=True, slots=True)
class Setup:
    """The conversations of this benchmark, filled by the caller."""

    big_id: str
    big_ids: list[str]  # message ids of the big conversation in order
    small: list[tuple[str, list[str]]]  # (conversation id, its message ids) x SMALL_POOL


def measure(client: RawClient, token: str, setup: Setup, post_body: bytes) -> dict[str, Pair]:
    """Every comparison, keyed by name (the JSON keys), appends first. The reads run before the
    appends so that the small conversations hold exactly 10 messages while they are read."""
    port = client.port

    def get(path: str) -> bytes:
        return encode_request("GET", path, port=port, token=token)

    def post(path: str) -> bytes:
        return encode_request("POST", path, port=port, token=token, body=post_body)

    def messages(cid: str) -> str:
        return f"/conversations/{cid}/messages"

    big_path = messages(setup.big_id)
    middle_id = setup.big_ids[len(setup.big_ids) // 2]
    small_paths = [messages(cid) for cid, _ in setup.small]
    small_middle = [ids[SMALL // 2 - 1] for _, ids in setup.small]  # the 5th of 10

    print("  GET first page (limit=10)", flush=True)
    big, small = interleave(
        client,
        [get(f"{big_path}?limit=10")],
        [get(f"{p}?limit=10") for p in small_paths],
        expected=200,
    )
    first = Pair("GET first page (10)", "at_100k", "at_10", big, small)

    print("  GET middle page (after=<id>, limit=5)", flush=True)
    big, small = interleave(
        client,
        [get(f"{big_path}?after={middle_id}&limit=5")],
        [get(f"{p}?after={m}&limit=5") for p, m in zip(small_paths, small_middle, strict=True)],
        expected=200,
    )
    middle = Pair("GET middle page (5)", "at_100k", "at_10", big, small)

    print("  GET page of 50 at 100k: middle vs first", flush=True)
    deep, start = interleave(
        client,
        [get(f"{big_path}?after={middle_id}&limit=50")],
        [get(f"{big_path}?limit=50")],
        expected=200,
    )
    page_50 = Pair("100k: middle/first page (50)", "middle", "first", deep, start)

    print("  POST message", flush=True)
    big, small = interleave(client, [post(big_path)], [post(p) for p in small_paths], expected=201)
    append = Pair("POST message", "at_100k", "at_10", big, small)
    return {
        "post_message": append,
        "get_first_page_10": first,
        "get_middle_page_5": middle,
        "at_100k_page_50_middle_vs_first": page_50,
    }
