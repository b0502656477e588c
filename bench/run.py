"""The benchmark run: start the processes, make the data, run the benchmarks, report.

Order matters for clean figures: the memory benchmark runs first on an otherwise idle Redis (its
`used_memory` delta is its own), the throughput benchmark runs with both servers up but only one
loaded at a time, and the bare app is stopped before the latency benchmark. The AI-reply
benchmarks (time to first token, 10,000 SSE clients) then run on processes of their own, started
once the first ones have stopped: a fresh Redis, the fake OpenAI server, the API with
WORKER_IN_API=false and worker processes; and the relay at three loads (bench/relay.py) on
processes of its own again, with its fast fake model.

BENCH_ONLY=throughput|trees|replies|relay runs one part alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from bench import (
    fanout,
    instructions,
    memory,
    relay,
    report,
    scaling,
    throughput,
    trees,
    ttft,
)
from bench.client import RawClient
from bench.fixtures import create_conversation, fill, message_body, open_store
from bench.procs import (
    ROOT,
    Child,
    MissingTool,
    bare_app,
    edge_env,
    ensure_binary,
    fake_llm,
    fake_model,
    issue_token,
    redis_server,
    reply_worker,
)
from bench.procs import service as service_process
from bench.throughput import Comparison, Target
from bench.wrk import WrkRequest, wrk_version

USER = "bench-user"
PAGE_CONVERSATION_MESSAGES = 60
POST_GOAL = 0.5
GET_GOAL = 0.5
# The production configuration (rate limit on, an access line per request): issue 12.
PRODUCTION_POST_GOAL = 0.9
PRODUCTION_GET_GOAL = 0.8


@dataclass
class Data:
    memory_conversation: str
    page_conversation: str
    post_conversation: str
    big: str
    small: list[str]


def _step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def _make_conversations(client: RawClient, token: str) -> Data:
    def make(title: str) -> str:
        return create_conversation(client, token, title)

    return Data(
        memory_conversation=make("memory"),
        page_conversation=make("page"),
        post_conversation=make("post"),
        big=make("100k"),
        small=[make(f"small {i}") for i in range(scaling.SMALL_POOL)],
    )


async def _fill_and_measure_memory(
    redis_url: str, client: RawClient, token: str, data: Data
) -> tuple[memory.MemoryResult, scaling.Setup, str]:
    async with open_store(redis_url) as store, aioredis.Redis.from_url(redis_url) as redis:
        _step(f"memory: {memory.MESSAGES:,} messages into a fresh conversation")
        mem = await memory.measure(store, redis, client, token, data.memory_conversation, USER)
        await fill(store, data.page_conversation, USER, PAGE_CONVERSATION_MESSAGES)
        _step(f"filling one conversation with {scaling.BIG:,} messages (through the store)")
        started = time.perf_counter()
        big_ids = await fill(store, data.big, USER, scaling.BIG)
        _step(f"  done in {time.perf_counter() - started:.1f} s")
        small = [(cid, await fill(store, cid, USER, scaling.SMALL)) for cid in data.small]
        version = (await redis.info("server"))["redis_version"]
    return mem, scaling.Setup(data.big, big_ids, small), str(version)


def _run_trees(redis_url: str, workdir: Path) -> trees.TreeResult:
    """The tree benchmark on a service of its own with no reply worker (WORKER_IN_API=false):
    its regenerates queue replies that nobody writes (bench/trees.py)."""
    _step(
        f"trees: {trees.TOTAL:,} messages in about {trees.BRANCHES:,} branches (through the store)"
    )
    with service_process(redis_url, workdir, {"WORKER_IN_API": "false"}, name="service-trees") as (
        child,
        port,
    ):
        token = issue_token(redis_url, USER)
        service_token = issue_token(redis_url, USER, "service")

        async def build() -> tuple[trees.TreeSetup, dict[str, object]]:
            async with open_store(redis_url) as store, aioredis.Redis.from_url(redis_url) as r:
                made = await trees.build(store, port, token, USER)
                return made, await trees.memory(r, port, token, made.big_id)

        started = time.perf_counter()
        setup, tree_memory = asyncio.run(build())
        _step(f"  made in {time.perf_counter() - started:.1f} s ({setup.leaves:,} leaves)")
        _step(
            f"trees: latency at {trees.TOTAL:,} messages vs {trees.SMALL}, {trees.SAMPLES:,} "
            "samples per side, interleaved; then switches"
        )
        with RawClient(port) as client:
            result = trees.measure(client, token, service_token, setup)
        result.memory = tree_memory
        child.check_alive()
    return result


def _cpu_busy(seconds: float = 1.0) -> float | None:
    """The share of all CPUs busy over `seconds` (Linux /proc/stat), before anything starts."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return 1 - (idle1 - idle0) / total if total else None


