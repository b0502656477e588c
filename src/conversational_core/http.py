"""Small HTTP helpers shared by the resource endpoints: JSON responses, ETags, idempotency keys."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from conversational_core.errors import BadRequest, PreconditionFailed
from conversational_core.schemas import ID_PATTERN
from conversational_core.settings import Settings
from conversational_core.storage.base import Idempotency

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_ETAG = re.compile(r'^(?:W/)?"([cm])(\d{1,18})"$')
_ID = re.compile(ID_PATTERN)
M = TypeVar("M", bound=BaseModel)


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """orjson straight to bytes: records are dataclasses, which orjson encodes natively."""
    return Response(
        orjson.dumps(body), status_code=status_code, media_type="application/json", headers=headers
    )


def expected_version(if_match: str | None, kind: str) -> int | None:
    """The version an `If-Match` header asks for (None when absent or `*`).

    A tag this service could not have issued for this kind of object can never match: 412.
    """
    if if_match is None:
        return None
    value = if_match.strip()
    if value == "*":
        return None
    match = _ETAG.fullmatch(value)
    if match is None or match.group(1) != kind:
        raise PreconditionFailed()
    return int(match.group(2))


# Documents the header on routes that read it themselves (see `idempotency`).
IDEMPOTENCY_OPENAPI = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "maxLength": 255},
            "description": "A retry with the same key and body returns the first result and "
            "creates nothing.",
        }
    ]
}


def query_parameters(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `parameters` for query parameters a route parses itself with `model`."""
    schema = model.model_json_schema()
    return {
        "parameters": [
            {"name": name, "in": "query", "required": False, "schema": prop}
            for name, prop in schema.get("properties", {}).items()
        ]
    }


def idempotency(request: Request, body: BaseModel) -> Idempotency | None:
    """The request's Idempotency-Key (read directly: a declared Header parameter costs a
    measurable share of a request), scoped by the caller in the store."""
    key = idempotency_key(request.headers.get("idempotency-key"))
    if key is None:
        return None
    settings: Settings = request.state.settings
    return Idempotency(key, fingerprint(body), settings.IDEMPOTENCY_TTL_SECONDS)


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(value):
        raise BadRequest("Idempotency-Key must be 1-255 visible ASCII characters.")
    return value


def fingerprint(model: BaseModel, *extra: str) -> str:
    """A stable digest of a request body (whitespace and key order do not matter)."""
    digest = hashlib.sha256(
        orjson.dumps(model.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    )
    for part in extra:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:32]


# --- Parsing for plain Starlette routes ----------------------------------------------------------
# The hottest routes are plain Starlette endpoints (see messages/endpoints.py, HOT_ROUTES); these
# give them FastAPI's errors: the same 400/422 problems, with `loc` starting "path", "query" or
# "body".


class HotEndpoint:
    """`func(request) -> Response` as a bare ASGI app for a Starlette `Route`. Starlette wraps a
    function endpoint in per-request closures for route-level exception handlers, which this
    service does not use: its errors propagate to the app's ExceptionMiddleware (the same
    handlers, the same problem+json)."""

    def __init__(self, func: Callable[[Request], Awaitable[Response]]) -> None:
        self.func = func

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.func(Request(scope, receive))
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})


def invalid(exc: ValidationError, where: str) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": (where, *e["loc"])} for e in exc.errors()])


def path_id(request: Request, name: str) -> str:
    value: str = request.path_params[name]
    if not _ID.fullmatch(value):
        raise RequestValidationError(
            [
                {
                    "loc": ("path", name),
                    "type": "string_pattern_mismatch",
                    "msg": f"String should match pattern '{ID_PATTERN}'",
                }
            ]
        )
    return value


def query_model(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        raise invalid(exc, "query") from None


async def body_model(request: Request, model: type[M]) -> M:
    """The JSON body, parsed and validated in one pydantic pass (malformed JSON: 400)."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone mid-upload: nothing to answer, nothing to report
        raise BadRequest("The request body could not be read.") from None
    if not raw:
        raise RequestValidationError(
            [{"loc": ("body",), "type": "missing", "msg": "Field required"}]
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid(exc, "body") from None
