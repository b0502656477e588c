"""One error hierarchy and one set of handlers: every error leaves as RFC 9457 problem+json.

Nothing of an exception's text, a dependency's message or a stack trace reaches the client unless
the error class was written to be shown (:class:`AppError` subclasses carry client-safe text).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from conversational_core.observability import metrics
from conversational_core.schemas import omitted_when_unset
from conversational_core.storage import errors as store

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FieldProblem(BaseModel):
    """One invalid field: where it is (`["body", "content"]`), what kind of problem, a message.
    The rejected value itself is never echoed."""

    loc: list[str]
    type: str
    msg: str


class Problem(BaseModel):
    """RFC 9457 problem details: every error of this service, validation errors included."""

    type: str = Field(description="A URI naming the kind of problem.")
    title: str = Field(description="The HTTP status's reason phrase.")
    status: int
    detail: str = Field(description="What went wrong, written for the client.")
    errors: list[FieldProblem] | None = Field(
        None,
        description="The fields at fault (400 for malformed JSON, 422); left out otherwise.",
        json_schema_extra=omitted_when_unset,
    )


class AppError(Exception):
    """An error whose `detail` is written for the client."""

    status: int = 500
    code: str = "internal"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        self.detail = detail or _TITLES.get(self.status, "Error")
        self.headers = headers or {}
        self.errors = errors
        super().__init__(self.detail)


class BadRequest(AppError):
    status, code = 400, "bad-request"


class Unauthorized(AppError):
    status, code = 401, "unauthorized"

    def __init__(
        self,
        detail: str = "Missing, invalid or expired bearer token.",
        *,
        expired: bool = False,
        missing: bool = False,
    ) -> None:
        # No error code when the request carried no bearer token at all (RFC 6750, 3.1).
        challenge = "Bearer" if missing else 'Bearer error="invalid_token"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})
        self.expired = expired  # a good token past its time (not a guess)


class Forbidden(AppError):
    status, code = 403, "forbidden"


class NotFound(AppError):
    status, code = 404, "not-found"


class Conflict(AppError):
    status, code = 409, "conflict"


class PreconditionFailed(AppError):
    status, code = 412, "precondition-failed"

    def __init__(
        self, detail: str = "The resource changed since the ETag given in If-Match."
    ) -> None:
        super().__init__(detail)


class PayloadTooLarge(AppError):
    status, code = 413, "payload-too-large"


class UnsupportedMediaType(AppError):
    status, code = 415, "unsupported-media-type"


class Unprocessable(AppError):
    status, code = 422, "validation-error"


def problem_body(
    status: int, detail: str, *, code: str | None = None, errors: list[dict[str, Any]] | None = None
) -> bytes:
    body: dict[str, Any] = {
        "type": f"https://conversational-core.dev/problems/{code or 'http-' + str(status)}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return orjson.dumps(body)


def problem_response(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        problem_body(status, detail, code=code, errors=errors),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


# Field problems listed in one answer at most: a body of thousands of wrong fields (a megabyte
# of unknown keys) would otherwise get an answer several times its size.
_MAX_FIELD_PROBLEMS = 50


def _validation_errors(exc: RequestValidationError) -> tuple[int, str, list[dict[str, Any]]]:
    errors: list[dict[str, Any]] = []
    found = exc.errors()
    malformed = deep = False
    for err in found[:_MAX_FIELD_PROBLEMS]:
        if err.get("type") == "json_invalid":
            malformed = True
            # (pydantic's parser stops at a depth of a few hundred: valid JSON all the same)
            deep = deep or "recursion limit" in str(err.get("ctx", {}).get("error", ""))
        loc = [str(p) for p in err.get("loc", ())]
        # Never echo the rejected input back (it may be large or sensitive); the pointer is enough.
        errors.append({"loc": loc, "type": err.get("type", "invalid"), "msg": err.get("msg", "")})
    if malformed:
        if deep:
            return 400, "The request body's JSON is nested too deeply.", errors
        return 400, "The request body is not valid JSON.", errors
    more = len(found) - len(errors)
    detail = "The request has invalid fields."
    if more:
        detail += f" The first {len(errors)} are listed; {more} more are not."
    return 422, detail, errors


# What the store's errors are over HTTP: the one table (storage/ knows nothing of HTTP).
STORE_ERRORS: dict[type[store.StoreError], tuple[int, str]] = {
    store.NotFound: (404, "not-found"),
    store.AlreadyExists: (409, "conflict"),
    store.StaleVersion: (412, "precondition-failed"),
    store.IdempotencyMismatch: (422, "validation-error"),
    store.UnknownAnchor: (400, "bad-request"),
    store.UnknownMessage: (422, "validation-error"),
    store.Busy: (409, "conflict"),
    store.BranchChanged: (409, "conflict"),
    store.Unavailable: (503, "store-unavailable"),
}


def store_problem(exc: store.StoreError) -> Response:
    """The problem+json answer to a store error (see STORE_ERRORS)."""
    status, code = next(STORE_ERRORS[kind] for kind in type(exc).__mro__ if kind in STORE_ERRORS)
    headers = {}
    errors = None
    if isinstance(exc, store.Unavailable):
        metrics.STORE_ERRORS.labels("api").inc()
        headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, store.UnknownMessage):
        errors = [
            {
                "loc": [exc.location, exc.field],
                "type": "unknown_message",
                "msg": "not a message of this conversation",
            }
        ]
    return problem_response(status, exc.message, code=code, errors=errors, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    async def app_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, AppError)
        return problem_response(
            exc.status, exc.detail, code=exc.code, errors=exc.errors, headers=exc.headers
        )

    async def store_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, store.StoreError)
        return store_problem(exc)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        status, detail, errors = _validation_errors(exc)
        return problem_response(status, detail, code="validation-error", errors=errors)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "")
        return problem_response(exc.status_code, detail, headers=dict(exc.headers or {}))

    app.add_exception_handler(AppError, app_error)
    app.add_exception_handler(store.StoreError, store_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    # Anything else propagates to EdgeMiddleware, which answers a bare 500 problem (with the
    # request id) and logs the traceback.
