"""Benchmark 1: one service process beside a bare FastAPI endpoint, same uvicorn settings.

What it measures: requests per second, p50 and p99 latency of
- `POST /conversations/{id}/messages` (200 characters, `respond: false`, bearer token), and
- `GET /conversations/{id}/messages?limit=50` (a conversation of 60 messages),
for the service (`python run.py`, 1 worker, uvloop + httptools, rate limits off) and for
`bench/bare_app.py` (the same routes validating the same body / returning the same bytes with
nothing else), and the ratio of their throughputs. The bare app bounds what any FastAPI service
could do on this machine, so the ratio is the share of it the service keeps after auth, its
middleware, the store and the Redis round trip.

Beside throughput, the CPU time each server process spent per request (/proc/<pid>/stat over the
run; Redis's own beside ours): the server is CPU-bound, so bare's CPU per request over ours is
what the throughput ratio would be on an idle machine of the same speed. It moves less with
what else the machine runs (ours shares the two cores with Redis and wrk; bare only with wrk).

Why this way: the machine is small (2 cores) and shared, so load varies between seconds. The two
servers are measured in several short alternating rounds (ours then bare, then bare then ours, …)
and medians across rounds are reported, so that a slow moment hits both sides alike. wrk (see
`bench/wrk.py`) is the load generator, with one thread and 32 connections.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.fanout import cpu_seconds
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
    pid: int | None = None  # the server process, whose CPU time per request is measured
    redis_pid: int | None = None  # the Redis server it uses (its CPU per request beside)


@dataclass
class Comparison:
    name: str
    goal: float  # minimum ratio ours/bare of throughput
    ours: list[WrkResult] = field(default_factory=list)
    bare: list[WrkResult] = field(default_factory=list)
    # CPU microseconds per request, per round: the server process, and Redis (ours only).
    ours_cpu: list[float] = field(default_factory=list)
    bare_cpu: list[float] = field(default_factory=list)
    ours_redis_cpu: list[float] = field(default_factory=list)

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
    def cpu_us(self) -> dict[str, float | None]:
        """Median CPU microseconds per request: ours, Redis under ours, bare."""
        return {
            "ours": _median_or_none(self.ours_cpu),
            "ours_redis": _median_or_none(self.ours_redis_cpu),
            "bare": _median_or_none(self.bare_cpu),
        }

    @property
    def cpu_ratio(self) -> float | None:
        """Median CPU per request of bare over ours (1.0: ours costs what bare does)."""
        if not self.ours_cpu or not self.bare_cpu:
            return None
        return statistics.median(self.bare_cpu) / statistics.median(self.ours_cpu)

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
            "cpu_us_per_request": self.cpu_us,
            "cpu_ratio": self.cpu_ratio,
            "rounds": {
                side: [
                    {"rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "errors": r.errors}
                    for r in results
                ]
                for side, results in (("ours", self.ours), ("bare", self.bare))
            },
        }


def _median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def _cpu(pid: int | None) -> float:
    return cpu_seconds(pid) if pid is not None else 0.0


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

    def once(target: Target, duration: int) -> tuple[WrkResult, float | None, float | None]:
        """A run, and the CPU microseconds per request of its server and of Redis."""
        before = _cpu(target.pid), _cpu(target.redis_pid)
        result = run_wrk(
            wrk, target.port, target.request, seconds=duration, connections=CONNECTIONS
        )
        spent = _cpu(target.pid) - before[0], _cpu(target.redis_pid) - before[1]
        check()
        per = 1e6 / max(result.requests, 1)
        return (
            result,
            spent[0] * per if target.pid is not None else None,
            spent[1] * per if target.redis_pid is not None else None,
        )

    for _, ours, bare in cases:
        once(ours, WARMUP_SECONDS)
        once(bare, WARMUP_SECONDS)
    for index in range(rounds):
        for comparison, ours, bare in cases:
            order = [("ours", ours), ("bare", bare)]
            if index % 2:
                order.reverse()
            for side, target in order:
                result, cpu, redis_cpu = once(target, seconds)
                if side == "ours":
                    comparison.ours.append(result)
                    if cpu is not None:
                        comparison.ours_cpu.append(cpu)
                    if redis_cpu is not None:
                        comparison.ours_redis_cpu.append(redis_cpu)
                else:
                    comparison.bare.append(result)
                    if cpu is not None:
                        comparison.bare_cpu.append(cpu)
            o, b = comparison.ours[-1], comparison.bare[-1]
            print(
                f"  round {index + 1}/{rounds} {comparison.name:<14} "
                f"ours {o.rps:>8,.0f} req/s p50 {o.p50_ms:5.2f} ms | "
                f"bare {b.rps:>8,.0f} req/s p50 {b.p50_ms:5.2f} ms | {o.rps / b.rps:.2f}x",
                flush=True,
            )
