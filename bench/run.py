"""The benchmark run: start the processes, make the data, run the three benchmarks, report.

Order matters for clean figures: the memory benchmark runs first on an otherwise idle Redis (its
`used_memory` delta is its own), the throughput benchmark runs with both servers up but only one
loaded at a time, and the bare app is stopped before the latency benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench import memory, report, scaling, throughput
from bench.client import RawClient
from bench.fixtures import create_conversation, fill, message_body, open_store
from bench.procs import ROOT, MissingTool, bare_app, ensure_binary, issue_token, redis_server
from bench.procs import service as service_process
from bench.throughput import Comparison, Target
from bench.wrk import WrkRequest, wrk_version

USER = "bench-user"
PAGE_CONVERSATION_MESSAGES = 60
POST_GOAL = 0.5
GET_GOAL = 0.5


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
    async with open_store(redis_url) as store:
        _step(f"memory: {memory.MESSAGES:,} messages into a fresh conversation")
        mem = await memory.measure(store, client, token, data.memory_conversation, USER)
        await fill(store, data.page_conversation, USER, PAGE_CONVERSATION_MESSAGES)
        _step(f"filling one conversation with {scaling.BIG:,} messages (through the store)")
        started = time.perf_counter()
        big_ids = await fill(store, data.big, USER, scaling.BIG)
        _step(f"  done in {time.perf_counter() - started:.1f} s")
        small = [(cid, await fill(store, cid, USER, scaling.SMALL)) for cid in data.small]
        version = (await store.client.info("server"))["redis_version"]
    return mem, scaling.Setup(data.big, big_ids, small), str(version)


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


def _run(wrk: str, redis_binary: str, workdir: Path) -> int:
    started = time.monotonic()
    busy_before = _cpu_busy()
    notes: list[str] = []
    if busy_before is not None and busy_before > 0.25:
        notes.append(
            f"other work used {busy_before:.0%} of the CPUs just before the run: figures may be "
            "noisy"
        )
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
        ours_post = client.call(
            "POST", post_path, token=token, json=orjson.loads(body), expected=201
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
        ]

        def alive() -> None:
            for child in (redis, ours, bare):
                child.check_alive()

        throughput.compare(
            wrk,
            [
                (comparisons[0], Target(ours_port, post), Target(bare_port, post)),
                (comparisons[1], Target(ours_port, get), Target(bare_port, get)),
            ],
            check=alive,
        )
        bare.stop()

        _step(
            f"latency at {scaling.BIG:,} vs {scaling.SMALL} messages: {scaling.SAMPLES:,} "
            "samples per side, interleaved"
        )
        with RawClient(ours_port) as latency_client:
            pairs = scaling.measure(latency_client, token, setup, body)
        ours.check_alive()

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
                for key, c in zip(("post_message", "get_page_50"), comparisons, strict=True)
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
        "notes": notes,
    }
    path = report.write_json(results)
    print(report.table(comparisons, list(pairs.values()), mem, notes))
    _step(f"done in {time.monotonic() - started:.0f} s ({path.relative_to(ROOT)})")
    return 0


def main() -> int:
    try:
        wrk = ensure_binary("wrk", "wrk")
        redis_binary = ensure_binary("redis-server", "redis-server")
    except MissingTool as exc:
        print(exc.code, file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    try:
        return _run(wrk, redis_binary, workdir)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
