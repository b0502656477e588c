"""Benchmark 1: one service process beside a bare FastAPI endpoint, same uvicorn settings.

What it measures: requests per second, p50 and p99 latency of
- `POST /conversations/{id}/messages` (200 characters, `respond: false`, bearer token), and
- `GET /conversations/{id}/messages?limit=50` (a conversation of 60 messages),
for the service (`python run.py`, 1 worker, uvloop + httptools, rate limits off) and for
`bench/bare_app.py` (the same routes validating the same body / returning the same bytes with
nothing else), and the ratio of their throughputs. The bare app bounds what any FastAPI service
could do on this machine, so the ratio is the share of it the service keeps after auth, its
middleware, the store and the Redis round trip.

Why this way: the machine is small (2 cores) and shared, so load varies between seconds. The two
servers are measured in several short alternating rounds (ours then bare, then bare then ours, …)
and medians across rounds are reported, so that a slow moment hits both sides alike. wrk (see
`bench/wrk.py`) is the load generator, with one thread and 32 connections.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.wrk import WrkRequest, WrkResult, run_wrk

ROUNDS = 5
ROUND_SECONDS = 3
WARMUP_SECONDS = 1
CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class Target:
    """One side of a comparison: a server port and the request wrk sends to it."""

    port: int
    request: WrkRequest


@dataclass
class Comparison:
    name: str
    goal: float  # minimum ratio ours/bare of throughput
    ours: list[WrkResult] = field(default_factory=list)
    bare: list[WrkResult] = field(default_factory=list)

    @staticmethod
    def _median(results: list[WrkResult], value: Callable[[WrkResult], float]) -> float:
        return statistics.median(value(r) for r in results)

    def summary(self, results: list[WrkResult]) -> dict[str, float]:
        return {
            "rps": self._median(results, lambda r: r.rps),
            "p50_ms": self._median(results, lambda r: r.p50_ms),
            "p99_ms": self._median(results, lambda r: r.p99_ms),
            "errors": float(sum(r.errors for r in results)),
        }

    @property
    def ratio(self) -> float:
        """Median throughput of ours over median throughput of bare."""
        return self.summary(self.ours)["rps"] / self.summary(self.bare)["rps"]

    @property
    def round_ratios(self) -> list[float]:
        """Per round, ours over bare measured back to back: the spread shows the noise."""
        return [o.rps / b.rps for o, b in zip(self.ours, self.bare, strict=True)]

    def to_json(self) -> dict[str, object]:
        return {
            "ours": self.summary(self.ours),
            "bare": self.summary(self.bare),
            "ratio": self.ratio,
            "goal_min_ratio": self.goal,
            "round_ratios": self.round_ratios,
            "rounds": {
                side: [
                    {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors}
                    for r in results
                ]
                for side, results in (("ours", self.ours), ("bare", self.bare))
            },
        }


def compare(
    wrk: str,
    cases: list[tuple[Comparison, Target, Target]],
    *,
    rounds: int = ROUNDS,
    seconds: int = ROUND_SECONDS,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Fill each case's Comparison: a warm-up run of every target, then `rounds` rounds that
    alternate which side goes first. `check` runs between runs (e.g. are the servers alive)."""

    def once(target: Target, duration: int) -> WrkResult:
        result = run_wrk(
            wrk, target.port, target.request, seconds=duration, connections=CONNECTIONS
        )
        check()
        return result

    for _, ours, bare in cases:
        once(ours, WARMUP_SECONDS)
        once(bare, WARMUP_SECONDS)
    for index in range(rounds):
        for comparison, ours, bare in cases:
            order = [("ours", ours), ("bare", bare)]
            if index % 2:
                order.reverse()
            for side, target in order:
                result = once(target, seconds)
                (comparison.ours if side == "ours" else comparison.bare).append(result)
            o, b = comparison.ours[-1], comparison.bare[-1]
            print(
                f"  round {index + 1}/{rounds} {comparison.name:<14} "
                f"ours {o.rps:>8,.0f} req/s p50 {o.p50_ms:5.2f} ms | "
                f"bare {b.rps:>8,.0f} req/s p50 {b.p50_ms:5.2f} ms | {o.rps / b.rps:.2f}x",
                flush=True,
            )
