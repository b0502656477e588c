"""routing.Operation: it shares a validated query between requests only when no endpoint could
change it (frozen models, or fields of immutable values), and matches requests as FastAPI's
routes do."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match

from conversational_core.app import create_app
from conversational_core.routing import Operation, _immutable
from tests.conftest import make_settings


@pytest.mark.parametrize(
    ("annotation", "immutable"),
    [
        (str, True),
        (int | None, True),
        (Literal["asc", "desc"], True),
        (bool | float | None, True),
        (list[str], False),
        (list[str] | None, False),
        (dict[str, Any], False),
        (Literal["a"] | set[int], False),
    ],
)
def test_only_immutable_query_fields_are_shared(annotation: Any, immutable: bool) -> None:
    assert _immutable(annotation) is immutable


_ID = "01a23081-9843-7135-9bfb-93a44437ebe9"
_PATHS = [
    "/conversations",
    f"/conversations/{_ID}",
    f"/conversations/{_ID}/messages",
    f"/conversations/{_ID}/messages/{_ID}",
    f"/conversations/{_ID}/messages/{_ID}/cancel",
    f"/conversations/{_ID}/messages/{_ID}/tool_results",
    f"/conversations/{_ID}/events",
    f"/conversations/{_ID}/messages/",  # (a trailing slash: no route)
    "/conversations/a%2Fb/messages",  # (as uvicorn leaves an escaped slash: one segment)
    "/health/ready",
    "/metrics",
    "/nothing",
]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("root_path", ["", "/api"])
def test_operations_match_as_fastapi_routes_do(method: str, root_path: str) -> None:
    """Operation.matches is FastAPI's APIRoute.matches, faster: the same answer and the same
    child scope for every route and request (paths under a root path too)."""
    app = create_app(make_settings())
    operations = [r for r in app.router.routes if isinstance(r, Operation)]
    assert len(operations) > 15
    assert app.router.routes[: len(operations)] == operations  # tried before FastAPI's own
    for path in _PATHS:
        for full in (root_path + path, path):  # (a path outside the root path: as it is)
            scope = {"type": "http", "method": method, "path": full, "root_path": root_path}
            for route in operations:
                assert route.matches(dict(scope)) == APIRoute.matches(route, dict(scope)), (
                    route.path,
                    full,
                )
    websocket = {"type": "websocket", "path": f"/conversations/{_ID}/events"}
    assert all(r.matches(websocket) == (Match.NONE, {}) for r in operations)


def _layers(app: FastAPI) -> list[str]:
    names, layer = [], app.build_middleware_stack()
    while hasattr(layer, "app"):
        names.append(type(layer).__name__)
        layer = layer.app
    return names


def test_fastapis_unused_layers_are_left_out_while_no_route_needs_them() -> None:
    """Every request crosses the service's layers and Starlette's error handling, not
    FastAPI's exception telemetry (off) nor its file stack (for its own handler, which
    Operations replace); a route served by FastAPI's handler gets its stack back."""
    app = create_app(make_settings())
    layers = _layers(app)
    assert layers == [
        "ServerErrorMiddleware",
        "EdgeMiddleware",
        "AuthMiddleware",
        "ExceptionMiddleware",
        "APIRouter",
    ]

    @app.get("/served-by-fastapi")
    async def plain() -> dict[str, str]:
        return {}

    assert "AsyncExitStackMiddleware" in _layers(app)
    assert "ExceptionTelemetryMiddleware" not in _layers(app)
