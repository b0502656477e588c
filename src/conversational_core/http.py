"""Small HTTP helpers shared by the resource endpoints: JSON responses, ETags, idempotency keys."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from conversational_core.errors import BadRequest, PreconditionFailed
from conversational_core.settings import Settings
from conversational_core.storage.base import Idempotency

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_ETAG = re.compile(r'^"([cm])(\d{1,18})"$')  # (strong tags only: If-Match never takes weak ones)


class JSONBytes(Response):
    """A JSON answer made of bytes already encoded, its headers built as Starlette's Response
    builds them (the given ones, then `content-length` and `content-type`) without its
    general path (a mapping of headers searched for those two, a media type to inspect):
    2.5 us less on every answer. `headers` never names those two (this service's own)."""

    media_type = "application/json"

    def __init__(
        self, content: bytes, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self.status_code = status_code
        self.background = None
        self.body = content
        raw = (
            [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            if headers
            else []
        )
        if status_code >= 200 and status_code not in (204, 304):
            raw.append((b"content-length", b"%d" % len(content)))
        raw.append(_JSON_TYPE)
        self.raw_headers = raw


_JSON_TYPE = (b"content-type", b"application/json")


def json_response(
    body: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """orjson straight to bytes: records are dataclasses, which orjson encodes natively."""
    return JSONBytes(orjson.dumps(body), status_code, headers)


async def expected_version(
    if_match: str | None, kind: str, current: Callable[[], Awaitable[int]]
) -> int | None:
    """The version an `If-Match` header asks for (None when absent or `*`), for a change made
    only if the object still has it.

    The header is a list of entity tags, compared strongly (RFC 9110 13.1.1): a weak tag
    (`W/"c3"`) or one this service could not have issued for this kind of object never
    matches; with none that can, 412. Of several that can, the one the object has now
    (`current()`, read only then), if named; 412 otherwise.
    """
    if if_match is None:
        return None
    value = if_match.strip()
    if value == "*":
        return None
    versions = set()
    for tag in value.split(","):
        match = _ETAG.fullmatch(tag.strip())
        if match is not None and match.group(1) == kind:
            versions.add(int(match.group(2)))
    if len(versions) == 1:
        return versions.pop()
    if versions:
        now = await current()
        if now in versions:
            return now
    raise PreconditionFailed()


# Documents the header on routes that read it themselves (see `idempotency`): reading it
# directly costs less than a declared parameter on the hottest route, and gives its own 400.
IDEMPOTENCY_OPENAPI = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": _IDEMPOTENCY_KEY.pattern},
            "description": "1-255 visible ASCII characters. A retry with the same key and body "
            "returns the first result (with `Idempotent-Replayed: true`) and creates nothing; "
            "the same key with another body is a 422.",
        }
    ]
}
# The If-Match header of updates (any entity tag: one that does not match is a 412).
IF_MATCH: dict[str, Any] = {
    "description": "The ETag the change is based on (`*`: any); a stale one is a 412."
}
# Response headers, for the document.
ETAG_HEADER = {"ETag": {"description": "The version, for If-Match.", "schema": {"type": "string"}}}
LOCATION_HEADER = {
    "Location": {"description": "The new object's path.", "schema": {"type": "string"}}
}
REPLAYED_HEADER = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the first result of an earlier request with the "
        "same Idempotency-Key.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def idempotency(
    request: Request, body: BaseModel, *extra: str, unset: set[str] | None = None
) -> Idempotency | None:
    """The request's Idempotency-Key (read directly: a declared Header parameter costs a
    measurable share of a request), scoped by the caller in the store. `extra`: what else
    tells this request from another with the same body (e.g. the operation); `unset`: fields
    left out of the fingerprint (a field added later, when a request does not give it, so that
    a retry across an upgrade still matches its first request)."""
    key = idempotency_key(request.headers.get("idempotency-key"))
    if key is None:
        return None
    settings: Settings = request.state.settings
    return Idempotency(
        key, fingerprint(body, *extra, exclude=unset), settings.IDEMPOTENCY_TTL_SECONDS
    )


def idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(value):
        raise BadRequest("Idempotency-Key must be 1-255 visible ASCII characters.")
    return value


def fingerprint(model: BaseModel, *extra: str, exclude: set[str] | None = None) -> str:
    """A stable digest of a request body (whitespace and key order do not matter)."""
    digest = hashlib.sha256(
        orjson.dumps(model.model_dump(mode="json", exclude=exclude), option=orjson.OPT_SORT_KEYS)
    )
    for part in extra:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:32]
