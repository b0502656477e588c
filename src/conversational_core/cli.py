"""`python run.py [serve|token|…]`: the service's command line."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile

from conversational_core.settings import ConfigError, Settings, load_settings


def _prepare_metrics_dir(workers: int) -> str | None:
    """With several server processes, give them a shared, empty directory for their metric
    samples (observability/metrics.py). Done here, before any process imports
    prometheus_client, which picks single- or multi-process mode at import time. An operator's
    own PROMETHEUS_MULTIPROC_DIR is used, and emptied: a previous run's samples would add up."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        if workers <= 1:
            return None
        directory = tempfile.mkdtemp(prefix="conversational-core-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        return directory  # ours: removed when the server stops
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    return None


def _embedded_problem(settings: Settings) -> str | None:
    """What keeps the embedded store from serving, said before the server starts (else it
    would be a traceback in the server's start-up)."""
    from conversational_core.storage.embedded.lock import data_dir_problem

    if not settings.WORKER_IN_API:
        return (
            "WORKER_IN_API=false needs REDIS_URL: on the embedded store the API process is the "
            "only one that can write replies"
        )
    return data_dir_problem(settings.DATA_DIR)


# The resolver's answers that a name has no address (not that it could not ask).
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _host_problem(host: str) -> str | None:
    """A HOST that names no address is said in one line, before the server starts (uvicorn
    would start the app, then log only the resolver's words). Empty: every interface."""
    if not host:
        return None
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno not in _NO_SUCH_NAME:
            return None  # (e.g. a resolver not ready yet: uvicorn tries, and says)
        return f"HOST={host} is not an address this machine can listen on ({exc.strerror})"
    except UnicodeError as exc:
        return f"HOST={host} is not an address this machine can listen on ({exc})"
    return None


def _serve(settings: Settings) -> int:
    problem = _host_problem(settings.HOST)
    if problem is not None:
        print(f"conversational-core: {problem}", file=sys.stderr)
        return 2
    if not settings.REDIS_URL:
        problem = _embedded_problem(settings)
        if problem is not None:
            print(f"conversational-core: {problem}", file=sys.stderr)
            return 2
    try:
        own_dir = _prepare_metrics_dir(1 if settings.RELOAD else settings.WORKERS)
    except OSError as exc:
        print(
            f"conversational-core: PROMETHEUS_MULTIPROC_DIR cannot be used: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    try:
        _run_uvicorn(settings)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
    return 0


def _run_uvicorn(settings: Settings) -> None:
    import uvicorn

    from conversational_core.serving import uvicorn_options

    uvicorn.run(
        "conversational_core.app:create_app",
        factory=True,
        host=settings.HOST,
        port=settings.PORT,
        reload=settings.RELOAD,
        workers=None if settings.RELOAD else settings.WORKERS,
        # By import path: each server process imports it and reads its limits from the settings.
        http="conversational_core.serving:GuardedHttpToolsProtocol",
        **uvicorn_options(settings),
    )


def _worker(settings: Settings) -> int:
    """Reply workers as a process of their own (Redis only): runs until SIGTERM/SIGINT."""
    import asyncio
    import signal

    from loguru import logger

    from conversational_core.observability.errors import configure_sentry
    from conversational_core.observability.logging import configure_logging
    from conversational_core.observability.metrics import start_metrics_server
    from conversational_core.replies.worker import run_worker
    from conversational_core.runtime import WORKER_THRESHOLDS, settle_gc
    from conversational_core.storage.factory import open_backend

    if not settings.REDIS_URL:
        print(
            "conversational-core: the worker needs REDIS_URL; with the embedded store the API "
            "process runs its own worker",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings)
    configure_sentry(settings, "worker")
    if settings.WORKER_METRICS_PORT:
        # The worker's replies, tokens and timings (the API serves its own /metrics).
        start_metrics_server(settings.WORKER_METRICS_PORT, settings.HOST)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with (
            open_backend(settings, worker=True) as backend,
            run_worker(settings, backend) as worker,
        ):
            settle_gc(WORKER_THRESHOLDS)  # start-up objects live forever: frozen
            logger.info(
                "worker {} started (concurrency {})", worker.name, settings.WORKER_CONCURRENCY
            )
            await stop.wait()
            logger.info("worker {} stopping", worker.name)

    import uvloop

    uvloop.run(main())
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> None:
    from conversational_core.auth.tokens import issue_token

    roles = [r for part in args.roles or [] for r in part.split(",") if r]
    print(issue_token(settings, args.sub, roles, args.ttl))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run.py", description="Conversational Core")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the HTTP API (the default)")
    commands.add_parser("worker", help="run reply workers in this process (needs REDIS_URL)")
    token = commands.add_parser("token", help="print a token signed with the configured key")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--roles", nargs="*", help="roles, e.g. admin or service")
    token.add_argument("--ttl", type=int, default=3600 * 24, help="lifetime in seconds")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"conversational-core: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        _token(settings, args)
    elif args.command == "worker":
        return _worker(settings)
    else:
        return _serve(settings)
    return 0
