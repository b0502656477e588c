"""Benchmark: the relay, tokens from the model to the clients, at the loads of issue 12.

Set-up: the processes of the AI-reply benchmarks (a fresh Redis, the API with
WORKER_IN_API=false, `WORKERS` reply worker processes) and bench/fake_model.py, a model that
keeps up with 250,000 tokens a second (testkit/fake_llm.py could not). For each load
(`streams` x `tokens`, `token_delay_ms` apart after `first_delay_ms`): as many fresh
conversations, one SSE client each (bench/sse.py), one message posted per conversation
(POSTERS keep-alive connections), and the run waits until every client has its reply's end.

Reported per load:
- tokens/s: tokens received by clients whose reply came complete and exact (deltas
  concatenated == the model's text == the completed message's content), over the time from the
  first POST to the last completion;
- CPU µs per token: the CPU time of the API, the workers and Redis during the run (from
  /proc/<pid>/stat) over those tokens; the fake model's and the clients' own beside it;
- reply time vs the model's own, per reply: (POST sent → `message.completed` at the client) over
  (request read by the model → its last chunk written): p50 and p99;
- first delta, per reply: POST sent → first `message.delta` at the client (p50, p99), and its
  overhead: from the model writing its first chunk to the client having it (wall clocks of one
  machine), split at the first delta's XADD in Redis (its event id: the worker's share, then
  the API's and the client's); the wait before the model was asked (POST sent → request read
  by the model: the queue, admission, the prompt) beside it;
- events per token: `message.delta` events received over tokens (1.0 = one event a token);
- how far the model fell behind its own schedule (its time over the nominal one), so that a
  reader sees when the fake and not the service was the limit;
- Redis commands per token (commandstats), where the round trips went.

`BENCH_RELAY_TRACE=<file>` appends the first delta of each reply that came complete and exact
to that file as a JSON line: the run (the wall-clock time of its first POST) and load, the
model's first chunk (seconds after the first POST), the overhead and its split at the XADD;
what the percentiles hide, e.g. whether the slowest first deltas came together, and when.
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from testkit.fake_llm import reply_text

from bench.client import RawClient
from bench.fanout import (
    AsyncHttp,
    Client,
    FanoutResult,
    connect_clients,
    cpu_seconds,
    post_all,
    redis_command_stats,
)
from bench.fixtures import create_conversation
from bench.sse import COMPLETED
from bench.ttft import percentile
from redis import Redis as SyncRedis

FIRST_DELAY_MS = 20.0
WORKERS = 2
TIMEOUT = 300.0
# Each load runs this many times (the loads in turn, round after round): on this shared machine
# one run's figures move by a third from one minute to the next, and a median of runs by less.
ROUNDS = 3


@dataclass(frozen=True)
class Load:
    streams: int
    tokens: int
    token_delay_ms: float
    first_delay_ms: float = FIRST_DELAY_MS

    @property
    def name(self) -> str:
        return f"{self.streams} × {self.tokens} × {self.token_delay_ms:g} ms"

    @property
    def nominal_ms(self) -> float:
        """The model's own reply time on schedule: its last token's time."""
        return self.first_delay_ms + (self.tokens - 1) * self.token_delay_ms


LOADS = (Load(200, 200, 5.0), Load(500, 200, 2.0), Load(1000, 100, 10.0))


def selected_loads(spec: str | None) -> tuple[Load, ...]:
    """The loads to run: all of LOADS, or those BENCH_RELAY_LOADS names (`500x200x2,...`:
    streams x tokens x ms between tokens), e.g. to profile one of them."""
    if not spec:
        return LOADS
    loads = []
    for item in spec.split(","):
        try:
            streams, tokens, delay = item.strip().split("x")
            loads.append(Load(int(streams), int(tokens), float(delay)))
        except ValueError:
            raise SystemExit(
                f"BENCH_RELAY_LOADS: {item!r} is not streams x tokens x ms (e.g. 500x200x2)"
            ) from None
    return tuple(loads)


def selected_rounds(spec: str | None) -> int:
    """ROUNDS, or the number BENCH_RELAY_ROUNDS names (1 to profile a load, say)."""
    if not spec:
        return ROUNDS
    if not spec.isdigit() or int(spec) < 1:
        raise SystemExit(f"BENCH_RELAY_ROUNDS: {spec!r} is not a number of rounds (e.g. 3)")
    return int(spec)


@dataclass
class RelayResult:
    load: Load
    completed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    reply_ratio: list[float] = field(default_factory=list)
    first_delta_ms: list[float] = field(default_factory=list)
    first_delta_overhead_ms: list[float] = field(default_factory=list)
    # The overhead split at the first delta's XADD (its stream entry id, ms; +-1 ms): the
    # worker's share (model's first chunk written -> XADD) and the API's (XADD -> client).
    model_to_xadd_ms: list[float] = field(default_factory=list)
    xadd_to_client_ms: list[float] = field(default_factory=list)
    model_asked_ms: list[float] = field(default_factory=list)  # POST sent -> the model's request
    model_lag: list[float] = field(default_factory=list)  # the model's time over its nominal
    delta_events: int = 0
    failures: list[str] = field(default_factory=list)
    redis_commands: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def cpu_us_per_token(self, names: tuple[str, ...] = ("api", "workers", "redis")) -> float:
        if not self.tokens:
            return float("nan")
        total = sum(v for k, v in self.cpu_seconds.items() if k in names)
        return total / self.tokens * 1e6

    @property
    def events_per_token(self) -> float:
        return self.delta_events / self.tokens if self.tokens else float("nan")

    def to_json(self) -> dict[str, Any]:
        def dist(values: list[float], digits: int = 2) -> dict[str, float] | None:
            if not values:
                return None
            return {
                "p50": round(statistics.median(values), digits),
                "p99": round(percentile(values, 0.99), digits),
                "max": round(max(values), digits),
            }

        calls = {
            name: round(stat["calls"] / self.tokens, 3)
            for name, stat in self.redis_commands.items()
            if self.tokens
        }
        return {
            "load": {
                "streams": self.load.streams,
                "tokens": self.load.tokens,
                "token_delay_ms": self.load.token_delay_ms,
                "first_delay_ms": self.load.first_delay_ms,
                "offered_tokens_per_second": round(
                    self.load.streams * 1000 / self.load.token_delay_ms
                ),
            },
            "completed": self.completed,
            "failures_first_10": self.failures[:10],
            "failures": len(self.failures),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens_per_second),
            "cpu_us_per_token": round(self.cpu_us_per_token(), 1),
            "cpu_us_per_token_each": {
                name: round(seconds / self.tokens * 1e6, 1) if self.tokens else None
                for name, seconds in self.cpu_seconds.items()
            },
            "cpu_seconds": self.cpu_seconds,
            "reply_time_over_model": dist(self.reply_ratio),
            "first_delta_ms": dist(self.first_delta_ms, 1),
            "first_delta_overhead_ms": dist(self.first_delta_overhead_ms, 1),
            "first_delta_model_to_xadd_ms": dist(self.model_to_xadd_ms, 1),
            "first_delta_xadd_to_client_ms": dist(self.xadd_to_client_ms, 1),
            "post_to_model_request_ms": dist(self.model_asked_ms, 1),
            "model_time_over_nominal": dist(self.model_lag),
            "events_per_token": round(self.events_per_token, 3),
            "redis_calls_per_token": calls,
        }


@dataclass(frozen=True)
class RelaySummary:
    """The runs of one load (rounds): each figure is the median of the runs' (a percentile's
    median across runs, not a percentile of all their replies), with the runs' range beside
    the goals' figures."""

    load: Load
    runs: tuple[RelayResult, ...]

    @functools.cached_property
    def _jsons(self) -> list[dict[str, Any]]:
        """Each run's RelayResult.to_json, made once (its percentiles sort every reply's)."""
        return [r.to_json() for r in self.runs]

    def _values(self, name: str, pick: str | None) -> list[float]:
        """A figure of RelayResult.to_json in each run that has it (`pick`: p50 or p99 of a
        distribution)."""
        values = (_pick(j[name], pick) for j in self._jsons)
        return [v for v in values if v is not None and v == v]  # (v != v: NaN)

    def figure(self, name: str, pick: str | None = None) -> float:
        """The median over runs of a figure of RelayResult.to_json."""
        values = self._values(name, pick)
        return statistics.median(values) if values else float("nan")

    def spread(self, name: str, pick: str | None = None) -> tuple[float, float]:
        values = self._values(name, pick)
        return (min(values), max(values)) if values else (float("nan"), float("nan"))

    @property
    def complete(self) -> bool:
        return all(r.completed == r.load.streams for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        medians: dict[str, Any] = {
            "tokens_per_second": round(self.figure("tokens_per_second")),
            "cpu_us_per_token": round(self.figure("cpu_us_per_token"), 1),
            "events_per_token": round(self.figure("events_per_token"), 3),
        }
        for name in (
            "reply_time_over_model",
            "first_delta_ms",
            "first_delta_overhead_ms",
            "first_delta_model_to_xadd_ms",
            "first_delta_xadd_to_client_ms",
            "post_to_model_request_ms",
            "model_time_over_nominal",
        ):
            medians[name] = {q: round(self.figure(name, q), 2) for q in ("p50", "p99")}
        return {
            "load": self._jsons[0]["load"],
            "rounds": len(self.runs),
            "all_complete": self.complete,
            "medians_of_rounds": medians,
            "runs": self._jsons,
        }


def _pick(value: Any, pick: str | None) -> float | None:
    if pick is None:
        return float(value) if value is not None else None
    return None if value is None else float(value[pick])


def summaries(results: list[RelayResult]) -> list[RelaySummary]:
    """The runs grouped by load, in the order the loads first ran."""
    by_load: dict[Load, list[RelayResult]] = {}
    for result in results:
        by_load.setdefault(result.load, []).append(result)
    return [RelaySummary(load, tuple(runs)) for load, runs in by_load.items()]


async def _run(
    port: int,
    token: str,
    llm_port: int,
    load: Load,
    conversations: list[str],
    pids: dict[str, int],
    redis: SyncRedis,
) -> RelayResult:
    result = RelayResult(load)
    clients = [Client(cid) for cid in conversations]
    connecting = FanoutResult(clients=len(clients))
    await connect_clients(port, token, clients, connecting)
    result.failures.extend(connecting.failures)
    ready = [c for c in clients if c.protocol is not None and c.protocol.connected.done()]

    measured = {**pids, "bench_clients": os.getpid()}
    cpu_before = {name: cpu_seconds(pid) for name, pid in measured.items()}
    redis.config_resetstat()
    started = time.monotonic()
    await post_all(port, token, ready)
    waits = [c.protocol.ended for c in ready if c.protocol is not None]
    if waits:
        await asyncio.wait(waits, timeout=TIMEOUT)
    cpu_after = {name: cpu_seconds(pid) for name, pid in measured.items()}
    result.redis_commands = redis_command_stats(redis, top=10)
    spent = {name: cpu_after[name] - cpu_before[name] for name in measured}
    result.cpu_seconds = {
        "api": round(spent.get("api", 0.0), 2),
        "workers": round(sum(v for k, v in spent.items() if k.startswith("worker")), 2),
        "redis": round(spent.get("redis", 0.0), 2),
        "fake_model": round(spent.get("fake_model", 0.0), 2),
        "bench_clients": round(spent.get("bench_clients", 0.0), 2),
    }

    http = await AsyncHttp.open(llm_port)
    try:
        model_times = await http.call("GET", "/fake/streams", "")
    finally:
        http.close()
    assert isinstance(model_times, dict)

    expected = reply_text(load.tokens)
    wall = time.time() - time.monotonic()  # this process's monotonic times as wall-clock ones
    ends: list[float] = []
    firsts: list[dict[str, Any]] = []  # each reply's first delta (BENCH_RELAY_TRACE)
    for client in ready:
        protocol = client.protocol
        assert protocol is not None
        cid = client.conversation_id
        if protocol.ended.done() and protocol.ended.exception() is not None:
            result.failures.append(f"stream lost: {cid}: {protocol.ended.exception()!r}")
            continue
        trace = protocol.replies.get(client.reply_id or "")
        if trace is None or trace.final_type is None:
            result.failures.append(f"no end in {TIMEOUT:g} s: {cid}")
            continue
        text = "".join(trace.deltas)
        content = (trace.final_message or {}).get("content")
        if trace.final_type != COMPLETED or text != expected or content != expected:
            result.failures.append(f"{trace.final_type}: {cid}: deltas {text[:80]!r}…")
            continue
        result.completed += 1
        result.tokens += load.tokens
        result.delta_events += trace.delta_events
        assert client.posted_at is not None
        assert trace.done_at is not None
        ends.append(trace.done_at)
        ours = trace.done_at - client.posted_at
        model = model_times.get(f"fan{cid}")
        if model is None or not model[2]:
            result.failures.append(f"the model has no times for {cid}")
            continue
        received, first, last = model
        result.reply_ratio.append(ours / (last - received))
        result.model_lag.append((last - received) * 1000 / load.nominal_ms)
        result.model_asked_ms.append((received - (client.posted_at + wall)) * 1000)
        if protocol.first_delta_at is not None:
            result.first_delta_ms.append((protocol.first_delta_at - client.posted_at) * 1000)
            overhead = (protocol.first_delta_at + wall - first) * 1000
            result.first_delta_overhead_ms.append(overhead)
            if protocol.first_delta_id:  # where the overhead went, split at Redis's XADD
                xadd = int(protocol.first_delta_id.split("-")[0]) / 1000
                result.model_to_xadd_ms.append((xadd - first) * 1000)
                result.xadd_to_client_ms.append((protocol.first_delta_at + wall - xadd) * 1000)
                firsts.append(
                    {
                        "run": round(started + wall, 3),
                        "load": load.name,
                        "model_first_chunk_s": round(first - (started + wall), 4),
                        "overhead_ms": round(overhead, 2),
                        "model_to_xadd_ms": round(result.model_to_xadd_ms[-1], 2),
                        "xadd_to_client_ms": round(result.xadd_to_client_ms[-1], 2),
                    }
                )
    result.seconds = (max(ends) if ends else time.monotonic()) - started
    if os.environ.get("BENCH_RELAY_TRACE"):
        with open(os.environ["BENCH_RELAY_TRACE"], "ab") as out:
            out.writelines(orjson.dumps(row) + b"\n" for row in firsts)

    for client in clients:
        if client.protocol is not None:
            client.protocol.close()
    return result


def measure(
    port: int,
    token: str,
    llm_port: int,
    redis_url: str,
    pids: dict[str, int],
    load: Load,
) -> RelayResult:
    """One load on fresh conversations of the token's user. `pids`: "api", "worker-…",
    "redis" and "fake_model"."""
    with RawClient(llm_port) as llm:
        config = {
            "first_delay_ms": load.first_delay_ms,
            "tokens": load.tokens,
            "token_delay_ms": load.token_delay_ms,
        }
        llm.call("PUT", "/fake/config", json=config)
        llm.call("DELETE", "/fake/streams")
    with RawClient(port) as client:
        conversations = [
            create_conversation(client, token, f"relay {i}") for i in range(load.streams)
        ]
    with SyncRedis.from_url(redis_url, decode_responses=True) as redis:
        return uvloop.run(_run(port, token, llm_port, load, conversations, pids, redis))
