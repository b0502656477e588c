"""Benchmark 5: 10,000 SSE clients on one API process, each receiving its complete reply.

Set-up: the processes of the time-to-first-token benchmark (Redis, the API with
WORKER_IN_API=false, the fake OpenAI-compatible server) with WORKERS reply worker processes
(`python run.py worker`, WORKER_CONCURRENCY each). The fake model answers TOKENS tokens
TOKEN_DELAY_MS apart after FIRST_DELAY_MS.

What it measures: CLIENTS conversations, each with one SSE client (`GET …/events`) opened by
this process (asyncio, raw sockets: bench/sse.py). Once every client has its stream's first
comment, one message is posted per conversation (respond=true, POSTERS keep-alive connections
posting concurrently), and the run waits until every client has seen `message.completed` for its
reply. A client follows its reply as any client must: `message.updated` replaces the text so far
(a new attempt of a reply resets it, counted as a restart), deltas append to it. A client counts
as complete when that text equals both the completed event's content and the text the fake model
sent; the stored messages of a sample of VERIFY_SAMPLE replies are fetched at the end and
compared too.

Reported: clients complete (goal: all), total time (first POST to last completion), the latency
of each reply from its POST to its first delta and to its completion, and the resident memory
(VmRSS of /proc/<pid>/status) of the API process before the clients connect, once they are
connected, at its peak during the replies (sampled every RSS_INTERVAL s; VmHWM, the kernel's own
high-water mark since the process started, beside it), after the clients have gone and around a
second round of as many connections (does the first round's memory get reused?); and of each
worker process. CPU seconds of every process and Redis' command statistics during the replies
show where the time went; jobs left unacknowledged once every reply has ended show workers that
stopped a job they had finished.

`while_connected` (the caller's) runs after the replies while the clients are still connected
and idle: the time-to-first-token benchmark again, to show what idle subscribers cost.

The soft limit of open files of this process is raised (resource.setrlimit) to fit the clients,
and the server processes' limits are checked (/proc/<pid>/limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop
from redis.exceptions import ResponseError as RedisResponseError
from testkit.fake_llm import reply_text, tag_message

from bench.client import RawClient, encode_request
from bench.fixtures import KEYS
from bench.sse import COMPLETED, SseProtocol, events_request
from bench.ttft import configure_llm, percentile
from conversational_core.settings import Settings
from conversational_core.storage.redis import queue
from redis import Redis as SyncRedis

CLIENTS = 10_000
WORKERS = 2
WORKER_CONCURRENCY = Settings.model_fields["WORKER_CONCURRENCY"].default  # the default
FIRST_DELAY_MS = 20.0
TOKENS = 20
TOKEN_DELAY_MS = 5.0
POSTERS = 16
CONNECT_CONCURRENCY = 100
VERIFY_SAMPLE = 100
RSS_INTERVAL = 0.02
JOBS_SETTLE = 2.0  # seconds after the last reply before counting unacknowledged jobs
CONNECTIONS_EVERY = 10  # samples: connections to Redis every 0.2 s (reading them costs more)
TIMEOUT = 120.0
FD_MARGIN = 200  # descriptors beyond one per client: Redis pool, listeners, files
# The service's default size of the Redis connection pool of a process (REDIS_MAX_CONNECTIONS),
# which the benchmark leaves as it is: the connections each process reaches are shown beside it.
REDIS_POOL_DEFAULT = Settings.model_fields["REDIS_MAX_CONNECTIONS"].default
# The workers' job stream and consumer group, in the service's key space (bench/fixtures.py).
JOBS_KEY = KEYS.jobs
JOBS_GROUP = queue.GROUP


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def open_fds(pid: int) -> int:
    """How many file descriptors a process has open (sockets included)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_files_limit(pid: int) -> int | None:
    """The soft limit of open files of a process (/proc/<pid>/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            value = line.split()[3]
            return None if value == "unlimited" else int(value)
    return None


def raise_open_files(needed: int) -> int:
    """Raise this process's soft limit of open files to at least `needed` (up to the hard
    limit); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def redis_command_stats(redis: SyncRedis, top: int = 8) -> dict[str, dict[str, float]]:
    """The commands Redis spent most CPU on since the last CONFIG RESETSTAT (INFO
    commandstats): calls, total and per-call microseconds."""
    stats: dict[str, Any] = redis.info("commandstats")
    rows = {
        name.removeprefix("cmdstat_"): {
            "calls": float(v["calls"]),
            "usec": float(v["usec"]),
            "usec_per_call": float(v["usec_per_call"]),
        }
        for name, v in stats.items()
    }
    ordered = sorted(rows.items(), key=lambda kv: kv[1]["usec"], reverse=True)
    return dict(ordered[:top])


