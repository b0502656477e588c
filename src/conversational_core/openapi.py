"""The OpenAPI document: what the service really answers, so that generated clients work for
errors too.

Each operation declares its own problem statuses (`responses=problems(404, 409)`), its id and its
success schema; the statuses every authenticated operation can answer are added here, in one
place, with why:

- 400: a malformed request (JSON, a header, a cursor) or a Host this service does not serve;
- 401: no or a bad token (and 429 once an address keeps failing);
- 403: a role that does not allow the action, or `X-On-Behalf-Of` without the service role;
- 408 and 431: headers or a body too slow, headers too large (the server's guard, serving.py);
- 413 and 415: a body too large or not JSON (operations of POST, PUT, PATCH: the edge refuses
  such a body before any route, one that reads no body included);
- 422: invalid fields; 429: a rate limit; 503: the store unavailable, or too many connections.

Every error is `application/problem+json` with the `Problem` schema. Limits that are settings
(MAX_MESSAGE_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_PARTS, MAX_TOOLS) are written into the schemas
as they are set.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from conversational_core.errors import PROBLEM_MEDIA_TYPE, FieldProblem, Problem
from conversational_core.schemas import INT64_MAX, INT64_MIN
from conversational_core.settings import Settings

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_WHY = {
    400: "Malformed request (JSON, a header or a cursor), or a Host this service does not serve.",
    401: "Missing, invalid or expired bearer token.",
    403: "The caller's role does not allow this.",
    404: "Not found, or not yours.",
    408: "The request's headers or body arrived too slowly.",
    409: "Conflicts with the current state.",
    412: "The resource changed since the ETag given in If-Match.",
    413: "The request body is too large.",
    415: "The request body is not JSON.",
    422: "Invalid fields (see `errors`).",
    429: "Rate limited; retry after `Retry-After` seconds.",
    431: "The request's headers are too large.",
    503: "The store is unavailable (or the server has too many connections); retry after "
    "`Retry-After` seconds.",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}},
}


# Models the document names that no route signature brings in (the data of SSE events).
_EXTRA_MODELS: list[type[BaseModel]] = [Problem, FieldProblem]


def register(*models: type[BaseModel]) -> None:
    """Put `models` in the document's components (refer to them as `schema_ref(Model)`)."""
    _EXTRA_MODELS.extend(m for m in models if m not in _EXTRA_MODELS)


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def success(
    status: int, description: str, headers: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """`responses=` entry of a success (its schema comes from `response_model`)."""
    return {status: {"description": description, "headers": headers or {}}}


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: these statuses answer a problem+json."""
    return {status: _problem(status) for status in statuses}


def _problem(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _WHY[status],
        "content": {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}},
    }
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    if status == 401:
        response["headers"] = {
            "WWW-Authenticate": {"description": "Bearer.", "schema": {"type": "string"}}
        }
    return response


# Every authenticated operation; those of a method with a body (POST, PUT, PATCH) also 413, 415.
_COMMON = (400, 401, 403, 408, 422, 429, 431, 503)
_WITH_BODY = (413, 415)
_OPERATIONAL = (408, 431)  # probes and scrapes: no auth, no host check, no parameters
_ON_BEHALF_OF = {
    "name": "X-On-Behalf-Of",
    "in": "header",
    "required": False,
    "description": "With a token of role `service`: the user the request acts for.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
}


def build(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document of `app` (see the module docstring)."""
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {})
    definitions = components.setdefault("schemas", {})
    for model in _EXTRA_MODELS:
        found = model.model_json_schema(
            ref_template="#/components/schemas/{model}", mode="serialization"
        )
        for name, definition in found.pop("$defs", {}).items():
            definitions.setdefault(name, definition)
        definitions[model.__name__] = found
    components["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }
    _limits(definitions, settings)
    _exact_int64(schema)
    for path, operations in schema.get("paths", {}).items():
        operational = path.startswith("/health")
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                _not_null(parameter)
            responses = operation.setdefault("responses", {})
            statuses: tuple[int, ...] = _OPERATIONAL
            if not operational:
                operation["security"] = [{"bearerAuth": []}]
                operation.setdefault("parameters", []).append(_ON_BEHALF_OF)
                # (A body sent where none is read meets the same edge: 413, 415 all the same.)
                writes = "requestBody" in operation or method in ("post", "put", "patch")
                statuses = _COMMON + (_WITH_BODY if writes else ())
            for status in statuses:
                # (Replacing FastAPI's own 422, which names a JSON body we never send.)
                responses[str(status)] = _problem(status)
    for unused in ("HTTPValidationError", "ValidationError"):
        definitions.pop(unused, None)
    return schema


def _not_null(parameter: dict[str, Any]) -> None:
    """An optional parameter is one that can be left out, not one that can be `null`: FastAPI
    writes `str | None` as `anyOf: [string, null]`, which clients then send as "null"."""
    schema = parameter.get("schema", {})
    branches = schema.get("anyOf")
    if branches is None:
        return
    kept = [branch for branch in branches if branch.get("type") != "null"]
    if len(kept) == 1:
        del schema["anyOf"]
        schema.update(kept[0])


def _limits(definitions: dict[str, Any], settings: Settings) -> None:
    """Write the configured limits of texts and lists into the request schemas."""
    for name, field, limit in (
        ("MessageCreate", "content", settings.MAX_MESSAGE_CHARS),
        ("MessageUpdate", "content", settings.MAX_MESSAGE_CHARS),
        ("ConversationCreate", "system_prompt", settings.MAX_SYSTEM_PROMPT_CHARS),
        ("ConversationUpdate", "system_prompt", settings.MAX_SYSTEM_PROMPT_CHARS),
        ("MessageCreate", "parts", settings.MAX_PARTS),
        ("ToolResults", "results", settings.MAX_PARTS),
        ("MessageCreate", "tools", settings.MAX_TOOLS),
        ("ConversationCreate", "tools", settings.MAX_TOOLS),
        ("ConversationUpdate", "tools", settings.MAX_TOOLS),
    ):
        prop = definitions.get(name, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "string":
                branch["maxLength"] = limit
            elif branch.get("type") == "array":
                branch["maxItems"] = limit


def _exact_int64(node: Any) -> None:
    """FastAPI's document model holds `minimum` and `maximum` as floats: the 64-bit bounds of
    integers come out as 9.223372036854776e18, which is 2**63 (one past the largest), written
    as a float. Written back as the integers they are."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("minimum", "maximum") and isinstance(value, float):
                if value == float(INT64_MAX):
                    node[key] = INT64_MAX
                elif value == float(INT64_MIN):
                    node[key] = INT64_MIN
                elif value.is_integer():
                    node[key] = int(value)
            else:
                _exact_int64(value)
    elif isinstance(node, list):
        for item in node:
            _exact_int64(item)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the document above at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
