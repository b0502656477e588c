"""Benchmark 5: 1,000 SSE clients on one API process, each receiving its complete reply.

Set-up: the processes of the time-to-first-token benchmark (Redis, the API with
WORKER_IN_API=false, the fake OpenAI-compatible server) with WORKERS reply worker processes
(`python run.py worker`, WORKER_CONCURRENCY each). The fake model answers TOKENS tokens
TOKEN_DELAY_MS apart after FIRST_DELAY_MS.

What it measures: CLIENTS conversations, each with one SSE client (`GET …/events`) opened by
this process (asyncio, raw sockets: bench/sse.py). Once every client has its stream's first
comment, one message is posted per conversation (respond=true, POSTERS keep-alive connections
posting concurrently), and the run waits until every client has seen `message.completed` for its
reply. A client counts as complete when that reply's deltas, concatenated, equal both the
completed event's content and the text the fake model sent; the stored messages of a sample of
VERIFY_SAMPLE replies are fetched at the end and compared too.

Reported: clients complete (goal: all), total time (first POST to last completion), the latency
of each reply from its POST to its first delta and to its completion, and the resident memory
(VmRSS of /proc/<pid>/status) of the API process before the clients connect, once they are
connected, at its peak during the replies (sampled every RSS_INTERVAL s; VmHWM, the kernel's own
high-water mark since the process started, beside it) and after the clients have gone; and of
each worker process. CPU seconds of every process during the replies show where the time went.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.client import RawClient, encode_request
from bench.fake_llm import reply_text, tag_message
from bench.sse import COMPLETED, SseProtocol, events_request
from bench.ttft import configure_llm, percentile

CLIENTS = 1_000
WORKERS = 2
WORKER_CONCURRENCY = 200
FIRST_DELAY_MS = 20.0
TOKENS = 20
TOKEN_DELAY_MS = 5.0
POSTERS = 16
CONNECT_CONCURRENCY = 100
VERIFY_SAMPLE = 100
RSS_INTERVAL = 0.02
TIMEOUT = 120.0
FD_MARGIN = 200  # descriptors beyond one per client: Redis pool, listeners, files


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


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


class RssSampler:
    """Samples VmRSS of some processes every RSS_INTERVAL seconds in a thread; keeps the peak."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_kb = dict.fromkeys(pids, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                with contextlib.suppress(OSError, KeyError):
                    rss = read_status(pid)["VmRSS"]
                    self.peak_kb[name] = max(self.peak_kb[name], rss)
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
    api_rss_kb: dict[str, int] = field(default_factory=dict)
    workers_rss_kb: dict[str, dict[str, int]] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    open_files: dict[str, int | None] = field(default_factory=dict)
    rss_samples: int = 0

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
            "failures": self.failures[:20],
            "connect_seconds": self.connect_seconds,
            "post_seconds": self.post_seconds,
            "total_seconds": self.total_seconds,
            "post_to_first_delta": ms(self.first_delta_ms),
            "post_to_completed": ms(self.complete_ms),
            "sse_events_received": self.events,
            "stored_replies_verified": self.verified_stored,
            "api_rss_kb": self.api_rss_kb,
            "workers_rss_kb": self.workers_rss_kb,
            "cpu_seconds_during_replies": self.cpu_seconds,
            "open_files_soft_limit": self.open_files,
            "rss_samples": self.rss_samples,
        }


async def _connect(port: int, token: str, clients: list[Client], result: FanoutResult) -> None:
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
            result.failures.append(f"{client.conversation_id}: connect: {outcome!r}")
        else:
            result.connected += 1


async def _post_all(port: int, token: str, clients: list[Client]) -> None:
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
    port: int, token: str, conversations: list[str], pids: dict[str, int]
) -> FanoutResult:
    result = FanoutResult(clients=len(conversations))
    clients = [Client(cid) for cid in conversations]
    api_pid = pids["api"]
    result.api_rss_kb["before_clients"] = read_status(api_pid)["VmRSS"]

    await _connect(port, token, clients, result)
    ready = [c for c in clients if c.protocol is not None and c.protocol.connected.done()]
    result.api_rss_kb["clients_connected"] = read_status(api_pid)["VmRSS"]
    worker_pids = {name: pid for name, pid in pids.items() if name.startswith("worker")}
    for name, pid in worker_pids.items():
        result.workers_rss_kb[name] = {"before": read_status(pid)["VmRSS"]}

    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    sampler = RssSampler({"api": api_pid, **worker_pids})
    with sampler.running():
        started = time.monotonic()
        await _post_all(port, token, ready)
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
        result.total_seconds = (max(ends) if ends else time.monotonic()) - started
    result.cpu_seconds = {
        name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()
    }
    result.rss_samples = sampler.samples
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
        if protocol.ended.done() and protocol.ended.exception() is not None:
            error = protocol.ended.exception()
            result.failures.append(f"{client.conversation_id}: stream ended: {error!r}")
            continue
        trace = protocol.replies.get(client.reply_id or "")
        if trace is None or trace.final_type is None:
            result.failures.append(f"{client.conversation_id}: no end of reply {client.reply_id}")
            continue
        text = "".join(trace.deltas)
        content = (trace.final_message or {}).get("content")
        if trace.final_type != COMPLETED or text != expected or content != expected:
            result.failures.append(
                f"{client.conversation_id}: {trace.final_type}, deltas {text!r}, "
                f"content {content!r}"
            )
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
                result.failures.append(
                    f"{client.conversation_id}: stored {stored['status']} {stored['content']!r}"
                )
    finally:
        http.close()

    for client in clients:
        if client.protocol is not None:
            client.protocol.close()
    await asyncio.sleep(1.0)  # let the API notice the disconnections before measuring again
    result.api_rss_kb["clients_gone"] = read_status(api_pid)["VmRSS"]
    return result


def measure(
    port: int, token: str, llm_port: int, conversations: list[str], pids: dict[str, int]
) -> FanoutResult:
    """`conversations`: fresh conversations of the token's user, one per client. `pids`: "api",
    "worker-…" (workers), and any other process whose CPU time is to be shown."""
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
    result = uvloop.run(_run(port, token, conversations, pids))
    result.open_files = open_files
    return result