def unacknowledged_jobs(redis: SyncRedis) -> int:
    """Jobs of the reply workers delivered but not acknowledged (XPENDING of their group):
    some time after every reply has ended, a job still there was left by a worker that stopped
    it (it is taken over and acknowledged once a lease time has passed)."""
    try:
        summary: Any = redis.xpending(JOBS_KEY, JOBS_GROUP)
    except RedisResponseError:  # no stream or no group yet
        return 0
    return int(summary["pending"])


def redis_connections(pids: dict[str, int], redis_port: int) -> dict[str, int]:
    """How many established TCP connections to 127.0.0.1:`redis_port` each process has: its
    sockets (/proc/<pid>/fd) matched with /proc/net/tcp."""
    to_redis = set()
    port_hex = f":{redis_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2].endswith(port_hex) and fields[3] == "01":  # remote port, ESTABLISHED
            to_redis.add(fields[9])  # inode
    counts = {}
    for name, pid in pids.items():
        count = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in to_redis:
                        count += 1
        counts[name] = count
    return counts


class RssSampler:
    """Samples VmRSS of some processes every RSS_INTERVAL seconds in a thread and keeps the
    peak; every CONNECTIONS_EVERY samples, their connections to Redis too (peak)."""

    def __init__(self, pids: dict[str, int], redis_port: int) -> None:
        self.pids = pids
        self.redis_port = redis_port
        self.peak_kb = dict.fromkeys(pids, 0)
        self.peak_connections = dict.fromkeys(pids, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError, KeyError):
                    rss = read_status(pid)["VmRSS"]
                    self.peak_kb[name] = max(self.peak_kb[name], rss)
            if self.samples % CONNECTIONS_EVERY == 0:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    for name, n in redis_connections(self.pids, self.redis_port).items():
                        self.peak_connections[name] = max(self.peak_connections[name], n)
            self.samples += 1
            self._stop.wait(RSS_INTERVAL)

    @contextlib.contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


