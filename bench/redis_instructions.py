"""Benchmark: redis-server's own instructions a request of ours (production configuration),
counted by callgrind.

Why: beside our server, Redis spends CPU on every POST (the append script: 40-50 us a POST by
its `INFO commandstats` on this machine, against the API's 130-200), on the same two cores,
and like the API's its time moves with the machine while its instruction count does not. This
counts what Redis runs for a POST of a 200-character message and for a page of 50 (a page kept
by the API costs Redis only its version check), so that a change to a script can be compared
with the version before it.

Redis runs under `valgrind --tool=callgrind` counting from its start (switching counting on in
an idle Redis waits for its next event and timed out here); the count is zeroed after WARMUP
requests and dumped after COUNTED, one after the other on one keep-alive connection, so that
it includes Redis's timer (10 times a second: a few hundred instructions a request while
valgrind runs it ~50 times slower). Our server runs at full speed, its Redis timeouts raised.
About ten seconds.

    PYTHONPATH=src:. python -m bench.redis_instructions
    BENCH_CALLGRIND_KEEP=<folder>: the callgrind files kept (`redis-post_message`, ...)
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import orjson

from bench.client import RawClient
from bench.fixtures import create_conversation, message_body
from bench.instructions import (
    COUNTED,
    PAGE_MESSAGES,
    USER,
    WARMUP,
    _control,
    _dumped,
    _names,
    callgrind_tools,
)
from bench.procs import edge_env, issue_token, redis_server
from bench.procs import service as service_process


def measure(redis_binary: str, workdir: Path) -> dict[str, float]:
    """Redis's instructions a request, by route: a POST and a GET page of 50."""
    out_dir = workdir / "callgrind"
    out_dir.mkdir()
    prefix = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out_dir / 'redis'}.%p",
    ]
    counts: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        redis, url = stack.enter_context(redis_server(redis_binary, workdir, prefix, _names()))
        slow = {"REDIS_SOCKET_TIMEOUT": "30", "REDIS_CONNECT_TIMEOUT": "30"}
        env = {**edge_env("on"), "WORKER_IN_API": "false", **slow}
        _, port = stack.enter_context(service_process(url, workdir, env))
        token = issue_token(url, USER)
        body = orjson.loads(message_body())
        client = stack.enter_context(RawClient(port, timeout=120.0))
        posts = create_conversation(client, token, "redis instructions: posts")
        page = create_conversation(client, token, "redis instructions: page")
        for _ in range(PAGE_MESSAGES):
            client.call(
                "POST", f"/conversations/{page}/messages", token=token, json=body, expected=201
            )
        routes = {
            "post_message": ("POST", f"/conversations/{posts}/messages", body),
            "get_page_50": ("GET", f"/conversations/{page}/messages?limit={PAGE_MESSAGES}", None),
        }
        pid = redis.proc.pid
        for name, (method, path, json) in routes.items():
            expected = 201 if method == "POST" else 200
            for _ in range(WARMUP):
                client.call(method, path, token=token, json=json, expected=expected)
            _control(pid, "--zero")
            for _ in range(COUNTED):
                client.call(method, path, token=token, json=json, expected=expected)
            _control(pid, "--dump")
            counts[name] = _dumped(out_dir, f"redis.{pid}.", f"redis-{name}")["Ir"] / COUNTED
    return counts


def main() -> int:
    redis_binary = callgrind_tools()
    if redis_binary is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-redis-instructions-") as tmp:
        counts = measure(redis_binary, Path(tmp))
    print(f"redis-server's instructions a request of ours (callgrind, {COUNTED} after {WARMUP}):")
    for name, count in counts.items():
        print(f"  {name:<14} {count:>9,.0f}")
    print(orjson.dumps({k: round(v) for k, v in counts.items()}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
