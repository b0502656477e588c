"""Free loopback ports for the servers the tests and benchmarks start."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from starlette.types import ASGIApp


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; a race with another process binding it
    in between is possible, and the callers that care retry)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServedApp:
    """An ASGI app served by uvicorn on a free loopback port, in the current event loop (the
    fake model servers): ``async with`` it, or :meth:`start` and :meth:`stop`."""

    def __init__(self, app: ASGIApp) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.005)  # uvicorn exposes no start event

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> ServedApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
