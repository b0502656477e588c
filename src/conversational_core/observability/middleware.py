"""The edge of every request, as one pure ASGI middleware.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: the latter wraps each request in extra tasks
and streams, a measurable cost on the hot path. This middleware:

- refuses a Host that is not in ALLOWED_HOSTS with 400 (a problem+json, unlike Starlette's
  TrustedHostMiddleware's plain text; and checked in the same pass over the headers);
- gives every response an `X-Request-ID` (the client's, when it sent a sane one) and the
  security headers;
- refuses bodies over MAX_BODY_BYTES with 413, by Content-Length up front or while streaming;
- refuses a body that is not JSON (UTF-8) or is compressed with 415 (before any route parses it);
- answers CORS for CORS_ORIGINS: requests that carry an `Origin` (browsers) go through
  Starlette's CORSMiddleware; the others only get `Vary: Origin`. (Starlette's middleware wraps
  every request's `send` and parses its headers again: that measured as a tenth of a message
  append, for requests that are not from a browser at all.)
- turns any exception that escapes the app into a 500 problem+json that reveals nothing;
- binds the request id to every log line written while the request runs, and writes one access
  line per request (method, path without the query, status, duration, user);
- counts the request in the Prometheus metrics by route template (never the raw path).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import uuid_utils
from fastapi import HTTPException
from loguru import logger
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conversational_core.errors import PROBLEM_MEDIA_TYPE, problem_body, problem_response
from conversational_core.observability import metrics
from conversational_core.observability.errors import report
from conversational_core.observability.logging import ACCESS_LOG, REQUEST_ID, USER_ID

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # others: one label


class BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so that FastAPI's body reader lets it through to
    the problem+json handler instead of turning it into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body exceeds {limit} bytes.")


def _is_json(content_type: bytes) -> bool:
    media, _, params = content_type.partition(b";")
    media = media.strip().lower()
    if not (
        media == b"application/json"
        or (media.startswith(b"application/") and media.endswith(b"+json"))
    ):
        return False
    if params:  # JSON is UTF-8 (RFC 8259): a charset that is not is another media type to us
        for param in params.split(b";"):
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"charset":
                return value.strip().strip(b'"').lower() in (b"utf-8", b"utf8")
    return True


def _is_probe(path: str) -> bool:
    """Health checks and scrapes name the pod's address as Host (Kubernetes, Docker): they pass
    the host check. They reveal no data."""
    return path == "/metrics" or path == "/health" or path.startswith("/health/")


class HostPolicy:
    """ALLOWED_HOSTS: exact names, `*.example.com` for any subdomain, `*` for any host."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.any = "*" in allowed
        self.exact = {h.lower().encode() for h in allowed if not h.startswith("*")}
        self.suffixes = tuple(h[1:].lower().encode() for h in allowed if h.startswith("*."))

    def allows(self, host_header: bytes | None) -> bool:
        if self.any:
            return True
        if not host_header:
            return False
        host = host_header.lower()
        if host.startswith(b"["):  # [v6]:port
            host = host[: host.find(b"]") + 1]
        else:
            host = host.rsplit(b":", 1)[0] if host.count(b":") == 1 else host
        return host in self.exact or (bool(self.suffixes) and host.endswith(self.suffixes))


def security_headers(production: bool) -> list[tuple[bytes, bytes]]:
    """Headers for an API that serves JSON to programs: nothing may be sniffed, framed, or
    leak a referrer; HSTS where the service runs behind TLS (production)."""
    headers = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (b"cross-origin-resource-policy", b"same-site"),
    ]
    if production:
        headers.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
    return headers


