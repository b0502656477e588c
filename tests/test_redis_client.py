"""The store's own Redis client (storage/redis/client.py), on a redis-server of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit.redis import RedisProcess

from conversational_core.storage.redis.client import RespClient


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


async def _reads(client: RespClient) -> int:
    """How many reads of its clients' sockets the server has made (this call's included)."""
    info: bytes = await client.call("INFO", "stats")
    line = next(x for x in info.splitlines() if x.startswith(b"total_reads_processed:"))
    return int(line.split(b":")[1])


async def test_the_commands_of_one_loop_turn_go_in_one_write(own_redis: RedisProcess) -> None:
    """Commands issued in one turn of the event loop (concurrent requests, a request and its
    rate-limit count, a worker's deltas of many replies) reach Redis in one write on one
    connection, which Redis takes in one read; the next turn writes to the next connection."""
    client = RespClient(own_redis.url, connections=2)
    try:
        await client.call("PING")
        await client.call("PING")  # (both connections open)
        before = await _reads(client)
        counts = await asyncio.gather(*(client.call("INCR", "turn") for _ in range(20)))
        assert sorted(counts) == list(range(1, 21))
        assert await _reads(client) == before + 2  # the 20 commands, then this INFO
        names = await asyncio.gather(client.call("CLIENT", "ID"), client.call("CLIENT", "ID"))
        assert names[0] == names[1]  # one turn, one connection
        other = await client.call("CLIENT", "ID")
        assert other != names[0]  # the next turn, the next connection
    finally:
        await client.close()
