"""Benchmark: instructions a request, ours in its production configuration beside the bare app,
counted by callgrind.

Why: on this shared 2-core machine requests/s and CPU time per request move by a fifth between
runs of the same code (the README's ranges), more than most changes to the request path. The
number of instructions a server runs for a request does not: valgrind's callgrind counts them
(the same count, within 0.1-1%, from run to run, whatever else the machine does). It counts the
server process's own instructions (Python, its C extensions, libuv), not the kernel's (the
socket calls, alike on both sides) nor time spent waiting, so bare/ours of it is the ratio the
throughput benchmark would give on a quiet machine for the work in user space.

Each server runs under `valgrind --tool=callgrind --instr-atstart=no`, is warmed with
WARMUP requests, then counted over COUNTED requests of each route, one after the other on one
keep-alive connection (`callgrind_control` switches counting on and off and dumps the count).
Then the POST again as the throughput benchmark sends it, from wrk's CONCURRENT connections at
once (CONCURRENT_SECONDS counted, over the requests wrk completed: the up to CONCURRENT
requests it leaves unfinished at the end are counted too, ~1% of them, on both sides alike):
what a request costs a server busy with many, where a turn of the event loop serves several.
Valgrind runs the server ~50 times slower: this takes about a minute and a half.

    PYTHONPATH=src:. python -m bench.instructions   (make bench runs it too)

`--simulate` (this command alone): the one-at-a-time counts with callgrind's simulation of the
caches and the branch predictor (`--cache-sim=yes --branch-sim=yes`), per request: L1
instruction and data misses, last-level misses, mispredicted branches, and a rough cycle
estimate from them. Why: ours runs ~1.1x the bare app's instructions a POST in ~1.4x its user
CPU time, and this machine's `perf` has no hardware counters to say whether the difference is
misses. A simulation, of caches the size of this machine's first and last levels (not its L2,
TLB or a last level shared with other virtual machines); the concurrent count is left out
(twice slower again, wrk's requests time out).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.client import RawClient
from bench.fixtures import create_conversation, message_body
from bench.procs import (
    Child,
    MissingTool,
    bare_app,
    edge_env,
    ensure_binary,
    issue_token,
    redis_server,
)
from bench.procs import service as service_process
from bench.wrk import WrkRequest, run_wrk

WARMUP = 200
COUNTED = 500
CONCURRENT = 32  # wrk's connections, as in the throughput benchmark
CONCURRENT_SECONDS = 20  # ~3,000 requests under valgrind
PAGE_MESSAGES = 50
USER = "bench-user"


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    json: object = None  # the body, as JSON


# What callgrind counts with --cache-sim and --branch-sim (the names of its `events:` line).
MISSES = {
    "L1 instruction misses": ("I1mr",),
    "L1 data misses": ("D1mr", "D1mw"),
    "last-level misses": ("ILmr", "DLmr", "DLmw"),
    "mispredicted branches": ("Bcm", "Bim"),
}
# A rough cycle estimate: an instruction a cycle, plus what the cachegrind manual gives as the
# cost of each miss on a modern machine ("an L1 miss will typically cost around 10 cycles, an LL
# miss can cost as much as 200 cycles, and a mispredicted branch costs in the region of 10 to 30
# cycles"; 20 taken here).
CYCLES = {"L1 instruction misses": 10, "L1 data misses": 10, "last-level misses": 200,
          "mispredicted branches": 20}  # fmt: skip


@dataclass
class Counts:
    """Instructions a request, by route name, for ours and for the bare app; with --simulate,
    every event callgrind counted, a request (`events[side][route][event]`)."""

    ours: dict[str, float]
    bare: dict[str, float]
    events: dict[str, dict[str, dict[str, float]]] | None = None

    def ratio(self, route: str) -> float:
        return self.bare[route] / self.ours[route]

    def to_json(self) -> dict[str, object]:
        return {
            "requests_counted": COUNTED,
            "concurrent_connections": CONCURRENT,
            "ours_production": {k: round(v) for k, v in self.ours.items()},
            "bare": {k: round(v) for k, v in self.bare.items()},
            "bare_over_ours": {k: round(self.ratio(k), 3) for k in self.ours},
            **({"simulated": self.events} if self.events is not None else {}),
        }


def _callgrind(out_dir: Path, name: str, simulate: bool = False) -> list[str]:
    return [
        ensure_binary("valgrind", "valgrind"),
        "--tool=callgrind",
        "--instr-atstart=no",
        *(["--cache-sim=yes", "--branch-sim=yes"] if simulate else []),
        f"--callgrind-out-file={out_dir / name}.%p",
    ]


def _names() -> dict[str, str]:
    """valgrind names the pipes that callgrind_control talks through after the user and the
    host in the environment: the same in the servers' environment and in callgrind_control's.
    (HOST is also the address the service listens on: the loopback one, as the benchmark's.)"""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "bench"
    return {"USER": user, "LOGNAME": user, "HOST": "127.0.0.1", "PYTHONHASHSEED": "0"}


def _control(pid: int, *args: str) -> None:
    subprocess.run(
        ["callgrind_control", *args, str(pid)],
        env={**os.environ, **_names()},
        capture_output=True,
        check=True,
        timeout=60,
    )


_TOTALS = re.compile(rb"^totals: ([\d ]+)$", re.MULTILINE)
_EVENTS = re.compile(rb"^events: ([\w ]+)$", re.MULTILINE)


def _dumped(out_dir: Path, stem: str, label: str) -> dict[str, int]:
    """The counts (by event: `Ir`, and the misses with --simulate) of the dump callgrind
    writes on `--dump` (`<stem><n>`), then removed, or kept
    as `<label>.callgrind` in the folder named by BENCH_CALLGRIND_KEEP (for callgrind_annotate
    or KCachegrind: where the instructions go)."""
    keep = os.environ.get("BENCH_CALLGRIND_KEEP")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in out_dir.glob(stem + "*"):
            text = dump.read_bytes()
            found, events = _TOTALS.search(text), _EVENTS.search(text)
            if found is not None and events is not None:
                if keep:
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    shutil.move(dump, Path(keep) / f"{label}.callgrind")
                else:
                    dump.unlink()
                names = events.group(1).decode().split()
                return dict(zip(names, map(int, found.group(1).split()), strict=True))
        time.sleep(0.1)  # written by valgrind in the server's process: no event to wait on
    raise RuntimeError(f"callgrind wrote no count ({stem}*) within 60 s")


def _count(
    child: Child,
    out_dir: Path,
    name: str,
    port: int,
    routes: list[Route],
    token: str,
    concurrent: bool = True,
) -> dict[str, dict[str, float]]:
    """What callgrind counted a request (by event) of each route on a running server under
    callgrind, and of the first route (the POST) from CONCURRENT connections
    (`<route>_concurrent`) unless `concurrent` is false."""
    pid = child.proc.pid
    counts: dict[str, dict[str, float]] = {}
    wrk = ensure_binary("wrk", "wrk")
    with RawClient(port, timeout=120.0) as client:
        for route in routes:
            expected = 201 if route.method == "POST" else 200
            for _ in range(WARMUP):
                client.call(
                    route.method, route.path, token=token, json=route.json, expected=expected
                )
            _control(pid, "--zero")
            _control(pid, "--instr=on")
            for _ in range(COUNTED):
                client.call(
                    route.method, route.path, token=token, json=route.json, expected=expected
                )
            _control(pid, "--instr=off")
            _control(pid, "--dump")
            dumped = _dumped(out_dir, f"{name}.{pid}.", f"{name}-{route.name}")
            counts[route.name] = {k: v / COUNTED for k, v in dumped.items()}
    if not concurrent:
        return counts
    route = routes[0]
    request = WrkRequest(route.method, route.path, token, orjson.dumps(route.json))
    run_wrk(wrk, port, request, seconds=3, connections=CONCURRENT)  # its connections warmed
    _control(pid, "--zero")
    _control(pid, "--instr=on")
    done = run_wrk(wrk, port, request, seconds=CONCURRENT_SECONDS, connections=CONCURRENT)
    _control(pid, "--instr=off")
    _control(pid, "--dump")
    if done.errors > CONCURRENT or done.requests < COUNTED:
        raise RuntimeError(f"{name}: {done.requests} requests, {done.errors} errors (wrk)")
    dumped = _dumped(out_dir, f"{name}.{pid}.", f"{name}-{route.name}_concurrent")
    counts[f"{route.name}_concurrent"] = {k: v / done.requests for k, v in dumped.items()}
    child.check_alive()
    return counts


def measure(redis_url: str, workdir: Path, simulate: bool = False) -> Counts:
    """Ours (production configuration) and the bare app, each under callgrind, on the
    throughput benchmark's two routes: a POST of a 200-character message and a page of 50
    (`simulate`: with the caches and the branch predictor simulated, see above)."""
    token = issue_token(redis_url, USER)
    out_dir = workdir / "callgrind"
    out_dir.mkdir(exist_ok=True)
    body = orjson.loads(message_body())
    page_file = workdir / "instructions-page.json"
    # No reply worker in the API: its timers (a loop-lag probe every 5 ms) would be counted
    # against the requests, which valgrind makes ~50 times slower, as they are not at speed.
    # (BENCH_INSTRUCTIONS_EDGES=off, logs or limits: ours without them, or with one of them,
    # to count what each costs; `on`, the production configuration, by default.)
    edges = os.environ.get("BENCH_INSTRUCTIONS_EDGES", "on")
    env = {**edge_env(edges), "WORKER_IN_API": "false", **_names()}
    with service_process(
        redis_url,
        workdir,
        env,
        name="service-callgrind",
        prefix=_callgrind(out_dir, "ours", simulate),
    ) as (child, port):
        with RawClient(port, timeout=120.0) as client:
            posts = create_conversation(client, token, "instructions: posts")
            page = create_conversation(client, token, "instructions: page")
            for _ in range(PAGE_MESSAGES):
                client.call(
                    "POST",
                    f"/conversations/{page}/messages",
                    token=token,
                    json=body,
                    expected=201,
                )
            page_path = f"/conversations/{page}/messages?limit={PAGE_MESSAGES}"
            page_file.write_bytes(client.call("GET", page_path, token=token))
        routes = [
            Route("post_message", "POST", f"/conversations/{posts}/messages", body),
            Route("get_page_50", "GET", page_path),
        ]
        ours = _count(child, out_dir, "ours", port, routes, token, not simulate)
    prefix = _callgrind(out_dir, "bare", simulate)
    with bare_app(page_file, workdir, prefix, "bare-callgrind", _names()) as (child, port):
        bare = _count(child, out_dir, "bare", port, routes, token, not simulate)
    return Counts(
        {k: v["Ir"] for k, v in ours.items()},
        {k: v["Ir"] for k, v in bare.items()},
        {"ours": ours, "bare": bare} if simulate else None,
    )


def lines(counts: Counts) -> list[str]:
    names = {
        "post_message": "POST message",
        "get_page_50": "GET page of 50",
        "post_message_concurrent": f"POST, {CONCURRENT} conns",
    }
    return [
        f"{names[k]:<15} ours {counts.ours[k]:>9,.0f}  bare {counts.bare[k]:>9,.0f}  "
        f"bare/ours {counts.ratio(k):.3f}"
        for k in counts.ours
    ]


def simulated_lines(counts: Counts) -> list[str]:
    """Per route: each side's misses a request, ours over bare, and the cycle estimate."""
    if counts.events is None:
        return []
    out = ["Simulated caches and branch predictor (callgrind), a request:"]
    for route in counts.ours:
        sides = {side: counts.events[side][route] for side in ("ours", "bare")}
        sums = {
            side: {"instructions": ev["Ir"]}
            | {name: sum(ev[e] for e in events) for name, events in MISSES.items()}
            for side, ev in sides.items()
        }
        for side in sums:
            sums[side]["estimated cycles"] = sums[side]["instructions"] + sum(
                cost * sums[side][name] for name, cost in CYCLES.items()
            )
        out.append(f"  {route}:")
        for name in sums["ours"]:
            ours, bare = sums["ours"][name], sums["bare"][name]
            out.append(
                f"    {name:<24} ours {ours:>11,.0f}  bare {bare:>11,.0f}  "
                f"ours/bare {ours / bare if bare else float('nan'):.2f}x"
            )
    return out


def callgrind_tools() -> str | None:
    """redis-server's path once valgrind, callgrind_control and redis-server are there
    (installed when missing and it can); None, having said what is missing, otherwise."""
    try:
        ensure_binary("valgrind", "valgrind")
        redis_binary = ensure_binary("redis-server", "redis-server")
    except MissingTool as exc:
        print(exc, file=sys.stderr)
        return None
    if shutil.which("callgrind_control") is None:
        print("bench: callgrind_control is missing (Debian package valgrind)", file=sys.stderr)
        return None
    return redis_binary


def main() -> int:
    parser = argparse.ArgumentParser(description="Instructions a request, ours beside bare.")
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="simulate the caches and the branch predictor (the one-at-a-time counts only)",
    )
    simulate = parser.parse_args().simulate
    redis_binary = callgrind_tools()
    if redis_binary is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            _, redis_url = stack.enter_context(redis_server(redis_binary, workdir))
            counts = measure(redis_url, workdir, simulate)
    edges = os.environ.get("BENCH_INSTRUCTIONS_EDGES", "on")
    configuration = "" if edges == "on" else f"; ours with BENCH_INSTRUCTIONS_EDGES={edges}"
    print(f"Instructions a request (callgrind, {COUNTED} requests after {WARMUP}{configuration}):")
    print("\n".join([*lines(counts), *simulated_lines(counts)]))
    print(orjson.dumps(counts.to_json(), option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
