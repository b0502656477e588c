"""Hostile and broken clients against `python run.py` (a real server process): huge headers,
trickled headers and bodies, idle connections, too many connections. Each costs the service
nothing and it stays healthy throughout."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import make_settings
from tests.fixtures.app import auth
from tests.fixtures.server import Service, start_service

_GUARD = {
    "MAX_REQUEST_HEADER_BYTES": "32768",
    "REQUEST_HEADERS_TIMEOUT_SECONDS": "2",
    "REQUEST_BODY_MIN_RATE": "1024",
    "REQUEST_BODY_GRACE_SECONDS": "2",
    "KEEPALIVE_TIMEOUT_SECONDS": "1",
    "LOG_LEVEL": "WARNING",
}


@contextlib.contextmanager
def _service(tmp_path: Path, **env: str) -> Iterator[Service]:
    settings = {"REDIS_URL": "", "DATA_DIR": str(tmp_path / "data"), **_GUARD, **env}
    settings["LOG_LEVEL"] = "INFO"  # the start-up line is the event start_service waits for
    with start_service(settings) as service:
        yield service


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _port(service: Service) -> int:
    return int(service.url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def _connection(
    service: Service,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(service))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, {k.lower(): v for k, v in headers.items()}, orjson.loads(body)


class _Health:
    """Asks /health/live over and over while a test runs: the service stays healthy."""

    def __init__(self, service: Service) -> None:
        self.url = service.url + "/health/live"
        self.answers: list[tuple[int, float]] = []  # (status, seconds)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while not self._stop.is_set():
                began = time.perf_counter()
                response = await client.get(self.url)
                self.answers.append((response.status_code, time.perf_counter() - began))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.1)

    def check(self) -> None:
        self._stop.set()
        assert self.answers, "the health loop never ran"
        assert all(status == 200 for status, _ in self.answers), self.answers
        assert max(seconds for _, seconds in self.answers) < 1.0, self.answers


@contextlib.asynccontextmanager
async def _healthy_throughout(service: Service) -> AsyncIterator[None]:
    health = _Health(service)
    task = asyncio.create_task(health.run())
    try:
        yield
    except BaseException:
        task.cancel()
        raise
    await asyncio.sleep(0)  # (a body that never awaited still gives the loop one turn)
    health.check()
    await task


async def test_a_16_mb_header_is_refused_431_at_once_without_growing_the_process(
    tmp_path: Path,
) -> None:
    with _service(tmp_path) as service:
        async with _healthy_throughout(service):
            before = _rss_kb(service.proc.pid)
            for _ in range(3):
                async with _connection(service) as (reader, writer):
                    began = time.perf_counter()
                    writer.write(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
                    writer.write(b"a" * (16 * 1024 * 1024))  # buffered: sent while we read
                    raw = await asyncio.wait_for(reader.read(), 5)
                    elapsed = time.perf_counter() - began
                status, headers, body = _parse(raw)
                assert status == 431 and elapsed < 1.0, (status, elapsed)
                assert headers["content-type"] == "application/problem+json"
                assert headers["connection"] == "close"
                assert body["status"] == 431 and "32768" in str(body["detail"])
            after = _rss_kb(service.proc.pid)
        # Three 16 MB headers later the process holds what it held (within allocator noise).
        assert after - before < 4 * 1024, (before, after)


async def _trickle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, byte: bytes
) -> tuple[bytes, float, int]:
    """Send `byte` once a second (at most ten times) until the server has answered and closed;
    what it answered, after how long, and how many bytes were sent."""
    began = time.perf_counter()
    raw = b""
    sent = 0
    while sent < 10 and not reader.at_eof():
        writer.write(byte)
        sent += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # (a cancelled read loses nothing it had not read)
                while chunk := await reader.read(65536):
                    raw += chunk
    return raw, time.perf_counter() - began, sent


async def test_headers_that_trickle_are_cut_off_at_the_deadline(tmp_path: Path) -> None:
    with _service(tmp_path) as service:
        async with _healthy_throughout(service), _connection(service) as (reader, writer):
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n")
            raw, elapsed, _ = await _trickle(reader, writer, b"X")  # one header byte a second
        status, headers, body = _parse(raw)
        assert status == 408 and body["detail"] == "The request headers did not arrive in time."
        assert len(headers["x-request-id"]) == 32  # (every response has one: API.md)
        # REQUEST_HEADERS_TIMEOUT_SECONDS=2, checked every second.
        assert 2.0 <= elapsed < 4.0, elapsed


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x00b\r\n\r\n",
        b"POST /conversations HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["not-http", "nul-in-a-header", "length-and-chunked"],
)
async def test_bytes_that_are_not_http_get_a_problem_400(
    tmp_path: Path, request_bytes: bytes
) -> None:
    """What the HTTP parser refuses is answered as every error of the service is: a
    problem+json 400 with an X-Request-ID (not the server library's text/plain), and the
    connection closed."""
    with _service(tmp_path) as service:
        async with _connection(service) as (reader, writer):
            writer.write(request_bytes)
            async with asyncio.timeout(10):
                raw = await reader.read()  # to the end: the server closes the connection
        status, headers, body = _parse(raw)
        assert status == 400
        assert headers["content-type"] == "application/problem+json"
        assert body["status"] == 400 and body["detail"] == "The request is not valid HTTP/1.1."
        assert len(headers["x-request-id"]) == 32


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses one after the other on a connection (each with a Content-Length)."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        answers.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return answers


_LIVE = b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n"
_BIG_HEADER = b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40_000
_NOT_HTTP = b"FOO /x HTTP/1.1\r\nHost: localhost\r\n\r\n"


async def test_refusals_are_answered_on_a_reused_connection_and_in_their_turn(
    tmp_path: Path,
) -> None:
    """A refusal of the guard (431, 400) reaches a client that reuses its connection (every
    pooled client), not only a fresh one; a request refused behind others pipelined before it
    is answered after them, theirs first."""
    with _service(tmp_path) as service:
        for refused, status in [(_BIG_HEADER, 431), (_NOT_HTTP, 400)]:
            async with _connection(service) as (reader, writer):  # one request, then the next
                writer.write(_LIVE)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                writer.write(refused)
                async with asyncio.timeout(10):
                    answers = _responses(await reader.read())
            assert [answer[0] for answer in answers] == [status], answers
            assert answers[0][1]["content-type"] == "application/problem+json"
            assert orjson.loads(answers[0][2])["status"] == status

            async with _connection(service) as (reader, writer):  # pipelined: one write
                writer.write(_LIVE + _LIVE + refused)
                async with asyncio.timeout(10):
                    answers = _responses(await reader.read())
            assert [answer[0] for answer in answers] == [200, 200, status], answers
            assert orjson.loads(answers[0][2]) == {"status": "ok"}
            assert len(answers[2][1]["x-request-id"]) == 32


async def test_a_body_trickling_at_one_byte_a_second_is_cut_off(tmp_path: Path) -> None:
    with _service(tmp_path) as service:
        async with _healthy_throughout(service), _connection(service) as (reader, writer):
            token = auth(make_settings(), "alice")["Authorization"].encode()
            writer.write(
                b"POST /conversations HTTP/1.1\r\nHost: localhost\r\nAuthorization: "
                + token
                + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            )
            raw, elapsed, sent = await _trickle(reader, writer, b" ")  # 1 byte/s
        status, _, body = _parse(raw)
        assert status == 408 and body["detail"] == "The request body arrived too slowly."
        # REQUEST_BODY_GRACE_SECONDS=2, then at least 1024 bytes/s on average: cut off in the
        # first check after the grace time (checks run every second).
        assert 2.0 <= elapsed < 4.5 and sent < 6, (elapsed, sent)


async def test_idle_connections_are_closed_after_the_keepalive_timeout(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    with _service(tmp_path) as service:
        async with _healthy_throughout(service):
            connections = []
            for _ in range(2000):
                connections.append(await asyncio.open_connection("127.0.0.1", _port(service)))
            # One that asked something first, then fell idle.
            reader, writer = await asyncio.open_connection("127.0.0.1", _port(service))
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            connections.append((reader, writer))
            opened = time.perf_counter()

            async def closed_by_server(reader: asyncio.StreamReader) -> float:
                await reader.read()  # b"" at EOF: the server closed it
                return time.perf_counter() - opened

            async with asyncio.timeout(10):
                waited = await asyncio.gather(*(closed_by_server(r) for r, _ in connections))
            for _, writer in connections:
                writer.close()
        # KEEPALIVE_TIMEOUT_SECONDS=1, checked every second.
        assert max(waited) < 3.5, max(waited)


async def test_connections_over_the_cap_are_refused_cleanly(tmp_path: Path) -> None:
    with _service(tmp_path, MAX_CONNECTIONS="40", KEEPALIVE_TIMEOUT_SECONDS="30") as service:
        held = [await asyncio.open_connection("127.0.0.1", _port(service)) for _ in range(40)]
        async with _connection(service) as (reader, writer):
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, body = _parse(await asyncio.wait_for(reader.read(), 5))
        assert status == 503 and headers["retry-after"] == "1", (status, headers)
        assert body["detail"] == "This server has too many open connections; retry shortly."
        for _, writer in held[:5]:
            writer.close()
            await writer.wait_closed()
        # With connections free again, the service answers.
        async with httpx.AsyncClient(timeout=5) as client:
            for _ in range(50):  # until the server has seen the closes
                response = await client.get(service.url + "/health/live")
                if response.status_code == 200:
                    break
                await asyncio.sleep(0.05)
        assert response.status_code == 200
        for _, writer in held[5:]:
            writer.close()


@pytest.mark.parametrize("size", [30_000, 40_000])
async def test_headers_within_the_limit_pass(tmp_path: Path, size: int) -> None:
    with _service(tmp_path) as service:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(
                service.url + "/health/live", headers={"X-Filler": "a" * size}
            )
    assert response.status_code == (200 if size < 32_768 - 200 else 431)


async def test_a_request_with_two_hosts_or_two_credentials_is_refused(tmp_path: Path) -> None:
    """Two Host headers (RFC 9112: a 400; ALLOWED_HOSTS checked one while a proxy may route by
    the other) and two Authorization headers (which one is meant?) are refused, not served."""
    settings = make_settings()
    bearer = auth(settings, "alice")["Authorization"].encode()
    with _service(tmp_path, ALLOWED_HOSTS="api.example.com") as service:
        for head, status in [
            (b"Host: evil.example\r\nHost: api.example.com\r\n", 400),
            (b"Host: api.example.com\r\nHost: api.example.com\r\n", 400),
            (
                b"Host: api.example.com\r\nAuthorization: Bearer x\r\nAuthorization: "
                + bearer
                + b"\r\n",
                401,
            ),
            (b"Host: api.example.com\r\nAuthorization: " + bearer + b"\r\n", 200),
        ]:
            async with _connection(service) as (reader, writer):
                writer.write(
                    b"GET /conversations HTTP/1.1\r\n"
                    + head
                    + b"Authorization: "
                    + bearer
                    + b"\r\nConnection: close\r\n\r\n"
                    if b"Authorization" not in head
                    else b"GET /conversations HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n"
                )
                async with asyncio.timeout(10):
                    raw = await reader.read()
            assert raw.startswith(b"HTTP/1.1 %d " % status), (head, raw[:200])


async def test_a_target_in_absolute_form_is_held_to_the_allowed_hosts(tmp_path: Path) -> None:
    """`GET http://host/path` names the host it is for (RFC 9112): that host is the one held
    to ALLOWED_HOSTS, not a Host header beside it."""
    bearer = auth(make_settings(), "alice")["Authorization"].encode()
    with _service(tmp_path, ALLOWED_HOSTS="api.example.com") as service:
        for target, status in [
            (b"http://evil.example/conversations", 400),
            (b"http://api.example.com/conversations", 200),
            (b"/conversations", 200),
        ]:
            async with _connection(service) as (reader, writer):
                writer.write(
                    b"GET " + target + b" HTTP/1.1\r\nHost: api.example.com\r\n"
                    b"Authorization: " + bearer + b"\r\nConnection: close\r\n\r\n"
                )
                async with asyncio.timeout(10):
                    raw = await reader.read()
            assert raw.startswith(b"HTTP/1.1 %d " % status), (target, raw[:200])


async def test_a_head_whose_end_straddles_two_reads_is_read_whole(tmp_path: Path) -> None:
    """The blank line that ends a request's headers may come in two reads (TCP splits where
    it likes); the body behind it is a body, not more headers (a 40 KB body got a 431)."""
    settings = make_settings()
    bearer = auth(settings, "alice")["Authorization"].encode()
    metadata = {f"k{i}": "v" * 512 for i in range(16)}
    body = orjson.dumps({"title": "t", "system_prompt": "x" * 32_000, "metadata": metadata})
    assert len(body) > 32_768  # (past the header limit: counted as headers, it was a 431)
    head = (
        b"POST /conversations HTTP/1.1\r\nHost: localhost\r\nAuthorization: " + bearer
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
    )  # fmt: skip
    with _service(tmp_path) as service:
        async with _connection(service) as (reader, writer):
            writer.write(head[:-1])
            await writer.drain()
            await asyncio.sleep(0.1)  # (two reads on the server's side: time is the point)
            writer.write(head[-1:] + body)
            async with asyncio.timeout(10):
                raw = await reader.read()
    assert raw.startswith(b"HTTP/1.1 201 "), raw[:300]


async def test_an_http_10_client_reads_an_event_stream_without_chunk_sizes(
    tmp_path: Path,
) -> None:
    """HTTP/1.0 has no chunked coding: an event stream to a 1.0 client (an old proxy, a plain
    socket client) is sent as it is and ends with the connection, not framed in chunk sizes
    that the client would read as events."""
    headers = auth(make_settings(), "alice")
    with _service(tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.url, headers=headers) as api:
            cid = (await api.post("/conversations", json={})).json()["id"]
            async with _connection(service) as (reader, writer):
                writer.write(
                    f"GET /conversations/{cid}/events HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: {headers['Authorization']}\r\n\r\n".encode()
                )
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                    posted = await api.post(
                        f"/conversations/{cid}/messages", json={"content": "hi", "respond": False}
                    )
                    assert posted.status_code == 201
                    body = await reader.readuntil(b"event: message.created\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head
            assert b"transfer-encoding" not in head.lower() and b"connection: close" in head
            # The body is the events themselves: no chunk size (hex digits) before them.
            assert body.startswith(b": connected\r\n"), body[:80]