# /docs loads Swagger UI from its CDN; every other response is data and may run nothing.
_API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The matched route's template; for a request answered before routing (401, 413, …) the
    template it would have matched. Never the raw path: ids would explode label cardinality."""
    route = scope.get("route")
    if route is None:
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate
                break
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class _ProblemCORS(CORSMiddleware):
    """Starlette's CORS middleware, its refusals of a preflight answered as every error of this
    service is (problem+json; Starlette's own is text/plain), with the same headers."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode()  # e.g. "Disallowed CORS origin, headers"
        kept = response.headers.items()
        return problem_response(
            400,
            f"{refused}: not allowed across origins here (CORS_ORIGINS).",
            headers={k: v for k, v in kept if k not in ("content-type", "content-length")},
        )


class EdgeMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        *,
        allowed_hosts: Sequence[str] = ("*",),
        production: bool = False,
        routes: Sequence[BaseRoute] = (),
        access_log: bool = True,
        cors: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        # Requests with an Origin go through this one (see the module docstring).
        self.cors = _ProblemCORS(app, **cors) if cors is not None else None
        self.max_body_bytes = max_body_bytes
        self.hosts = HostPolicy(allowed_hosts)
        self.headers = security_headers(production)
        if cors is not None:
            self.headers.append((b"vary", b"Origin"))  # (CORSMiddleware adds it when it runs)
        self.routes = routes
        cors_headers = [h for h in self.headers if h != (b"vary", b"Origin")]
        # What a response gets, by whether CORS answers it and whether it is /docs (which may
        # run Swagger UI's scripts), built once.
        self._api_headers = [*self.headers, _API_CSP]
        self._docs_headers = list(self.headers)
        self._cors_api_headers = [*cors_headers, _API_CSP]
        self._cors_docs_headers = cors_headers
        self.access_log = access_log  # off when LOG_LEVEL is above INFO: skip building the line

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        began = time.perf_counter()
        request_id: bytes | None = None
        content_length: int | None = None
        content_type = b""
        host: bytes | None = None
        chunked = encoded = False
        origin = False
        hosts = 0
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
                hosts += 1
            elif name == b"origin":
                origin = True
            elif name == b"x-request-id":
                if _REQUEST_ID.fullmatch(value):
                    request_id = value
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = -1
            elif name == b"content-type":
                content_type = value
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"content-encoding":
                encoded = value.strip().lower() not in (b"", b"identity")
        if request_id is None:
            request_id = uuid_utils.uuid4().hex.encode()
        rid = request_id.decode()
        state = scope.setdefault("state", {})
        state["request_id"] = rid

        started = False
        status = 500
        streaming = False
        cors = self.cors if origin else None
        docs = scope["path"].startswith("/docs")
        if cors is not None:
            extra = self._cors_docs_headers if docs else self._cors_api_headers
        else:
            extra = self._docs_headers if docs else self._api_headers

        async def send_with_id(message: Message) -> None:
            nonlocal started, status, streaming
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = message.get("headers", ())
                streaming = any(
                    n == b"content-type" and v.startswith(b"text/event-stream") for n, v in headers
                )
                # (`quota`: the rate limit's headers, when AuthMiddleware counted the request)
                message["headers"] = [
                    *headers,
                    (b"x-request-id", request_id),
                    *extra,
                    *state.get("quota", ()),
                ]
            await send(message)

        async def reject(status: int, detail: str) -> None:
            body = problem_body(status, detail)
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [
                        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})

        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        # Every log line written while the request runs carries its id (and, from
        # AuthMiddleware on, its user's).
        request_token = REQUEST_ID.set(rid)
        user_token = USER_ID.set("-")  # AuthMiddleware names the user
        try:
            if hosts > 1:  # RFC 9112 3.2: a request with more than one Host is a 400
                await reject(400, "The request has more than one Host header.")
            elif not self.hosts.allows(host) and not _is_probe(scope["path"]):
                await reject(400, "The Host header names a host this service does not serve.")
            elif (
                scope["method"] in _BODY_METHODS
                and content_length is not None
                and (content_length < 0)
            ):
                await reject(400, "Invalid Content-Length.")
            elif scope["method"] in _BODY_METHODS and (content_length or 0) > limit:
                await reject(413, f"The request body exceeds {limit} bytes.")
            elif (
                scope["method"] in _BODY_METHODS
                and (chunked or (content_length or 0) > 0)
                and not _is_json(content_type)
            ):
                await reject(415, "The request body must be JSON (Content-Type: application/json).")
            elif scope["method"] in _BODY_METHODS and encoded and (chunked or content_length):
                await reject(415, "The request body must not be compressed (Content-Encoding).")
            else:
                await (cors or self.app)(scope, limited_receive, send_with_id)
        except BodyTooLarge as exc:
            if not started:
                await reject(413, str(exc.detail))
        except Exception as exc:
            logger.exception("unhandled error")
            report(exc)
            if not started:
                await reject(500, "An unexpected error occurred.")
            else:
                raise
        finally:
            self._record(scope, state, status, streaming, began)
            USER_ID.reset(user_token)
            REQUEST_ID.reset(request_token)

    def _record(
        self, scope: Scope, state: dict[str, object], status: int, streaming: bool, began: float
    ) -> None:
        """The request's metrics and its access line."""
        elapsed = time.perf_counter() - began
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        endpoint = route_template(scope, self.routes)
        # (an event stream's duration is its connection time, not latency: not timed)
        metrics.REQUEST_TALLY.record(method, endpoint, status, None if streaming else elapsed)
        if not self.access_log:
            return
        principal = state.get("principal")
        ACCESS_LOG.write(
            method,
            scope["path"],  # never the query string: clients put secrets there
            endpoint,
            status,
            int(elapsed * 100_000 + 0.5) / 100,  # ms to 2 places (round(x, 2) costs 5 times more)
            getattr(principal, "user_id", None),
        )
