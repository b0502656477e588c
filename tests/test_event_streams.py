"""Event streams as a client sees them over HTTP: counted while open, let go when the client
leaves, kept alive while quiet, ended with the hint to reconnect when the server shuts down."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx

from conversational_core.app import create_app
from conversational_core.serving import GuardedHttpToolsProtocol
from conversational_core.storage.base import Store
from conversational_core.storage.redis.events import _Reader
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import backend_for, make_settings
from tests.fixtures.app import auth
from tests.fixtures.live import serve
from tests.fixtures.metrics import value
from tests.fixtures.server import sigterm_received
from tests.test_store_contract import message


@contextlib.asynccontextmanager
async def _conversation_served(
    redis_store: Store, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, str, dict[str, str]]]:
    """A served app on the Redis store (by this service's own protocol: serving.py), a client
    of it, a conversation of alice's and her headers; the event hub closed after."""
    settings = make_settings(**overrides)
    active = backend_for(redis_store, settings)
    alice = auth(settings, "alice")
    async with (
        serve(create_app(settings, backend=active), http=GuardedHttpToolsProtocol) as base,
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


async def test_a_closed_connection_is_freed_at_once(redis_store: Store) -> None:
    """Connections that came and went (event streams, plain requests) are freed when they
    close, not left to the garbage collector: a process holding thousands of streams collects
    its oldest objects rarely (runtime.THRESHOLDS), and each connection left in a reference
    cycle kept ~30 objects, its last request's credentials among them, until then (tens of MB
    more after each 10,000 streams); so is the event reader (a Redis connection) that a
    stream's leaving stopped, the stream having been its last."""

    def ours(o: object) -> bool:
        return isinstance(o, GuardedHttpToolsProtocol | _Reader)

    def held() -> tuple[int, int]:
        """Closed connections and stopped readers still in memory (made by this test)."""
        made = [o for o in gc.get_objects() if ours(o) and id(o) not in earlier]
        return (
            sum(
                1
                for o in made
                if isinstance(o, GuardedHttpToolsProtocol)
                and (o.transport is None or o.transport.is_closing())
            ),
            sum(1 for o in made if isinstance(o, _Reader)),
        )

    async with _conversation_served(redis_store) as (http, cid, alice):
        before = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        gc.collect()
        earlier = {id(o) for o in gc.get_objects() if ours(o)}  # (the served app's own, live)
        gc.disable()  # what the collector would free does not count: only what is freed at once
        try:
            for _ in range(10):  # each a connection of its own, closed after
                async with httpx.AsyncClient(
                    base_url=str(http.base_url), headers=alice, timeout=20
                ) as own:
                    async with own.stream("GET", f"/conversations/{cid}/events") as sse:
                        async for line in sse.aiter_lines():
                            if line.startswith(":"):  # "connected": the stream is open
                                break
                    assert (await own.get(f"/conversations/{cid}")).status_code == 200
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while (left := held()) != (0, 0) and loop.time() < deadline:
                await asyncio.sleep(0.01)  # (polled: the server's side of a close has no hook)
            during = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        finally:
            gc.enable()
    assert left == (0, 0), f"held: {left[0]} closed connections, {left[1]} event readers"
    assert during == before


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


async def _slow_reader(
    http: httpx.AsyncClient, cid: str, alice: dict[str, str], after: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client of the conversation's event stream with a 4 KB receive buffer (so that what
    it does not read backs up into the server's buffers), its request sent."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((http.base_url.host, http.base_url.port or 80))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    resume = f"Last-Event-ID: {after}\r\n" if after is not None else ""
    writer.write(
        f"GET /conversations/{cid}/events HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: {alice['Authorization']}\r\n{resume}\r\n".encode()
    )
    return reader, writer


async def _append_large(store: Store, cid: str, count: int, size: int) -> None:
    for _ in range(count):
        m = message(cid, "x" * size)
        await store.append_messages(cid, "alice", [m], m.created_at)


async def test_a_client_that_stops_reading_is_let_go(redis_store: Store) -> None:
    """A client that opens a stream and stops reading while events keep coming: once a write to
    it has not gone out for a keep-alive interval, its stream ends and its connection is closed
    (uvicorn alone would wait for it forever, holding the subscription)."""
    async with _conversation_served(redis_store, SSE_KEEPALIVE_SECONDS=0.3) as (http, cid, alice):
        before = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        reader, writer = await _slow_reader(http, cid, alice)
        async with asyncio.timeout(10):
            head = b""
            while b": connected" not in head:
                head += await reader.read(4096)
        # Then it reads no more, while 16 MB of events come (far more than the buffers hold).
        await _append_large(redis_store, cid, 160, 100_000)
        async with asyncio.timeout(20):
            while (
                value((await http.get("/metrics")).text, "conversational_core_sse_connections")
                != before
            ):
                await asyncio.sleep(0.05)  # (polled: the stream's end has no hook to wait on)
            received, reset = 0, False
            try:
                while chunk := await reader.read(1 << 20):  # what got through, then the end
                    received += len(chunk)
            except ConnectionResetError:
                reset = True
        writer.close()
    assert received < 16_000_000  # it was cut off, not served to the end
    # Reset, not closed the usual way: the server's kernel holds nothing more for it (it would
    # otherwise go on sending megabytes to a client that does not read, for minutes).
    assert reset


async def test_a_client_on_a_slow_link_gets_a_long_catch_up_whole(redis_store: Store) -> None:
    """A client that reads steadily but slowly (a small receive buffer, a pause between reads)
    and resumes far behind: what it missed is written in pieces it takes well within a
    keep-alive interval, so it gets all of it and is not let go as a client that stopped
    reading. (Written as one write, the catch-up outlasts the interval: it fails so.)"""
    async with _conversation_served(redis_store, SSE_KEEPALIVE_SECONDS=1.0) as (http, cid, alice):
        start = await redis_store.last_event_id(cid) or "0"
        await _append_large(redis_store, cid, 600, 20_000)  # 12 MB of events to catch up on
        reader, writer = await _slow_reader(http, cid, alice, after=start)
        received = bytearray()
        async with asyncio.timeout(60):
            while received.count(b"event: message.created") < 600:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
                await asyncio.sleep(0.008)  # the slow link: a few KB each time, ~1-3 MB/s
        writer.close()
    assert received.count(b"event: message.created") == 600
    assert b"too far behind" not in received


async def test_a_client_that_leaves_with_a_request_pipelined_is_let_go(redis_store: Store) -> None:
    """A client that sends a second request behind its event stream on the same connection
    (HTTP/1.1 pipelining) and closes: its stream ends with the connection, as any other (uvicorn
    tells only the newest request of a connection that its client left)."""
    async with _conversation_served(redis_store) as (http, cid, alice):
        before = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        reader, writer = await asyncio.open_connection(http.base_url.host, http.base_url.port)
        writer.write(
            f"GET /conversations/{cid}/events HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: {alice['Authorization']}\r\n\r\n"
            "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            head = b""
            while b": connected" not in head:
                head += await reader.read(4096)
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(10):  # (the keep-alive interval is 15 s: not what ends it)
            while (
                value((await http.get("/metrics")).text, "conversational_core_sse_connections")
                != before
            ):
                await asyncio.sleep(0.02)  # (polled: the stream's end has no hook to wait on)


async def test_a_resume_point_the_conversation_cannot_have_is_refused(redis_store: Store) -> None:
    """A Last-Event-ID later than the conversation's newest event (from the future, or of
    another store: the embedded one's ids read as far-future milliseconds), or beyond what Redis
    can read, is a 422 before any stream starts (an EventSource stops retrying on it), not a
    stream that would skip every event or fail."""
    async with _conversation_served(redis_store) as (http, cid, alice):
        m = message(cid, "hello")
        await redis_store.append_messages(cid, "alice", [m], m.created_at)
        last = await redis_store.last_event_id(cid)
        assert last is not None
        ms, _, seq = last.partition("-")
        url = f"/conversations/{cid}/events"
        for unknown in (
            f"{int(ms) + 3_600_000}-{seq}",
            "1796073453891062",
            "18446744073709551616",
            "18446744073709551615-18446744073709551615",
        ):
            for request in (
                {"headers": {**alice, "Last-Event-ID": unknown}},
                {"headers": alice, "params": {"last_event_id": unknown}},
            ):
                response = await http.get(url, **request)  # type: ignore[arg-type]
                assert response.status_code == 422, (unknown, response.text)
                problem = response.json()
                assert problem["errors"][0]["type"] == "unknown_event_id"
                assert response.headers["content-type"] == "application/problem+json"


async def test_a_resume_past_expired_events_opens_with_a_resync(redis_store: RedisStore) -> None:
    """A Last-Event-ID after which events are no longer retained (here the stream expired; the
    contract suite covers trimming): the stream opens with a `conversation.resync` event that
    names it (read the conversation again), then goes on with what comes next, rather than
    resuming as if nothing had been missed."""
    async with _conversation_served(redis_store) as (http, cid, alice):
        m = message(cid, "hello")
        await redis_store.append_messages(cid, "alice", [m], m.created_at)
        seen = await redis_store.last_event_id(cid)
        assert seen is not None
        await redis_store.redis.call("DEL", redis_store.keys.events(cid))  # (as its TTL does)
        headers = {**alice, "Last-Event-ID": seen}
        async with http.stream("GET", f"/conversations/{cid}/events", headers=headers) as sse:
            assert sse.status_code == 200
            lines = sse.aiter_lines()
            received: list[str] = []
            async with asyncio.timeout(10):
                async for line in lines:
                    received.append(line)
                    if line.startswith("data:") and "conversation.resync" in "".join(received):
                        break
                m = message(cid, "next")
                await redis_store.append_messages(cid, "alice", [m], m.created_at)
                async for line in lines:
                    received.append(line)
                    if line.startswith("data:") and '"next"' in line:
                        break
    events = [line for line in received if line.startswith(("id:", "event:", "data:"))]
    assert events[:3] == [
        f"id: {seen}",
        "event: conversation.resync",
        f'data: {{"conversation_id":"{cid}","last_event_id":"{seen}"}}',
    ]
    assert events[4] == "event: message.created"


async def test_a_resume_id_may_come_with_blanks_around_it(redis_store: Store) -> None:
    """Blanks around a header's value are not part of it (RFC 9110, 5.5): the stream resumes.
    (A raw request: httpx refuses to send such a header.)"""
    async with _conversation_served(redis_store) as (http, cid, alice):
        m = message(cid, "first")
        await redis_store.append_messages(cid, "alice", [m], m.created_at)
        start = await redis_store.last_event_id(cid)
        m = message(cid, "second")
        await redis_store.append_messages(cid, "alice", [m], m.created_at)
        reader, writer = await asyncio.open_connection(http.base_url.host, http.base_url.port)
        writer.write(
            f"GET /conversations/{cid}/events HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: {alice['Authorization']}\r\nLast-Event-ID:  {start}\t \r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = b""
        async with asyncio.timeout(10):
            while b"data:" not in received:
                received += await reader.read(4096)
        writer.close()
    head = received.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert head[0] == b"http/1.1 200 ok"
    # One Connection header, the server's (the response sets none of its own).
    assert [h for h in head if h.startswith(b"connection:")] == [b"connection: close"]
    assert b'"content":"second"' in received
    assert b'"content":"first"' not in received


async def test_a_user_holds_a_bounded_number_of_streams(redis_store: Store) -> None:
    """SSE_MAX_STREAMS_PER_USER streams of one user at once; one more is a 429 (with
    Retry-After) that costs the others nothing; another user is not affected; a stream that
    ends gives its place back."""
    async with (
        _conversation_served(redis_store, SSE_MAX_STREAMS_PER_USER=2) as (http, cid, alice),
        contextlib.AsyncExitStack() as open_streams,
    ):
        url = f"/conversations/{cid}/events"
        before = value((await http.get("/metrics")).text, "conversational_core_sse_connections")
        held = []
        for _ in range(2):
            sse = await open_streams.enter_async_context(http.stream("GET", url, headers=alice))
            assert sse.status_code == 200
            held.append(sse)
        refused = await http.get(url, headers=alice)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert int(refused.headers["retry-after"]) > 0
        # Bob's own conversation: his streams are his.
        settings = make_settings()
        bob = auth(settings, "bob")
        bobs = (await http.post("/conversations", json={}, headers=bob)).json()["id"]
        async with http.stream("GET", f"/conversations/{bobs}/events", headers=bob) as sse:
            assert sse.status_code == 200
        await held[0].aclose()  # alice closes one: once the server has seen it, she may again
        async with asyncio.timeout(10):
            while (
                value((await http.get("/metrics")).text, "conversational_core_sse_connections")
                != before + 1
            ):
                await asyncio.sleep(0.02)  # (polled: the stream's end has no hook to wait on)
        async with http.stream("GET", url, headers=alice) as sse:
            assert sse.status_code == 200
