"""A minimal blocking HTTP/1.1 keep-alive client for sequential latency samples and set-up calls.

Why not httpx: a sequential latency sample is client time plus server time, and httpx spends a few
hundred microseconds per request in Python, which would dilute every ratio towards 1.0. Here a
request is pre-encoded bytes, one `sendall` and a Content-Length read: a few microseconds.
Only what the services send is supported (Content-Length bodies, no chunked encoding).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson

_HEAD_END = b"\r\n\r\n"
# A connection idle this long is replaced before the next request: the service closes idle
# keep-alive connections after KEEPALIVE_TIMEOUT_SECONDS (5 s by default).
_IDLE_SECONDS = 2.0


class HttpError(RuntimeError):
    """An unexpected status or a malformed response."""


def encode_request(
    method: str,
    path: str,
    *,
    port: int,
    token: str | None = None,
    body: bytes | None = None,
) -> bytes:
    """The bytes of one request, built once and sent many times."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + (body or b"")


class RawClient:
    """One keep-alive connection to 127.0.0.1:`port`."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self._timeout = timeout
        self._connect()

    def _connect(self) -> None:
        self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=self._timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._used = time.monotonic()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _fill(self) -> None:
        chunk = self._sock.recv(262_144)
        if not chunk:
            raise HttpError("connection closed by the server")
        self._buffer += chunk

    def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one encoded request, read its response: (status, body)."""
        if time.monotonic() - self._used > _IDLE_SECONDS and not self._buffer:
            # Idle longer than a server keeps a connection (set-up calls after a long fill):
            # a new one, rather than a request written to a connection being closed.
            self._sock.close()
            self._connect()
        self._sock.sendall(raw)
        while (end := self._buffer.find(_HEAD_END)) < 0:
            self._fill()
        head = self._buffer[:end]
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise HttpError("chunked responses are not supported by this client")
        start = end + len(_HEAD_END)
        while len(self._buffer) < start + length:
            self._fill()
        body = self._buffer[start : start + length]
        self._buffer = self._buffer[start + length :]
        self._used = time.monotonic()
        return status, body

    def timed(self, raw: bytes, expected: int) -> float:
        """Send one request and return its latency in milliseconds; its status must be
        `expected`."""
        started = time.perf_counter_ns()
        status, body = self.send(raw)
        elapsed = (time.perf_counter_ns() - started) / 1e6
        if status != expected:
            raise HttpError(f"expected {expected}, got {status}: {body[:300]!r}")
        return elapsed

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        expected: int = 200,
    ) -> bytes:
        """A set-up call: send, check the status, return the body."""
        body = None if json is None else orjson.dumps(json)
        status, reply = self.send(
            encode_request(method, path, port=self.port, token=token, body=body)
        )
        if status != expected:
            raise HttpError(f"{method} {path}: expected {expected}, got {status}: {reply[:300]!r}")
        return reply


def wait_until_serving(port: int, path: str, timeout: float = 30.0) -> None:
    """Poll until a freshly started server answers `path` with any status below 500."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with RawClient(port, timeout=2.0) as client:
                status, _ = client.send(encode_request("GET", path, port=port))
                if status < 500:
                    return
                last = HttpError(f"status {status}")
        except (OSError, HttpError) as exc:
            last = exc
        time.sleep(0.05)  # polling a process we just spawned: there is no event to wait on
    raise RuntimeError(f"nothing answered on port {port} within {timeout:.0f} s ({last!r})")
