"""The HTTP server: uvicorn (uvloop + httptools) with a guard against hostile and broken clients.

A service that faces the internet must not let one client hold memory or connections for
nothing. uvicorn with httptools reads any header size into memory (16 MB headers are answered
200), waits forever for the headers or the body of a request that trickles in, leaves a
connection that never sends a byte open, and has no cap on open connections (its
`limit_concurrency` answers plain-text 503s to requests, and counts running tasks too). None of
that can be fixed in ASGI middleware: by the time the app is called the headers are parsed and
in memory. So this module subclasses uvicorn's httptools protocol (pinned version: it relies on
the protocol's callbacks, which are uvicorn's documented extension point for `--http`):

- **Header size** (`MAX_REQUEST_HEADER_BYTES`): the request line and headers are counted as
  they arrive and the parser is never fed past the limit: 431 problem, connection closed.
- **Header deadline** (`REQUEST_HEADERS_TIMEOUT_SECONDS`): from a request's first byte to the
  end of its headers: 408 problem, connection closed.
- **Body rate** (`REQUEST_BODY_MIN_RATE` bytes/s after `REQUEST_BODY_GRACE_SECONDS`): a body
  that arrives slower than that on average (while the app is reading it) is cut off: 408.
- **Idle connections** (`KEEPALIVE_TIMEOUT_SECONDS`): a new connection must send its first byte
  within it, and uvicorn closes a keep-alive connection idle that long after a response.
- **Open connections** (`MAX_CONNECTIONS` per process, lowered to what the open-file limit
  allows): one more is answered 503 problem with `Retry-After` and closed.

Refusals are written straight to the socket (problem+json, `Connection: close`) and followed by
a lingering close: the server stops reading into memory but drains and discards what the client
is still sending for a moment, so that the client reads the refusal instead of a reset.

Deadlines are checked by one timer per process each second, not one per request: the request
path only records a timestamp. A deadline therefore fires within a second after it is due.

What it costs is measured by `make bench` (the figures in the README are with the guard on).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import resource
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
import uuid_utils
from loguru import logger
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from conversational_core.observability import metrics
from conversational_core.settings import Settings, load_settings

# Descriptors kept free for everything but client connections (Redis, files, the provider).
_RESERVED_FDS = 256
_SWEEP_SECONDS = 1.0
_LINGER_SECONDS = 2.0
_LINGER_MAX_BYTES = 64 * 1024 * 1024

# A scope extension this server's requests carry: resets their connection at once, what is not
# sent yet dropped.
ABORT = "conversational_core.abort"

_LINGER_NONE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection

# Connection phases.
_NEW = 0  # accepted, no byte yet
_HEAD = 1  # reading a request's line and headers
_BODY = 2  # headers done, reading the body (or the request had none)
_WAIT = 3  # the request is in; the app answers (any length of time: streams)
_DONE = 4  # refused: draining what the client still sends, then closing
_DEFERRED = 5  # refused behind requests still being answered: drained; answered after them


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_header_bytes: int
    headers_timeout: float
    body_min_rate: int  # bytes/s; 0: no minimum
    body_grace: float
    idle_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_header_bytes=settings.MAX_REQUEST_HEADER_BYTES,
            headers_timeout=settings.REQUEST_HEADERS_TIMEOUT_SECONDS,
            body_min_rate=settings.REQUEST_BODY_MIN_RATE,
            body_grace=settings.REQUEST_BODY_GRACE_SECONDS,
            idle_timeout=settings.KEEPALIVE_TIMEOUT_SECONDS,
            max_connections=connection_cap(settings.MAX_CONNECTIONS),
        )


def connection_cap(configured: int) -> int:
    """MAX_CONNECTIONS, lowered to what the process may open. The soft open-file limit is first
    raised to the hard one (as nginx's worker_rlimit_nofile does): a default soft limit of 1024
    would otherwise refuse connections with EMFILE at accept, which clients see as a hang."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        target = configured + _RESERVED_FDS if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return configured
    allowed = max(1, soft - _RESERVED_FDS)
    if allowed < configured:
        logger.warning(
            "MAX_CONNECTIONS={} exceeds what the open-file limit allows; using {}",
            configured,
            allowed,
        )
    return min(configured, allowed)


def _problem(status: int, reason: bytes, detail: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps(
        {
            "type": f"https://conversational-core.dev/problems/http-{status}",
            "title": reason.decode(),
            "status": status,
            "detail": detail,
        }
    )
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n%s\r\n" % (status, reason, len(body), extra)
    ) + body


_TOO_MANY = _problem(
    503,
    b"Service Unavailable",
    "This server has too many open connections; retry shortly.",
    b"retry-after: 1\r\n",
)
_HEADERS_SLOW = _problem(408, b"Request Timeout", "The request headers did not arrive in time.")
_BODY_SLOW = _problem(408, b"Request Timeout", "The request body arrived too slowly.")
_MALFORMED = _problem(400, b"Bad Request", "The request is not valid HTTP/1.1.")


def _with_request_id(response: bytes) -> bytes:
    """Every response carries an X-Request-ID (API.md), these too: one of their own (no request
    was read to take the client's from)."""
    at = response.index(b"\r\n") + 2
    return b"%sx-request-id: %s\r\n%s" % (
        response[:at],
        uuid_utils.uuid4().hex.encode(),
        response[at:],
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (see the module docstring)."""

    limits: ClassVar[ConnectionLimits | None] = None  # None: read from the environment

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = self._resolve_limits()
        self._phase = _NEW
        self._since = 0.0  # when the current phase began
        self._head_bytes = 0
        self._body_bytes = 0
        # Requests answered while a pipelined one came in behind them (see connection_lost).
        self._ahead: list[Any] = []
        self._deferred = b""  # a refusal waiting for the answers ahead of it (_DEFERRED)
        self._head_tail = b""  # the last bytes of the request head read so far

    @classmethod
    def _resolve_limits(cls) -> ConnectionLimits:
        if cls.limits is None:
            # `python run.py` names this class by its import path (each server process imports
            # it anew): the settings are read once per process, as the app factory reads them.
            cls.limits = ConnectionLimits.from_settings(load_settings())
        return cls.limits

    # Connection --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # What a request's scope is given to drop the client (ABORT): bound to the transport,
        # not to this protocol. A method of the protocol in the scope, which the protocol holds,
        # made each connection a reference cycle that outlived it: ~30 objects (its last
        # request's scope among them, with the caller's credentials) left for the collector's
        # full collections, which a process holding thousands of streams runs rarely
        # (runtime.THRESHOLDS): 55-90 MB more resident after each 10,000 event streams had come
        # and gone. Without the cycle a closed connection is freed at once.
        self._abort = functools.partial(_reset_connection, transport)
        if len(self.connections) >= self._limits.max_connections:
            self.transport = transport
            metrics.CONNECTIONS_REFUSED.labels("max_connections").inc()
            self._refuse(_TOO_MANY)
            return
        super().connection_made(transport)
        self._since = self.loop.time()
        _Sweeper.watch(self)

    def data_received(self, data: bytes) -> None:
        while data:
            phase = self._phase
            if phase >= _DONE:  # refused: drain and discard
                self._body_bytes += len(data)
                if self._body_bytes > _LINGER_MAX_BYTES:
                    self.transport.close()
                return
            if phase == _BODY:
                # (Requests pipelined behind this body in the same read are parsed unaccounted:
                # at most one read's worth.)
                self._body_bytes += len(data)
                super().data_received(data)
                return
            # _NEW, _HEAD, or _WAIT: a request pipelined behind one being answered. Its line
            # and headers are accounted up to their end, so that each of several requests in
            # one read is held to the limit on its own.
            if phase == _NEW:
                self._phase = _HEAD
                self._since = self.loop.time()
            # (The blank line that ends them may straddle two reads: looked for with the last
            # bytes of the head read so far.)
            tail = self._head_tail
            end = (tail + data if tail else data).find(b"\r\n\r\n")
            piece = data if end < 0 else data[: end + 4 - len(tail)]
            self._head_tail = b"" if end >= 0 else (tail + piece)[-3:]
            if len(piece) > self._limits.max_header_bytes - self._head_bytes:
                # Never parse (and so hold) more than the limit of request line and headers.
                if not self.transport.is_closing():
                    metrics.CONNECTIONS_REFUSED.labels("header_too_large").inc()
                    self._reject(431, b"Request Header Fields Too Large")
                return
            self._head_bytes += len(piece)
            super().data_received(piece)
            data = data[len(piece) :]

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not HTTP/1.1 (uvicorn's parser refused them): uvicorn answers a
        text/plain 400 of its own; this service's errors are problem+json (API.md)."""
        metrics.CONNECTIONS_REFUSED.labels("malformed").inc()
        self._refuse(_MALFORMED)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._since = self.loop.time()
        self._head_bytes = 0
        self._body_bytes = 0
        earlier = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not earlier:  # (else an upgrade: no cycle of its own)
            cycle.__class__ = _Cycle  # (its task has not run yet: every `send` is _Cycle's)
            if earlier is not None and not earlier.response_complete:
                self._ahead.append(earlier)  # this request is pipelined behind it
        # The means to drop a client that stopped reading mid-response (replies/sse.py), which
        # ASGI does not give: uvicorn's `send` waits for it to read, forever.
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[ABORT] = self._abort
        if self.url[:8].lower().startswith((b"http://", b"https://")):
            self._target_is_the_host()

    def _target_is_the_host(self) -> None:
        """A request target in absolute form (`GET http://host/path`) names the host it is
        for (RFC 9112 3.2.2: the Host header is then what the target says): the host the
        edge checks against ALLOWED_HOSTS is the target's, not a Host header beside it."""
        try:
            target = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            return  # (uvicorn parsed it above: not reached)
        host = target.host or b""
        if b":" in host:  # an IPv6 address: in brackets, as in a Host header
            host = b"[" + host + b"]"
        authority = host + (b":%d" % target.port if target.port else b"")
        headers = [(name, value) for name, value in self.scope["headers"] if name != b"host"]
        self.scope["headers"] = [*headers, (b"host", authority)]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase == _BODY:
            # Answered before its body was in (e.g. a 401): idle once the body has arrived.
            answered = self.cycle is not None and self.cycle.response_complete
            self._phase = _NEW if answered else _WAIT
            self._since = self.loop.time()

    def on_response_complete(self) -> None:
        # (With pipelined requests `cycle` is the newest one: still running, nothing changes.)
        if self._phase == _WAIT and self.cycle is not None and self.cycle.response_complete:
            self._phase = _NEW  # idle (uvicorn's keep-alive timer watches it too)
            self._since = self.loop.time()
        super().on_response_complete()
        if self._ahead:
            self._ahead = [cycle for cycle in self._ahead if not cycle.response_complete]
        if self._phase == _DEFERRED and not self._answering():
            self._answer(self._deferred)

    def connection_lost(self, exc: Exception | None) -> None:
        _Sweeper.forget(self)
        # uvicorn tells only the newest request that the client left: with requests pipelined
        # behind a long answer (an event stream), that one would go on writing to no one,
        # holding its subscription, until its connection time limit.
        for cycle in self._ahead:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._ahead.clear()
        super().connection_lost(exc)

    # Deadlines (checked by the sweeper) ---------------------------------------------------------

    def check(self, now: float) -> None:
        phase, limits = self._phase, self._limits
        if phase == _NEW:
            # A fresh connection silent too long, or a keep-alive one (uvicorn's timer does
            # that too; whichever comes first closes it).
            if now - self._since > limits.idle_timeout and not self.transport.is_closing():
                self.transport.close()
        elif phase == _HEAD:
            if now - self._since > limits.headers_timeout:
                metrics.CONNECTIONS_REFUSED.labels("header_timeout").inc()
                self._refuse(_HEADERS_SLOW)
        elif phase == _BODY and limits.body_min_rate:
            if self.flow.read_paused:  # the app is not reading: not the client's fault
                self._since, self._body_bytes = now, 0
                return
            late = now - self._since - limits.body_grace
            if late > 0 and self._body_bytes < limits.body_min_rate * late:
                metrics.CONNECTIONS_REFUSED.labels("body_too_slow").inc()
                self._refuse(_BODY_SLOW)
        elif phase == _DONE and now - self._since > _LINGER_SECONDS:
            self.transport.close()

    # Refusals ---------------------------------------------------------------------------------

    def _reject(self, status: int, reason: bytes) -> None:
        detail = (
            f"The request line and headers exceed {self._limits.max_header_bytes} bytes."
            if status == 431
            else reason.decode()
        )
        self._refuse(_problem(status, reason, detail))

    def _answering(self) -> bool:
        """Whether requests that came in before are still being answered (or wait their turn)."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _refuse(self, response: bytes) -> None:
        """Answer `response` (unless the app already began answering the refused request: then
        just close), stop the request, and close after draining what the client still sends.
        A request refused before its headers were in (it has no cycle of its own yet) behind
        requests still being answered (pipelined) is answered after them, in its turn."""
        self._since = self.loop.time()
        self._body_bytes = 0
        if self._phase != _BODY:  # the refused request's headers are not in: `cycle` is older
            if self._answering():
                self._phase, self._deferred = _DEFERRED, response
                return
            self._phase = _DONE
            self._answer(response)
            return
        cycle = self.cycle  # the refused request's own
        self._phase = _DONE
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() now returns http.disconnect
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._answer(response)

    def _answer(self, response: bytes) -> None:
        """Write a refusal and the end of the connection; close once the client has read it."""
        self._phase = _DONE
        self._since = self.loop.time()
        transport = self.transport
        if transport.is_closing():
            transport.close()
            return
        transport.write(_with_request_id(response))
        if self.flow is not None:
            self.flow.resume_reading()
        else:
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()  # the client sees the end; eof_received then closes
        _Sweeper.watch(self)


class _Cycle(RequestResponseCycle):
    """uvicorn's response cycle, the head of a response checked and written by a few calls in
    C instead of a Python loop over its headers that runs two regular expressions on each:
    this service's answers carry sixteen headers (security, request id, rate limit), and
    those expressions alone cost ~4% of a `POST /messages` (README, Benchmarks). The same
    checks (`_NAME_BYTES`, `_VALUE_BYTES`: the bytes uvicorn's expressions refuse; a test
    compares them byte by byte) and the same bytes written; `Content-Length` sets the body's
    length as uvicorn does. A head off the common path (a name not in lower case,
    `Connection` or `Transfer-Encoding` set by the app, uvicorn's access log on, a client
    that is not reading) is written by uvicorn's code, and so is one it would refuse (a name
    or a value with a byte its expressions refuse, a status it has no line for, headers that
    are not pairs of bytes): its error, in its order, and its state after it. (One difference
    left: a name given as a memoryview, which ASGI does not allow and uvicorn fails on, is
    written.) And one thing uvicorn does wrong is not done with a head written here: an
    answer of unknown length (an event stream) to an HTTP/1.0 request is not sent chunked, a
    coding HTTP/1.0 does not have, but as it is, ended by closing the connection. Nor is the
    head of an answer of known length written before its body comes (`_send_whole`): an app
    that fails between the two gets a 500, where uvicorn's cycle sends the head and closes
    the connection (`run_asgi`)."""

    _until_close = False  # an HTTP/1.0 answer of unknown length: its end is the connection's
    _held: bytes | None = None  # the head of an answer of known length, until its body comes

    async def run_asgi(self, app: Any) -> None:
        """uvicorn's, but for an app that raised or returned after a head that is held: as
        nothing of the answer has been written, it is a 500 (uvicorn writes the head and closes
        the connection: a client may take that for a stale connection and send the request
        again)."""
        try:
            result = await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started or self._unsend():
                await self.send_500_response()
            else:
                self.transport.close()
        else:
            if result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
                self.transport.close()
            elif not self.response_started and not self.disconnected:
                self.logger.error("ASGI callable returned without starting response.")
                await self.send_500_response()
            elif not self.response_complete and not self.disconnected:
                self.logger.error("ASGI callable returned without completing response.")
                if self._unsend():
                    await self.send_500_response()
                else:
                    self.transport.close()
        finally:
            self.on_response = lambda: None

    def _unsend(self) -> bool:
        """Drop a held head (nothing written yet: the answer can still be another); False when
        there is none."""
        if self._held is None or self.disconnected:
            return False
        self._held = None
        self.response_started = False
        self.chunked_encoding = None
        self.expected_content_length = 0
        return True

    async def send(self, message: Any) -> None:
        if self._held is not None and self._send_whole(self._held, message):
            return
        if self._until_close and message["type"] == "http.response.body":
            await self._send_until_close(message)
            return
        if (
            message["type"] != "http.response.start"
            or self.response_started
            or self.disconnected
            or self.access_log
            or self.flow.write_paused
        ):
            await super().send(message)
            return
        try:
            headers = [*self.default_headers, *message.get("headers", ())]
            names = [name for name, _ in headers]
            joined = b"".join(names)
            values = b"".join([value for _, value in headers])
            usual = (
                _UNUSUAL.isdisjoint(names)
                and 0 not in joined.translate(_NAME_MARKS)  # (upper case too: see below)
                and 0 not in values.translate(_VALUE_MARKS)
                and message["status"] in STATUS_LINE
            )
        except Exception:  # (not pairs of bytes: uvicorn's code says what it says of them)
            usual = False
        if not usual:  # uvicorn's code: its errors, in its order, and its state after them
            await super().send(message)
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        status_code = message["status"]
        if b"content-length" in names:
            self.expected_content_length = int(headers[names.index(b"content-length")][1].decode())
            self.chunked_encoding = False
        head = [STATUS_LINE[status_code]]
        if headers:
            head += (b"\r\n".join(map(b": ".join, headers)), b"\r\n")
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status_code not in (204, 304)
        ):
            if self.scope["http_version"] == "1.0":
                # HTTP/1.0 has no chunked coding (RFC 9112 6.1: not to be sent to a 1.0
                # client, which would read the chunk sizes as the body; uvicorn sends it): the
                # body (an event stream) is sent as it is, and ends with the connection.
                self._until_close = True
            else:
                self.chunked_encoding = True
                head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        if self.chunked_encoding is False and self.scope["method"] != "HEAD":
            self._held = b"".join(head)  # written with the body (_send_whole)
        else:
            self.transport.write(b"".join(head))

    def _send_whole(self, head: bytes, message: Any) -> bool:
        """The held head and `message`, when it is the whole body it announced, in one write:
        one system call a response where uvicorn makes two, and one TCP segment for an answer
        that fits in one (uvicorn writes a head and then its body, each as it is sent; a JSON
        answer comes as both at once). True when it is done; otherwise the head is written
        (unless the client has gone) and `message` is left to the usual path, as if it had not
        been held: its checks and errors are uvicorn's."""
        self._held = None
        if self.disconnected:
            return False
        body = message.get("body", b"")
        if (
            message["type"] == "http.response.body"
            and not message.get("more_body", False)
            and type(body) is bytes
            and len(body) == self.expected_content_length
        ):
            # (writev: a page of 50 messages is ~50 kB, not copied to be joined to its head)
            self.transport.writelines((head, body))
            self.expected_content_length = 0
            self._complete(close=not self.keep_alive)
            return True
        self.transport.write(head)
        return False

    def _complete(self, *, close: bool) -> None:
        """The response has all been written (uvicorn's steps): the next request may be read;
        `close`: the connection ends with it (after what is written)."""
        self.response_complete = True
        self.message_event.set()
        if close:
            self.transport.close()
        self.on_response()

    async def _send_until_close(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if self.response_complete:  # (uvicorn's error)
            raise RuntimeError(
                f"Unexpected ASGI message '{message['type']}' sent, after response already "
                "completed."
            )
        body = message.get("body", b"")
        if body:
            self.transport.write(body)
        if not message.get("more_body", False):
            self._complete(close=True)  # (the end of the connection is the end of the body)


# What uvicorn's HEADER_RE and HEADER_VALUE_RE refuse in a header's name and value.
_NAME_BYTES = bytes(range(0x20)) + b'\x7f()<>@,;:[]={} \\"'
_VALUE_BYTES = bytes(range(0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"
_UNUSUAL = frozenset({b"connection", b"transfer-encoding"})  # (uvicorn's code writes those)


def _reset_connection(transport: asyncio.Transport) -> None:
    """Close the connection at once, with a reset: closed the usual way, the kernel would go on
    trying to send what it holds for a client that stopped reading (megabytes, for minutes)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
    transport.abort()


def _marks(refused: bytes) -> bytes:
    """A `bytes.translate` table: 0 for each refused byte, 1 for the others. A head translated
    by it holds a 0 exactly where it holds a refused byte: one pass in C and a memchr, where
    `translate(None, refused)` builds its table again on every call (~40% dearer)."""
    return bytes(0 if byte in refused else 1 for byte in range(256))


# A name in upper case is uvicorn's to write (it lowers it): marked with the refused bytes, so
# that one pass finds both (a `lower()` to compare with was a pass and a copy more).
_NAME_MARKS = _marks(_NAME_BYTES + bytes(range(ord("A"), ord("Z") + 1)))
_VALUE_MARKS = _marks(_VALUE_BYTES)


class _Sweeper:
    """One timer per event loop that checks every guarded connection's deadline each second."""

    _loops: ClassVar[dict[asyncio.AbstractEventLoop, _Sweeper]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.protocols: set[GuardedHttpToolsProtocol] = set()
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def forget(cls, protocol: GuardedHttpToolsProtocol) -> None:
        sweeper = cls._loops.get(protocol.loop)
        if sweeper is not None:
            sweeper.protocols.discard(protocol)

    @classmethod
    def watch(cls, protocol: GuardedHttpToolsProtocol) -> None:
        sweeper = cls._loops.get(protocol.loop)
        if sweeper is None:
            sweeper = cls._loops[protocol.loop] = _Sweeper(protocol.loop)
        sweeper.protocols.add(protocol)
        if sweeper.handle is None:
            sweeper.handle = sweeper.loop.call_later(_SWEEP_SECONDS, sweeper.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        for protocol in list(self.protocols):
            try:
                protocol.check(now)
            except Exception:  # one broken connection must not stop the others' deadlines
                logger.exception("connection guard check failed")
                self.protocols.discard(protocol)
                protocol.transport.close()
        metrics.OPEN_CONNECTIONS.set(len(self.protocols))
        if self.protocols:
            self.handle = self.loop.call_later(_SWEEP_SECONDS, self.sweep)
        else:
            self.handle = None
            self._loops.pop(self.loop, None)


def draining() -> bool:
    """SIGTERM received: uvicorn stops accepting connections and waits for the open ones.

    uvicorn installs its signal handlers (bound methods of its Server) before it serves, so the
    server and its `should_exit` are found through the SIGTERM handler, whoever started it
    (`run.py`, the `uvicorn` command, a test)."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """The guarded protocol bound to `settings` (tests and in-process servers)."""
    limits = ConnectionLimits.from_settings(settings)
    return type("BoundGuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What every server of this service runs with (`run.py`, tests, benchmarks)."""
    return {
        "loop": "uvloop",
        "timeout_keep_alive": settings.KEEPALIVE_TIMEOUT_SECONDS,
        "server_header": False,
        "log_config": None,  # Loguru takes over (observability/logging.py)
        "access_log": False,  # one access line per request is the middleware's job
        "timeout_graceful_shutdown": 30,
    }