class AsyncHttp:
    """One keep-alive connection for the concurrent POSTs (Content-Length responses only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int):
        self._reader = reader
        self._writer = writer
        self.port = port

    @classmethod
    async def open(cls, port: int) -> AsyncHttp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, port)

    async def call(
        self, method: str, path: str, token: str, json: Any = None, expected: int = 200
    ) -> Any:
        body = None if json is None else orjson.dumps(json)
        self._writer.write(encode_request(method, path, port=self.port, token=token, body=body))
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        reply = await self._reader.readexactly(length)
        if status != expected:
            raise RuntimeError(
                f"{method} {path}: expected {expected}, got {status}: {reply[:300]!r}"
            )
        return orjson.loads(reply) if reply else None

    def close(self) -> None:
        self._writer.close()


@dataclass
class Client:
    conversation_id: str
    protocol: SseProtocol | None = None
    reply_id: str | None = None
    posted_at: float | None = None  # time.monotonic()


@dataclass
class FanoutResult:
    clients: int
    connected: int = 0
    completed: int = 0
    failures: list[str] = field(default_factory=list)
    connect_seconds: float = 0.0
    post_seconds: float = 0.0  # first POST sent to last POST answered
    total_seconds: float = 0.0  # first POST sent to last completion seen
    first_delta_ms: list[float] = field(default_factory=list)  # POST sent -> first delta
    complete_ms: list[float] = field(default_factory=list)  # POST sent -> message.completed
    events: int = 0
    verified_stored: int = 0
    restarted: int = 0  # replies whose text was reset by a new attempt before completing
    failure_kinds: dict[str, int] = field(default_factory=dict)
    redis_commands: dict[str, dict[str, float]] = field(default_factory=dict)
    api_fds: dict[str, int] = field(default_factory=dict)
    api_redis_connections: dict[str, int] = field(default_factory=dict)
    jobs_unacknowledged: dict[str, float] = field(default_factory=dict)
    redis_connections_peak: dict[str, int] = field(default_factory=dict)
    while_connected: Any = None  # what the caller ran with the clients connected and idle
    api_rss_kb: dict[str, int] = field(default_factory=dict)
    workers_rss_kb: dict[str, dict[str, int]] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    open_files: dict[str, int | None] = field(default_factory=dict)
    rss_samples: int = 0

    def fail(self, kind: str, detail: str) -> None:
        self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1
        self.failures.append(f"{kind}: {detail}")

    def to_json(self) -> dict[str, Any]:
        def ms(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            return {
                "p50_ms": statistics.median(values),
                "p99_ms": percentile(values, 0.99),
                "max_ms": max(values),
            }

        return {
            "settings": {
                "clients": self.clients,
                "worker_processes": WORKERS,
                "worker_concurrency": WORKER_CONCURRENCY,
                "provider_first_delay_ms": FIRST_DELAY_MS,
                "tokens": TOKENS,
                "token_delay_ms": TOKEN_DELAY_MS,
                "posters": POSTERS,
                "rss_interval_s": RSS_INTERVAL,
            },
            "connected": self.connected,
            "completed": self.completed,
            "failure_kinds": self.failure_kinds,
            "failures_first_10": self.failures[:10],
            "replies_restarted": self.restarted,
            "connect_seconds": self.connect_seconds,
            "post_seconds": self.post_seconds,
            "total_seconds": self.total_seconds,
            "post_to_first_delta": ms(self.first_delta_ms),
            "post_to_completed": ms(self.complete_ms),
            "sse_events_received": self.events,
            "stored_replies_verified": self.verified_stored,
            "api_rss_kb": self.api_rss_kb,
            "api_open_fds": self.api_fds,
            "api_redis_connections": self.api_redis_connections,
            "jobs_unacknowledged": self.jobs_unacknowledged,
            "redis_connections_peak": self.redis_connections_peak,
            "redis_max_connections_default": REDIS_POOL_DEFAULT,
            "workers_rss_kb": self.workers_rss_kb,
            "cpu_seconds_during_replies": self.cpu_seconds,
            "redis_commands_during_replies": self.redis_commands,
            "open_files_soft_limit": self.open_files,
            "rss_samples": self.rss_samples,
        }


async def connect_clients(
    port: int, token: str, clients: list[Client], result: FanoutResult
) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(client: Client) -> None:
        async with gate:
            request = events_request(port, client.conversation_id, token)
            _, protocol = await loop.create_connection(
                lambda: SseProtocol(request), "127.0.0.1", port
            )
            client.protocol = protocol
            await asyncio.wait_for(protocol.connected, 30)

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(c) for c in clients), return_exceptions=True)
    result.connect_seconds = time.monotonic() - started
    for client, outcome in zip(clients, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            result.fail("connect", f"{client.conversation_id}: {outcome!r}")
        else:
            result.connected += 1


async def post_all(port: int, token: str, clients: list[Client]) -> None:
    queue: asyncio.Queue[Client] = asyncio.Queue()
    for client in clients:
        queue.put_nowait(client)

    async def poster() -> None:
        http = await AsyncHttp.open(port)
        try:
            while not queue.empty():
                client = queue.get_nowait()
                path = f"/conversations/{client.conversation_id}/messages"
                body = {"content": tag_message(f"fan{client.conversation_id}")}
                client.posted_at = time.monotonic()
                created = await http.call("POST", path, token, body, expected=201)
                client.reply_id = created["reply_message_id"]
        finally:
            http.close()

    await asyncio.gather(*(poster() for _ in range(POSTERS)))


async def _run(
    port: int,
    token: str,
    conversations: list[str],
    pids: dict[str, int],
    redis: SyncRedis,
    while_connected: Callable[[], Any] | None,
) -> FanoutResult:
    result = FanoutResult(clients=len(conversations))
    clients = [Client(cid) for cid in conversations]
    api_pid = pids["api"]
    redis_port = int(redis.connection_pool.connection_kwargs["port"])
    result.api_rss_kb["before_clients"] = read_status(api_pid)["VmRSS"]
    result.api_fds["before_clients"] = open_fds(api_pid)
    result.api_redis_connections["before_clients"] = redis_connections(
        {"api": api_pid}, redis_port
    )["api"]

    await connect_clients(port, token, clients, result)
    ready = [c for c in clients if c.protocol is not None and c.protocol.connected.done()]
    result.api_rss_kb["clients_connected"] = read_status(api_pid)["VmRSS"]
    result.api_fds["clients_connected"] = open_fds(api_pid)
    result.api_redis_connections["clients_connected"] = redis_connections(
        {"api": api_pid}, redis_port
    )["api"]
    worker_pids = {name: pid for name, pid in pids.items() if name.startswith("worker")}
    for name, pid in worker_pids.items():
        result.workers_rss_kb[name] = {"before": read_status(pid)["VmRSS"]}

    measured = {**pids, "bench_clients": os.getpid()}  # this process: the clients
    cpu_before = {name: cpu_seconds(pid) for name, pid in measured.items()}
    redis.config_resetstat()
    sampler = RssSampler({"api": api_pid, **worker_pids}, redis_port)
    with sampler.running():
        started = time.monotonic()
        await post_all(port, token, ready)
        result.post_seconds = time.monotonic() - started
        waits = [c.protocol.ended for c in ready if c.protocol is not None]
        if waits:
            await asyncio.wait(waits, timeout=TIMEOUT)
        ends = [
            trace.done_at
            for c in ready
            if c.protocol is not None
            for trace in c.protocol.replies.values()
            if trace.done_at is not None
        ]
        last_end = max(ends) if ends else time.monotonic()
        result.total_seconds = last_end - started
    result.cpu_seconds = {
        name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in measured.items()
    }
    result.redis_commands = redis_command_stats(redis)
    result.rss_samples = sampler.samples
    result.redis_connections_peak = sampler.peak_connections
    status = read_status(api_pid)
    result.api_rss_kb["peak_sampled"] = max(sampler.peak_kb["api"], status["VmRSS"])
    result.api_rss_kb["after_replies"] = status["VmRSS"]
    result.api_rss_kb["vmhwm"] = status["VmHWM"]
    for name, pid in worker_pids.items():
        status = read_status(pid)
        result.workers_rss_kb[name].update(
            peak_sampled=max(sampler.peak_kb[name], status["VmRSS"]),
            after=status["VmRSS"],
            vmhwm=status["VmHWM"],
        )

    expected = reply_text(TOKENS)
    for client in ready:
        protocol = client.protocol
        assert protocol is not None
        result.events += protocol.events
        cid = client.conversation_id
        if protocol.ended.done() and protocol.ended.exception() is not None:
            result.fail("stream lost", f"{cid}: {protocol.ended.exception()!r}")
            continue
        trace = protocol.replies.get(client.reply_id or "")
        if trace is None or trace.final_type is None:
            result.fail("no end within the time limit", f"{cid}: reply {client.reply_id}")
            continue
        result.restarted += 1 if trace.restarts else 0
        text = "".join(trace.deltas)
        content = (trace.final_message or {}).get("content")
        if trace.final_type != COMPLETED:
            result.fail(trace.final_type, f"{cid}: {trace.final_message}")
            continue
        if text != expected or content != expected:
            result.fail("wrong text", f"{cid}: deltas {text!r}, content {content!r}")
            continue
        result.completed += 1
        assert client.posted_at is not None
        assert trace.done_at is not None
        result.complete_ms.append((trace.done_at - client.posted_at) * 1000)
        if protocol.first_delta_at is not None:
            result.first_delta_ms.append((protocol.first_delta_at - client.posted_at) * 1000)

    # The stored replies of a sample, as a client would fetch them afterwards.
    http = await AsyncHttp.open(port)
    try:
        step = max(1, len(ready) // VERIFY_SAMPLE)
        for client in ready[::step][:VERIFY_SAMPLE]:
            if client.reply_id is None:
                continue
            path = f"/conversations/{client.conversation_id}/messages/{client.reply_id}"
            stored = await http.call("GET", path, token)
            if stored["status"] == "completed" and stored["content"] == expected:
                result.verified_stored += 1
            else:
                result.fail(
                    "stored reply differs",
                    f"{client.conversation_id}: {stored['status']} {stored['content']!r}",
                )
    finally:
        http.close()

    # Long enough after the last reply for its worker to have acknowledged its job (a few ms),
    # well within a lease time, so that no worker has taken over a job left behind.
    await asyncio.sleep(max(0.0, last_end + JOBS_SETTLE - time.monotonic()))
    result.jobs_unacknowledged["seconds_after_last_reply"] = round(time.monotonic() - last_end, 1)
    result.jobs_unacknowledged["jobs"] = unacknowledged_jobs(redis)

    if while_connected is not None:
        # Nothing is streamed to the clients now: they only hold their subscriptions.
        result.while_connected = await asyncio.to_thread(while_connected)

    await _disconnect(clients, api_pid)
    result.api_rss_kb["clients_gone"] = read_status(api_pid)["VmRSS"]
    result.api_fds["clients_gone"] = open_fds(api_pid)

    # A second round of as many connections: does the memory of the first one get reused?
    again = [Client(cid) for cid in conversations]
    await connect_clients(port, token, again, FanoutResult(clients=len(again)))
    result.api_rss_kb["second_round_connected"] = read_status(api_pid)["VmRSS"]
    result.api_fds["second_round_connected"] = open_fds(api_pid)
    await _disconnect(again, api_pid)
    result.api_rss_kb["second_round_gone"] = read_status(api_pid)["VmRSS"]
    return result


async def _disconnect(clients: list[Client], api_pid: int) -> None:
    """Close every client, then wait (up to 10 s) until the API has closed its sockets too."""
    fds_connected = open_fds(api_pid)
    closed = 0
    for client in clients:
        if client.protocol is not None:
            client.protocol.close()
            closed += 1
    deadline = time.monotonic() + 10
    while open_fds(api_pid) > fds_connected - closed + 10 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the API closes its side when it notices: no event to wait on
    await asyncio.sleep(0.2)  # and lets its tasks finish


def measure(
    port: int,
    token: str,
    llm_port: int,
    redis_url: str,
    conversations: list[str],
    pids: dict[str, int],
    while_connected: Callable[[], Any] | None = None,
) -> FanoutResult:
    """`conversations`: fresh conversations of the token's user, one per client. `pids`: "api",
    "worker-…" (workers), and any other process whose CPU time is to be shown.
    `while_connected` runs (in a thread) after the replies, while the clients are still
    connected and idle; its result is `result.while_connected`."""
    needed = len(conversations) + FD_MARGIN
    open_files = {
        "bench_client": raise_open_files(needed),
        **{name: open_files_limit(pid) for name, pid in pids.items()},
    }
    low = {name: n for name, n in open_files.items() if n is not None and n < needed}
    if low:
        raise RuntimeError(
            f"open files limits too low for {len(conversations)} clients (need {needed}): {low}; "
            "raise `ulimit -n` before running the benchmark"
        )
    with RawClient(llm_port) as llm:
        configure_llm(llm, FIRST_DELAY_MS, TOKENS, TOKEN_DELAY_MS)
    with SyncRedis.from_url(redis_url, decode_responses=True) as redis:
        result = uvloop.run(_run(port, token, conversations, pids, redis, while_connected))
    result.open_files = open_files
    return result
