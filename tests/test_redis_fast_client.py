"""The Redis store's own pipelined client (storage/redis/client.py), against the real server."""

from __future__ import annotations

import asyncio
import time

from conversational_core.storage.redis.client import RespClient
from tests.conftest import REDIS_URL

_BUSY = 0.1  # how long the event loop's next turn is kept busy


async def _reaches_redis_after(client: RespClient, *, urgent: bool) -> float:
    """Seconds from a command's call to Redis running it (TIME: the same clock), while the
    event loop's next turn is busy."""
    asyncio.get_running_loop().call_soon(time.sleep, _BUSY)
    called = time.time()
    seconds, micros = await client.call("TIME", urgent=urgent)
    return int(seconds) + int(micros) / 1e6 - called


async def test_an_urgent_command_does_not_wait_for_the_next_turn_of_a_busy_loop() -> None:
    """Commands go out with their turn of the event loop, in one write; an urgent one (a
    reply's first delta) is written at once, however busy the next turn is."""
    client = RespClient(REDIS_URL)
    try:
        for _ in range(2):  # (both of its connections open)
            await client.call("PING")
        with_the_turn = await _reaches_redis_after(client, urgent=False)
        at_once = await _reaches_redis_after(client, urgent=True)
    finally:
        await client.close()
    assert with_the_turn >= _BUSY
    assert at_once < _BUSY / 2
