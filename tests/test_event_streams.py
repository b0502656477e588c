"""Event streams as a client sees them over HTTP: counted while open, let go when the client
leaves, kept alive while quiet, ended with the hint to reconnect when the server shuts down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from conversational_core.app import create_app
from conversational_core.storage.base import Store
from tests.conftest import backend_for, make_settings
from tests.fixtures.app import auth
from tests.fixtures.live import serve
from tests.fixtures.metrics import value
from tests.fixtures.server import sigterm_received


@contextlib.asynccontextmanager
async def _conversation_served(
    redis_store: Store, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, str, dict[str, str]]]:
    """A served app on the Redis store, a client of it, a conversation of alice's and her
    headers; the event hub closed after."""
    settings = make_settings(**overrides)
    active = backend_for(redis_store, settings)
    alice = auth(settings, "alice")
    async with (
        serve(create_app(settings, backend=active)) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as http,
    ):
        cid = (await http.post("/conversations", json={}, headers=alice)).json()["id"]
        yield http, cid, alice
    await active.events.close()


async def test_open_event_streams_are_counted(redis_store: Store) -> None:
    async with _conversation_served(redis_store) as (http, cid, alice):
        before = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        async with http.stream("GET", f"/conversations/{cid}/events", headers=alice) as sse:
            lines = sse.aiter_lines()  # kept: a finalized line iterator closes the stream
            async for line in lines:
                if line.startswith(":"):  # the "connected" comment: the stream is open
                    break
            during = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        # The client went away: the server notices and lets the stream (and its
        # subscription) go, with no event to write to it.
        after = during
        for _ in range(500):
            after = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
            if after == before:
                break
            await asyncio.sleep(0.01)  # (polled: the server's side of the close has no hook)
    assert during == before + 1
    assert after == before


async def test_a_quiet_event_stream_gets_keep_alive_comments(redis_store: Store) -> None:
    async with _conversation_served(redis_store, SSE_KEEPALIVE_SECONDS=0.2) as (http, cid, alice):
        comments: list[str] = []
        async with http.stream("GET", f"/conversations/{cid}/events", headers=alice) as sse:
            lines = sse.aiter_lines()
            async with asyncio.timeout(10):
                async for line in lines:
                    if line.startswith(":"):
                        comments.append(line)
                    if len(comments) == 3:  # "connected", then two keep-alives
                        break
    assert comments[0].startswith(": connected")
    assert all("ping" in c for c in comments[1:]), comments


async def test_open_event_streams_end_with_the_hint_when_the_server_shuts_down(
    redis_store: Store,
) -> None:
    """uvicorn waits for open responses after SIGTERM, and an event stream never ends by
    itself: each ends at once with the hint to reconnect, and nothing stays open."""
    async with _conversation_served(redis_store) as (http, cid, alice):
        before = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        async with http.stream("GET", f"/conversations/{cid}/events", headers=alice) as sse:
            lines = sse.aiter_lines()
            async for line in lines:
                if line.startswith(": connected"):
                    break
            with sigterm_received():
                async with asyncio.timeout(10):
                    rest = [line async for line in lines]
        after = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
    assert ": the server is restarting; reconnect with Last-Event-ID" in rest
    assert "retry: 2000" in rest
    assert after == before
