"""Running wrk and reading its figures.

Why wrk: on a 2-core machine a Python load generator needs a whole core to produce a few thousand
requests per second and would be the bottleneck, so its figures would describe the client. wrk (C,
one thread, epoll) saturates a single uvicorn worker with a fraction of a core. A Lua script sets
the method, body and headers, and its `done` hook prints the figures as one JSON line (no parsing
of wrk's human-readable report).
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass

import orjson

_MARKER = "WRK_RESULT "

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%.0f,"duration_us":%.0f,"p50_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,'
    .. '"connect_errors":%.0f,"read_errors":%.0f,"write_errors":%.0f,"status_errors":%.0f,'
    .. '"timeouts":%.0f}\\n',
    "MARKER", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
""".replace("MARKER", _MARKER)


def _lua_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


@dataclass(frozen=True, slots=True)
class WrkRequest:
    """What every request of a run sends."""

    method: str
    path: str
    token: str | None = None
    body: bytes | None = None

    def script(self) -> str:
        lines = [f"wrk.method = {_lua_string(self.method)}"]
        if self.body is not None:
            lines.append(f"wrk.body = {_lua_string(self.body.decode())}")
            lines.append('wrk.headers["Content-Type"] = "application/json"')
        if self.token is not None:
            lines.append(f'wrk.headers["Authorization"] = {_lua_string("Bearer " + self.token)}')
        return "\n".join(lines) + "\n" + _DONE


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(
    binary: str,
    port: int,
    request: WrkRequest,
    *,
    seconds: int,
    connections: int = 32,
    threads: int = 1,
) -> WrkResult:
    """One wrk run of `seconds` against 127.0.0.1:`port`."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as script:
        script.write(request.script())
        script.flush()
        argv = [
            binary,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            script.name,
            f"http://127.0.0.1:{port}{request.path}",
        ]
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=seconds + 30
        )
    line = next((x for x in done.stdout.splitlines() if x.startswith(_MARKER)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = orjson.loads(line[len(_MARKER) :])
    errors = sum(
        int(data[k])
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return WrkResult(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        mean_ms=data["mean_us"] / 1e3,
        errors=errors,
    )


def wrk_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if first else "unknown"
