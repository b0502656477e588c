"""The processes a benchmark run needs: tools it checks for, and the servers it starts and stops.

Every server listens on a free loopback port chosen here and is stopped when the run ends (also
on an error or Ctrl-C; on Linux the children are also told to exit if the benchmark itself dies).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from testkit.ports import free_port

import redis as redis_lib
from bench.client import wait_until_serving

ROOT = Path(__file__).resolve().parents[1]

# The uvicorn settings shared by the service (see conversational_core/cli.py) and the baseline.
UVICORN_OPTIONS = (
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--workers",
    "1",
    "--log-level",
    "warning",
    "--no-server-header",
)


class MissingTool(SystemExit):
    """A binary the benchmark needs is not installed and could not be installed."""


def ensure_binary(binary: str, package: str) -> str:
    """The path of `binary`. When it is missing and we run as root on Debian/Ubuntu, install the
    Debian package (saying so); otherwise stop with a message telling what to install."""
    found = shutil.which(binary)
    if found is not None:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get") is not None:
        print(f"bench: {binary} is missing; installing the Debian package '{package}' (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise MissingTool(
                    f"bench: '{' '.join(argv)}' failed:\n{done.stderr.strip()[-2000:]}"
                )
        found = shutil.which(binary)
        if found is not None:
            return found
    raise MissingTool(
        f"bench: needs '{binary}'. Install it (Debian/Ubuntu: apt-get install {package}; "
        f"macOS: brew install {package}) and run again."
    )


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the benchmark process dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    """A started process whose output goes to a log file (shown when it fails)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; its last output:\n{self.tail()}"
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextlib.contextmanager
def spawn(
    name: str, argv: list[str], workdir: Path, env: Mapping[str, str] | None = None
) -> Iterator[Child]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    child = Child(name, proc, log)
    try:
        yield child
    finally:
        child.stop()


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(
    binary: str,
    workdir: Path,
    prefix: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[Child, str]]:
    """A private redis-server without persistence (after `prefix`, e.g. a valgrind command);
    yields it and its URL."""
    port = free_port()
    argv = [
        *prefix,
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(workdir),
        # (Under valgrind: Redis writes its process title over its environment, where
        # valgrind's control pipes find the names they are made from.)
        *(["--set-proc-title", "no"] if prefix else []),
    ]
    env = {**os.environ, **extra_env} if extra_env is not None else None
    with spawn("redis-server", argv, workdir, env) as child:
        deadline = time.monotonic() + (60 if prefix else 10)
        while not _redis_answers(port):
            child.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer on port {port}")
            time.sleep(0.02)  # polling a process we just spawned: there is no event to wait on
        yield child, f"redis://127.0.0.1:{port}/0"


def service_env(redis_url: str, port: int = 8000) -> dict[str, str]:
    """The environment of `python run.py` for the benchmark: one worker, no rate limits, no
    access lines (the bare app has neither). To measure what they cost, BENCH_EDGES=limits
    turns the per-user rate limit on (raised so that wrk is never refused), BENCH_EDGES=logs the
    access line per request (LOG_LEVEL=INFO), BENCH_EDGES=on both."""
    return {
        **os.environ,
        **edge_env(os.environ.get("BENCH_EDGES", "")),
        **_service_base(redis_url, port),
    }


def edge_env(edges: str) -> dict[str, str]:
    """The rate limit and access lines: both off ("" or "off"), either ("limits", "logs") or
    both ("on": the production configuration; the limit raised so that wrk is never refused).
    With either, ENVIRONMENT=production, as a deployment runs: its access lines are JSON
    (~1,500 ns a line more than the development format's) and its answers carry HSTS."""
    logs, limits = edges in ("on", "logs"), edges in ("on", "limits")
    return {
        "ENVIRONMENT": "production" if logs or limits else "development",
        "LOG_LEVEL": "INFO" if logs else "WARNING",
        "RATE_LIMIT": "100000000/minute" if limits else "off",
    }


def _service_base(redis_url: str, port: int) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": "cc",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",
        "RELOAD": "false",
        "AI_RATE_LIMIT": "off",
        # (A key of its own, which ENVIRONMENT=production takes; tokens are made with it too.)
        "JWT_SECRET": "bench-signing-key-of-more-than-32-bytes",
        # The benchmarks' clients are one user: its thousands of event streams stand for as
        # many users' (the limit is per user).
        "SSE_MAX_STREAMS_PER_USER": "100000",
        "WORKER_METRICS_PORT": "0",  # several workers on one host
    }


