"""The edge of every request, as one pure ASGI middleware.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: the latter wraps each request in extra tasks
and streams, a measurable cost on the hot path. This middleware:

- gives every response an `X-Request-ID` (the client's, when it sent a sane one);
- refuses bodies over MAX_BODY_BYTES with 413, by Content-Length up front or while streaming;
- refuses a body that is not JSON with 415 (before any route parses it);
- turns any exception that escapes the app into a 500 problem+json that reveals nothing.
"""

from __future__ import annotations

import re

import uuid_utils
from fastapi import HTTPException
from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conversational_core.errors import PROBLEM_MEDIA_TYPE, problem_body

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodyTooLarge(HTTPException):
    """Raised from `receive`; an HTTPException so that FastAPI's body reader lets it through to
    the problem+json handler instead of turning it into a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body exceeds {limit} bytes.")


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id: bytes | None = None
        content_length: int | None = None
        content_type = b""
        chunked = False
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _REQUEST_ID.match(value):
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
        if request_id is None:
            request_id = uuid_utils.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
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

        if scope["method"] in _BODY_METHODS:
            if content_length is not None and content_length < 0:
                await reject(400, "Invalid Content-Length.")
                return
            if content_length is not None and content_length > self.max_body_bytes:
                await reject(413, f"The request body exceeds {self.max_body_bytes} bytes.")
                return
            has_body = chunked or (content_length or 0) > 0
            if has_body and not _is_json(content_type):
                await reject(415, "The request body must be JSON (Content-Type: application/json).")
                return

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

        try:
            await self.app(scope, limited_receive, send_with_id)
        except BodyTooLarge as exc:
            if not started:
                await reject(413, str(exc.detail))
        except Exception:
            logger.exception("unhandled error")
            if not started:
                await reject(500, "An unexpected error occurred.")
            else:
                raise
