"""Prometheus metrics, correct with several processes.

With `WORKERS` > 1, `run.py` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before any
process imports prometheus_client (it picks its value class at import time; see cli.py), so that
every process writes its samples there and `/metrics`, answered by any one of them, adds them all
up.
Gauges declare how their per-process values combine.

Labels never carry ids: `endpoint` is the route template (`/conversations/{conversation_id}`),
the other labels come from small fixed sets.
"""

from __future__ import annotations

import glob
import os
from bisect import bisect_left
from typing import Any

from loguru import logger
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

from conversational_core.observability.batch import Batched
from conversational_core.storage.base import Store

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
_NS = "conversational_core"

REQUESTS = Counter(
    f"{_NS}_requests_total",
    "HTTP requests by method, route template and status.",
    ["method", "endpoint", "status"],
)
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_DURATION = Histogram(
    f"{_NS}_request_duration_seconds",
    "Time to answer an HTTP request (event streams excluded), by method and route template.",
    ["method", "endpoint"],
    buckets=_DURATION_BUCKETS,
)  # (both counted through REQUEST_TALLY, below)
CONVERSATIONS = Counter(f"{_NS}_conversations_total", "Conversations created.")
MESSAGES = Counter(f"{_NS}_messages_total", "Messages created, by role.", ["role"])
REPLIES = Counter(
    f"{_NS}_replies_total",
    "AI replies that ended, by outcome (completed, failed, cancelled).",
    ["outcome"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    f"{_NS}_reply_time_to_first_token_seconds",
    "From the user's message to the reply's first token (queue wait included).",
    ["provider"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0),
)
GENERATION_DURATION = Histogram(
    f"{_NS}_reply_duration_seconds",
    "From the provider call to the reply's end, by provider and outcome.",
    ["provider", "outcome"],
    buckets=(0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0),
)
TOKENS = Counter(
    f"{_NS}_tokens_total",
    "Tokens used by AI replies, by provider and kind (prompt, completion).",
    ["provider", "kind"],
)
QUEUE_JOBS = Gauge(
    f"{_NS}_queue_jobs",
    "Reply jobs waiting or running (read from the queue at scrape time).",
    multiprocess_mode="livemostrecent",
)
QUEUE_OLDEST_AGE = Gauge(
    f"{_NS}_queue_oldest_job_age_seconds",
    "Age of the oldest reply job (read from the queue at scrape time).",
    multiprocess_mode="livemostrecent",
)
QUEUE_WAITING = Gauge(
    f"{_NS}_queue_waiting_jobs",
    "Reply jobs no worker has taken yet: waiting for admission (read at scrape time).",
    multiprocess_mode="livemostrecent",
)
WORKER_REPLIES = Gauge(
    f"{_NS}_worker_replies",
    "Replies being written by a worker process (admitted jobs).",
    multiprocess_mode="livesum",
)
WORKER_LOOP_LAG = Gauge(
    f"{_NS}_worker_loop_lag_seconds",
    "How late a worker's event loop runs (smoothed); past WORKER_MAX_LAG_MS it admits no job.",
    multiprocess_mode="livemax",
)
PAGE_READS = Counter(
    f"{_NS}_page_reads_total",
    "Pages of messages read by their owners (Redis store, PAGE_CACHE_MB on), by source: "
    "`copy` (this process's copy, still current: one round trip that answers a word) or "
    "`store` (read and assembled from Redis).",
    ["source"],
)
PAGE_COPIES_BYTES = Gauge(
    f"{_NS}_page_copies_bytes",
    "Memory held by kept pages of messages (about; at most PAGE_CACHE_MB per process).",
    multiprocess_mode="livesum",
)
SSE_CONNECTIONS = Gauge(
    f"{_NS}_sse_connections",
    "Open event streams.",
    multiprocess_mode="livesum",
)
STORE_ERRORS = Counter(
    f"{_NS}_store_errors_total",
    "Store operations that failed because the store was unreachable, by component (api, worker).",
    ["component"],
)
RATE_LIMITED = Counter(
    f"{_NS}_rate_limited_total",
    "Requests refused by a rate limit, by scope (user, ai, anonymous; streams: a user's open "
    "event streams).",
    ["scope"],
)
RATE_LIMITER_ERRORS = Counter(
    f"{_NS}_rate_limiter_errors_total",
    "Rate-limit checks skipped because the limiter's store was unreachable (the request passed).",
)
OPEN_CONNECTIONS = Gauge(
    f"{_NS}_open_connections",
    "Open client connections (HTTP), sampled every second.",
    multiprocess_mode="livesum",
)
CONNECTIONS_REFUSED = Counter(
    f"{_NS}_connections_refused_total",
    "Connections refused or cut off by the server's guard, by reason (max_connections, "
    "header_too_large, header_timeout, body_too_slow, malformed).",
    ["reason"],
)

# Every name the service exports (the Grafana dashboard is checked against it).
METRIC_NAMES = tuple(
    m._name  # prometheus_client keeps the base name (without _total) there
    for m in (
        REQUESTS,
        REQUEST_DURATION,
        CONVERSATIONS,
        MESSAGES,
        REPLIES,
        TIME_TO_FIRST_TOKEN,
        GENERATION_DURATION,
        TOKENS,
        QUEUE_JOBS,
        QUEUE_OLDEST_AGE,
        QUEUE_WAITING,
        WORKER_REPLIES,
        WORKER_LOOP_LAG,
        SSE_CONNECTIONS,
        PAGE_READS,
        PAGE_COPIES_BYTES,
        STORE_ERRORS,
        RATE_LIMITED,
        RATE_LIMITER_ERRORS,
        OPEN_CONNECTIONS,
        CONNECTIONS_REFUSED,
    )
)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def process_exited(pid: int) -> None:
    """Forget a finished process's live gauges (open streams, queue readings)."""
    if multiprocess_dir() is not None:
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _forget_dead_processes(directory: str) -> None:
    """A server process that crashed (uvicorn restarts it) could not forget its live gauges
    itself: its open streams would be counted forever."""
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            process_exited(pid)
        except PermissionError:
            pass  # alive, another user's


class PageCopyMeter:
    """Moves a store's page counts (plain integers, counted per read at no cost) into
    PAGE_READS and PAGE_COPIES_BYTES: now and then in every process (app.py), and just
    before a scrape in the process that answers it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # From the store's counts now: a store that served another app before (tests) is not
        # counted twice.
        stats = store.page_copy_stats()
        self._served = stats.served if stats is not None else 0
        self._read = stats.read if stats is not None else 0

    def sync(self) -> None:
        stats = self._store.page_copy_stats()
        if stats is None:
            return
        if stats.served > self._served:
            _PAGE_COPY.inc(stats.served - self._served)
        if stats.read > self._read:
            _PAGE_STORE.inc(stats.read - self._read)
        self._served, self._read = stats.served, stats.read
        PAGE_COPIES_BYTES.set(stats.bytes)

    def close(self) -> None:
        """The app stops: its last counts in, and its copies no longer held by this app."""
        self.sync()
        PAGE_COPIES_BYTES.set(0)


class RequestTally(Batched):
    """REQUESTS and REQUEST_DURATION, added up in this process and handed to prometheus_client
    together: at most FLUSH_SECONDS after a request, just before this process answers a scrape,
    and when it stops. Through prometheus_client a request's `inc` and `observe` cost ~15,000
    instructions (a lock per value, three calls deep: callgrind), ~2% of a `POST /messages`; a
    dict entry here costs a tenth of that. What it changes: a process's last second of requests
    reaches another process's scrape (WORKERS > 1) up to a second late, and is lost if it is
    killed (SIGKILL) within that second.

    prometheus_client has no way to add many observations at once: a histogram's are added
    to its child's `_buckets` and `_sum` (values with `inc`, the same since 0.4; the version is
    pinned, and tests/test_request_tally.py compares the result with one-by-one counting)."""

    def __init__(self, counter: Counter, histogram: Histogram, bounds: tuple[float, ...]) -> None:
        self._counter = counter
        self._histogram = histogram
        self._bounds = bounds  # the histogram's, without +Inf (its index is len(bounds))
        self._counts: dict[tuple[str, str, int], int] = {}
        # By (method, endpoint): the count in each bucket (not cumulative), then the sum.
        self._durations: dict[tuple[str, str], list[float]] = {}
        super().__init__()

    def record(self, method: str, endpoint: str, status: int, seconds: float | None) -> None:
        """A request answered; `seconds`: its duration (None: not timed, an event stream)."""
        key = (method, endpoint, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        if seconds is not None:
            durations = self._durations.get((method, endpoint))
            if durations is None:
                durations = self._durations[(method, endpoint)] = [0.0] * (len(self._bounds) + 2)
            durations[bisect_left(self._bounds, seconds)] += 1  # (the first bound >= seconds)
            durations[-1] += seconds
        self._flush_soon()

    def flush(self) -> None:
        super().flush()
        counts, self._counts = self._counts, {}
        durations, self._durations = self._durations, {}
        for (method, endpoint, status), n in counts.items():
            self._counter.labels(method, endpoint, str(status)).inc(n)
        for (method, endpoint), added in durations.items():
            child: Any = self._histogram.labels(method, endpoint)
            for bucket, times in zip(child._buckets, added[:-1], strict=True):
                if times:
                    bucket.inc(times)
            child._sum.inc(added[-1])


REQUEST_TALLY = RequestTally(REQUESTS, REQUEST_DURATION, _DURATION_BUCKETS)


class CountTally(Batched):
    """Counter increments of the hot paths (a message appended, a reply ended, its tokens),
    added up by counter child and handed to prometheus_client as RequestTally hands its own:
    within FLUSH_SECONDS, before the API's `/metrics` answers (a worker's own metrics port
    shows them up to FLUSH_SECONDS late), and at exit; a process killed (SIGKILL) loses its
    last second. An `inc` costs ~5,300 instructions, a dict entry here a sixth of that."""

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}  # a counter's child -> what to add to it
        super().__init__()

    def add(self, child: Any, amount: float = 1) -> None:
        """`child.inc(amount)`, a little later. A counter only goes up: an amount below 0 (a
        provider's usage that makes no sense) is left out, where `inc` would raise at the
        flush and lose the batch's other counts with it."""
        if amount < 0:
            return
        self._counts[child] = self._counts.get(child, 0) + amount
        self._flush_soon()

    def flush(self) -> None:
        super().flush()
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            child.inc(amount)


COUNTS = CountTally()

_PAGE_COPY = PAGE_READS.labels("copy")
_PAGE_STORE = PAGE_READS.labels("store")


def exposition() -> bytes:
    """The text of `/metrics`: every process's samples in multi-process mode."""
    REQUEST_TALLY.flush()
    COUNTS.flush()
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY)
    _forget_dead_processes(directory)
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def start_metrics_server(port: int, host: str) -> None:
    """`/metrics` on a port of its own, for a process without an HTTP API (the worker)."""
    registry = REGISTRY
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    try:
        start_http_server(port, host, registry)
    except OSError as exc:  # e.g. a second worker on the same host: it still writes replies
        logger.warning("worker metrics: cannot listen on {}:{} ({})", host, port, exc)