@contextlib.contextmanager
def service(
    redis_url: str,
    workdir: Path,
    extra_env: Mapping[str, str] | None = None,
    name: str = "service",
    prefix: Sequence[str] = (),
) -> Iterator[tuple[Child, int]]:
    """The service as users start it, `python run.py` (after `prefix`, e.g. a valgrind
    command); yields it and its port."""
    port = free_port()
    env = {**service_env(redis_url, port), **(extra_env or {})}
    with spawn(name, [*prefix, sys.executable, "run.py"], workdir, env) as child:
        _wait(child, port, "/health", _STARTUP_SECONDS * (4 if prefix else 1))
        yield child, port


def _blocked_job_readers(redis: redis_lib.Redis) -> int:
    """How many Redis clients are blocked in XREADGROUP: the reply workers waiting for jobs."""
    clients = redis.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", ""))


@contextlib.contextmanager
def reply_worker(
    redis_url: str, workdir: Path, env: Mapping[str, str], name: str
) -> Iterator[Child]:
    """A reply worker as its own process, `python run.py worker`, in the service's environment
    plus `env`. It has no port: yields it once one more client is blocked in XREADGROUP (the
    worker waiting for jobs; the API must run none, WORKER_IN_API=false)."""
    full_env = {**service_env(redis_url), **env}
    with redis_lib.Redis.from_url(redis_url, decode_responses=True) as redis:
        before = _blocked_job_readers(redis)
        with spawn(name, [sys.executable, "run.py", "worker"], workdir, full_env) as child:
            deadline = time.monotonic() + 30
            while _blocked_job_readers(redis) <= before:
                child.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} took no jobs within 30 s:\n{child.tail()}")
                time.sleep(0.05)  # polling a process we just spawned: no event to wait on
            yield child


def _uvicorn_app(app: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *UVICORN_OPTIONS,
    ]


def _bench_python_path() -> str:
    return os.pathsep.join(
        [str(ROOT / "src"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )


@contextlib.contextmanager
def bare_app(
    page_file: Path,
    workdir: Path,
    prefix: Sequence[str] = (),
    name: str = "bare-app",
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[tuple[Child, int]]:
    """The baseline (`bench/bare_app.py`) on the same uvicorn settings (after `prefix`);
    yields it and its port."""
    port = free_port()
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONPATH": _bench_python_path(),
        "BENCH_PAGE_FILE": str(page_file),
    }
    argv = [*prefix, *_uvicorn_app("bench.bare_app:app", port)]
    with spawn(name, argv, workdir, env) as child:
        _wait(child, port, "/", _STARTUP_SECONDS * (4 if prefix else 1))
        yield child, port


@contextlib.contextmanager
def fake_llm(workdir: Path) -> Iterator[tuple[Child, int]]:
    """The fake OpenAI-compatible server (`testkit/fake_llm.py`); yields it and its port."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": _bench_python_path()}
    with spawn("fake-llm", _uvicorn_app("testkit.fake_llm:bench_app", port), workdir, env) as child:
        _wait(child, port, "/fake/stats")
        yield child, port


@contextlib.contextmanager
def fake_model(workdir: Path) -> Iterator[tuple[Child, int]]:
    """The relay benchmark's fast fake model (`bench/fake_model.py`); yields it and its port."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": _bench_python_path()}
    argv = [sys.executable, "-m", "bench.fake_model", str(port)]
    with spawn("fake-model", argv, workdir, env) as child:
        _wait(child, port, "/fake/stats")
        yield child, port


_STARTUP_SECONDS = 30.0


def _wait(child: Child, port: int, path: str, timeout: float = _STARTUP_SECONDS) -> None:
    try:
        wait_until_serving(port, path, timeout)
    except RuntimeError as exc:
        raise RuntimeError(f"{child.name}: {exc}\n{child.tail()}") from None
    child.check_alive()


def issue_token(redis_url: str, subject: str, roles: str | None = None) -> str:
    """A token from `python run.py token`, in the service's own environment (same key)."""
    extra = ["--roles", roles] if roles else []
    done = subprocess.run(
        [sys.executable, "run.py", "token", "--sub", subject, "--ttl", "7200", *extra],
        cwd=ROOT,
        env=service_env(redis_url),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()