def _python_speed() -> float:
    """Milliseconds of one fixed pure-Python loop (the fastest of 5): how fast this machine runs
    Python right now. CPU-per-token and requests-per-second figures scale with it, and on a
    shared machine it moves between runs (it doubled within an hour on 2026-11-30); printed with
    every run so that figures of different runs can be compared."""
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i & 7
        best = min(best, time.perf_counter() - began)
    return best * 1000


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()
    return None


@dataclass
class Replies:
    ttft_sequential: ttft.TtftResult
    fan: fanout.FanoutResult
    ttft_loaded: ttft.TtftResult | None
    log_warnings: dict[str, dict[str, int]]
    gc_pauses: dict[str, dict[str, float]]


_IDS = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d{13}-\d+|vm-\S+")


def _log_warnings(children: list[Child]) -> dict[str, dict[str, int]]:
    """WARNING and ERROR lines of the processes' logs, counted by message (ids masked)."""
    found: dict[str, dict[str, int]] = {}
    for child in children:
        counts: dict[str, int] = {}
        for line in child.tail(100_000).splitlines():
            parts = line.split(" | ", 2)
            if len(parts) < 3 or parts[1].strip() not in ("WARNING", "ERROR", "CRITICAL"):
                continue
            text = _IDS.sub("<id>", parts[2].split(" - ", 1)[-1])
            key = f"{parts[1].strip()}: {text[:160]}"
            counts[key] = counts.get(key, 0) + 1
        if counts:
            found[child.name] = counts
    return found


GC_PAUSE_MS = 10.0  # the garbage collections shown: those that paused a process this long


def _gc_pauses(log: Path, names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Collections of at least GC_PAUSE_MS per process, from bench/gcprobe's log: how many,
    the longest, their total, and how many were full (generation 2) collections."""
    found: dict[str, dict[str, float]] = {
        name: {"count": 0, "max_ms": 0.0, "total_ms": 0.0, "full": 0} for name in names.values()
    }
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            pid, generation, ms, _ = line.split()
            name = names.get(int(pid))
            if name is None or float(ms) < GC_PAUSE_MS:
                continue
            entry = found[name]
            entry["count"] += 1
            entry["max_ms"] = max(entry["max_ms"], float(ms))
            entry["total_ms"] += float(ms)
            entry["full"] += generation == "2"
    return found


def _reply_env(llm_port: int) -> dict[str, str]:
    """The settings of an API and workers that answer from a fake model on `llm_port`."""
    return {
        "WORKER_IN_API": "false",
        "LLM_PROVIDER": "openai",
        "LLM_BASE_URL": f"http://127.0.0.1:{llm_port}/v1",
        "LLM_MODEL": "bench-fake",
    }


def _run_replies(redis_binary: str, workdir: Path) -> Replies:
    """The AI-reply benchmarks on processes of their own: Redis, the fake model, the API with
    WORKER_IN_API=false and worker processes (`python run.py worker`)."""
    with contextlib.ExitStack() as stack:
        _step(
            "starting redis-server, the fake OpenAI server, the API (WORKER_IN_API=false) and "
            "a worker process (python run.py worker)"
        )
        redis, redis_url = stack.enter_context(redis_server(redis_binary, workdir / "replies"))
        llm, llm_port = stack.enter_context(fake_llm(workdir))
        env = {
            **_reply_env(llm_port),
            "WORKER_CONCURRENCY": str(fanout.WORKER_CONCURRENCY),
            # bench/gcprobe: the API and the workers log their slow garbage collections.
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "bench" / "gcprobe"), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "BENCH_GC_LOG": str(workdir / "gc.log"),
        }
        api, port = stack.enter_context(service_process(redis_url, workdir, env, name="api"))
        workers = [stack.enter_context(reply_worker(redis_url, workdir, env, "worker-1"))]
        token = issue_token(redis_url, USER)

        with RawClient(port) as client:
            ttft_conversations = [
                create_conversation(client, token, f"ttft {i}") for i in range(ttft.CONVERSATIONS)
            ]
        _step(
            f"time to first token: {ttft.SAMPLES} replies one at a time over "
            f"{ttft.CONVERSATIONS} open event streams ({ttft.WARMUP} more to warm up)"
        )
        sequential = ttft.measure(
            port, token, llm_port, ttft_conversations, "1 worker process; nothing else connected"
        )

        _step(
            f"starting {fanout.WORKERS - 1} more worker process(es), "
            f"{fanout.CLIENTS:,} conversations"
        )
        for n in range(2, fanout.WORKERS + 1):
            workers.append(
                stack.enter_context(reply_worker(redis_url, workdir, env, f"worker-{n}"))
            )
        with RawClient(port) as client:
            conversations = [
                create_conversation(client, token, f"fan-out {i}") for i in range(fanout.CLIENTS)
            ]
            loaded_conversations = [
                create_conversation(client, token, f"ttft loaded {i}")
                for i in range(ttft.CONVERSATIONS)
            ]

        def ttft_while_connected() -> ttft.TtftResult:
            _step(f"time to first token again, {fanout.CLIENTS:,} clients connected and idle")
            return ttft.measure(
                port,
                token,
                llm_port,
                loaded_conversations,
                f"2 worker processes; {fanout.CLIENTS:,} idle SSE clients of other conversations",
            )

        _step(
            f"fan-out: {fanout.CLIENTS:,} SSE clients, one reply each ({fanout.WORKERS} worker "
            f"processes, WORKER_CONCURRENCY={fanout.WORKER_CONCURRENCY}, {fanout.TOKENS} tokens "
            f"{fanout.TOKEN_DELAY_MS:g} ms apart)"
        )
        pids = {
            "api": api.proc.pid,
            **{w.name: w.proc.pid for w in workers},
            "redis": redis.proc.pid,
            "fake_llm": llm.proc.pid,
        }
        fan = fanout.measure(
            port, token, llm_port, redis_url, conversations, pids, ttft_while_connected
        )
        for child in (redis, llm, api, *workers):
            child.check_alive()
        loaded = fan.while_connected if isinstance(fan.while_connected, ttft.TtftResult) else None
        gc_pauses = _gc_pauses(workdir / "gc.log", {c.proc.pid: c.name for c in (api, *workers)})
        return Replies(sequential, fan, loaded, _log_warnings([api, *workers, llm]), gc_pauses)


def _run_relay(redis_binary: str, workdir: Path) -> list[relay.RelayResult]:
    """The relay at the loads of relay.LOADS (or BENCH_RELAY_LOADS), on processes of their own:
    Redis, the fast fake model (bench/fake_model.py), the API with WORKER_IN_API=false and
    WORKERS worker processes, all with the service's default settings."""
    (workdir / "redis").mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        _step(
            f"relay: starting redis-server, the fast fake model, the API and {relay.WORKERS} "
            "worker processes"
        )
        redis, redis_url = stack.enter_context(redis_server(redis_binary, workdir / "redis"))
        model, model_port = stack.enter_context(fake_model(workdir))
        env = {**_reply_env(model_port), "AUTO_TITLE": "false"}
        api, port = stack.enter_context(service_process(redis_url, workdir, env, name="api"))
        workers = [
            stack.enter_context(reply_worker(redis_url, workdir, env, f"worker-{n}"))
            for n in range(1, relay.WORKERS + 1)
        ]
        token = issue_token(redis_url, USER)
        pids = {
            "api": api.proc.pid,
            **{w.name: w.proc.pid for w in workers},
            "redis": redis.proc.pid,
            "fake_model": model.proc.pid,
        }
        results = []
        print("relay: pids " + orjson.dumps(pids).decode(), flush=True)  # (to attach a profiler)
        loads = relay.selected_loads(os.environ.get("BENCH_RELAY_LOADS"))
        rounds = relay.selected_rounds(os.environ.get("BENCH_RELAY_ROUNDS"))
        for number in range(1, rounds + 1):
            for load in loads:
                _step(f"relay: {load.name} (round {number}/{rounds})")
                results.append(relay.measure(port, token, model_port, redis_url, pids, load))
                for child in (redis, model, api, *workers):
                    child.check_alive()
                print(report.relay_line(results[-1]), flush=True)
        return results


def _run(wrk: str, redis_binary: str, workdir: Path) -> int:
    started = time.monotonic()
    busy_before = _cpu_busy()
    speed = f"machine speed: a fixed Python loop took {_python_speed():.1f} ms (lower is faster)"
    print(speed, flush=True)
    notes: list[str] = [speed]
    if busy_before is not None and busy_before > 0.25:
        notes.append(
            f"other work used {busy_before:.0%} of the CPUs just before the run: figures may be "
            "noisy"
        )
    if os.environ.get("BENCH_ONLY") == "relay":  # the relay benchmark alone
        relays = _run_relay(redis_binary, workdir / "relay")
        print(report.relay_table(relays))
        summaries = [s.to_json() for s in relay.summaries(relays)]
        print(orjson.dumps(summaries, option=orjson.OPT_INDENT_2).decode())
        return 0
    if os.environ.get("BENCH_ONLY") == "replies":  # time to first token and the fan-out alone
        (workdir / "replies").mkdir()
        replies = _run_replies(redis_binary, workdir)
        print("\n".join(report.fanout_lines(replies.fan, replies.log_warnings)))
        print("GC pauses >= 10 ms:", orjson.dumps(replies.gc_pauses).decode())
        print(orjson.dumps(replies.fan.to_json(), option=orjson.OPT_INDENT_2).decode())
        return 0
    if os.environ.get("BENCH_ONLY") == "trees":  # the tree benchmark alone
        with redis_server(redis_binary, workdir) as (_, redis_url):
            result = _run_trees(redis_url, workdir)
        print(report.trees_table(result))
        print(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode())
        return 0
    with contextlib.ExitStack() as stack:
        _step("starting redis-server and the service (python run.py, 1 worker)")
        redis, redis_url = stack.enter_context(redis_server(redis_binary, workdir))
        ours, ours_port = stack.enter_context(service_process(redis_url, workdir))
        token = issue_token(redis_url, USER)
        client = stack.enter_context(RawClient(ours_port))

        data = _make_conversations(client, token)
        mem, setup, redis_version = asyncio.run(
            _fill_and_measure_memory(redis_url, client, token, data)
        )

        # The bare app serves the exact bytes of one of our pages.
        page_path = f"/conversations/{data.page_conversation}/messages?limit=50"
        page = client.call("GET", page_path, token=token)
        page_file = workdir / "page.json"
        page_file.write_bytes(page)
        post_path = f"/conversations/{data.post_conversation}/messages"
        body = message_body()
        # Twice: the second has a parent, as every POST of the throughput benchmark (and the
        # bare app's answer) has; the first, in a conversation still empty, has none.
        for _ in range(2):
            ours_post = client.call(
                "POST", post_path, token=token, json=orjson.loads(body), expected=201
            )

        _step(
            "starting the service in its production configuration (ENVIRONMENT=production: "
            "rate limit, JSON access lines)"
        )
        prod, prod_port = stack.enter_context(
            service_process(redis_url, workdir, edge_env("on"), name="service-production")
        )
        _step("starting the bare FastAPI app (same uvicorn settings)")
        bare, bare_port = stack.enter_context(bare_app(page_file, workdir))
        with RawClient(bare_port) as bare_client:
            if bare_client.call("GET", page_path) != page:
                raise RuntimeError("the bare app does not serve the same page bytes")
            bare_post = bare_client.call("POST", post_path, json=orjson.loads(body), expected=201)
        if len(bare_post) != len(ours_post):
            notes.append(
                f"POST response sizes differ: ours {len(ours_post)} B, bare {len(bare_post)} B"
            )

        _step(
            f"throughput: {throughput.ROUNDS} rounds x {throughput.ROUND_SECONDS} s per server "
            f"and route (wrk -t1 -c{throughput.CONNECTIONS})"
        )
        post = WrkRequest("POST", post_path, token=token, body=body)
        get = WrkRequest("GET", page_path, token=token)
        comparisons = [
            Comparison("POST message", POST_GOAL),
            Comparison("GET page (50)", GET_GOAL),
            Comparison("POST, production", PRODUCTION_POST_GOAL),
            Comparison("GET, production", PRODUCTION_GET_GOAL),
        ]

        def alive() -> None:
            for child in (redis, ours, prod, bare):
                child.check_alive()

        def mine(child: Child, port: int, request: WrkRequest) -> Target:
            return Target(port, request, child.proc.pid, redis.proc.pid)

        bare_pid = bare.proc.pid

        throughput.compare(
            wrk,
            [
                (comparisons[0], mine(ours, ours_port, post), Target(bare_port, post, bare_pid)),
                (comparisons[1], mine(ours, ours_port, get), Target(bare_port, get, bare_pid)),
                (comparisons[2], mine(prod, prod_port, post), Target(bare_port, post, bare_pid)),
                (comparisons[3], mine(prod, prod_port, get), Target(bare_port, get, bare_pid)),
            ],
            check=alive,
        )
        bare.stop()
        prod.stop()
        counts = _run_instructions(redis_url, workdir, notes)
        if os.environ.get("BENCH_ONLY") == "throughput":  # a quick check while tuning
            for comparison in comparisons:
                print(comparison.name, orjson.dumps(comparison.to_json()).decode())
            print(report.edges_line(comparisons))
            print("\n".join(_instruction_lines(counts)))
            return 0

        _step(
            f"latency at {scaling.BIG:,} vs {scaling.SMALL} messages: {scaling.SAMPLES:,} "
            "samples per side, interleaved"
        )
        with RawClient(ours_port) as latency_client:
            pairs = scaling.measure(latency_client, token, setup, body)
        ours.check_alive()
        ours.stop()
        tree = _run_trees(redis_url, workdir)

    (workdir / "replies").mkdir()
    replies = _run_replies(redis_binary, workdir)
    relays = _run_relay(redis_binary, workdir / "relay")

    results = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "seconds": round(time.monotonic() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_busy_before": busy_before,
            "load_average_after": os.getloadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "wrk": wrk_version(wrk),
            "redis": redis_version,
        },
        "throughput": {
            "settings": {
                "rounds": throughput.ROUNDS,
                "round_seconds": throughput.ROUND_SECONDS,
                "wrk_threads": 1,
                "wrk_connections": throughput.CONNECTIONS,
                "uvicorn": "1 worker, uvloop, httptools, access log off",
                "post_body_bytes": len(body),
                "post_response_bytes": {"ours": len(ours_post), "bare": len(bare_post)},
                "page_response_bytes": len(page),
            },
            **{
                key: c.to_json()
                for key, c in zip(
                    ("post_message", "get_page_50", "post_production", "get_production"),
                    comparisons,
                    strict=True,
                )
            },
        },
        "scaling": {
            "settings": {
                "big_messages": scaling.BIG,
                "small_messages": scaling.SMALL,
                "small_conversations": scaling.SMALL_POOL,
                "samples": scaling.SAMPLES,
            },
            **{key: pair.to_json() for key, pair in pairs.items()},
        },
        "memory": mem.to_json(),
        "trees": tree.to_json(),
        "ttft": {
            **replies.ttft_sequential.to_json(),
            "with_idle_clients": replies.ttft_loaded.to_json() if replies.ttft_loaded else None,
        },
        "fanout": {
            **replies.fan.to_json(),
            "log_warnings": replies.log_warnings,
            "gc_pauses_whole_reply_benchmarks": {
                "min_ms": GC_PAUSE_MS,
                **replies.gc_pauses,
            },
        },
        "relay": [s.to_json() for s in relay.summaries(relays)],
        "instructions": counts.to_json() if counts is not None else None,
        "notes": notes,
    }
    path = report.write_json(results)
    print(report.table(comparisons, list(pairs.values()), mem, notes, replies, tree, relays))
    print("\n".join(_instruction_lines(counts)))
    _step(f"done in {time.monotonic() - started:.0f} s ({path.relative_to(ROOT)})")
    return 0


def _run_instructions(
    redis_url: str, workdir: Path, notes: list[str]
) -> instructions.Counts | None:
    """Instructions a request, ours (production configuration) and bare, under callgrind."""
    try:
        ensure_binary("valgrind", "valgrind")
    except MissingTool as exc:
        notes.append(f"instructions a request not counted: {exc.code}")
        return None
    _step(
        f"instructions a request (callgrind): {instructions.COUNTED} requests per route and "
        "server, one at a time"
    )
    return instructions.measure(redis_url, workdir)


def _instruction_lines(counts: instructions.Counts | None) -> list[str]:
    if counts is None:
        return ["Instructions a request: not counted (valgrind missing, see the notes)"]
    return [
        "Instructions a request (callgrind; ours in its production configuration, the "
        "server's own, not the kernel's):",
        *instructions.lines(counts),
    ]


def main() -> int:
    try:
        wrk = ensure_binary("wrk", "wrk")
        redis_binary = ensure_binary("redis-server", "redis-server")
    except MissingTool as exc:
        print(exc.code, file=sys.stderr)
        return 1
    # Before any server starts, so that they inherit it: one descriptor per SSE client.
    fanout.raise_open_files(fanout.CLIENTS + fanout.FD_MARGIN)
    workdir = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    try:
        return _run(wrk, redis_binary, workdir)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
