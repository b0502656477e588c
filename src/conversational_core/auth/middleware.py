"""Authentication at the edge: every path but the operational ones needs a bearer JWT.

A pure ASGI middleware rather than a FastAPI dependency: it applies to every route by
construction (a new route cannot forget it), an unauthenticated request is refused before any
routing or body parsing (401 before 404/422: nothing about the API is revealed to anonymous
callers), and it skips FastAPI's per-request dependency solving, a measurable cost on the hot
path. Routes read the result with :func:`principal_of`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from conversational_core.auth.dependencies import Principal, authenticate
from conversational_core.auth.tokens import TokenVerifier
from conversational_core.errors import AppError, problem_response

PUBLIC_PREFIXES = ("/health", "/metrics", "/docs", "/openapi.json")


def is_public(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PUBLIC_PREFIXES)


class AuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        verifier: TokenVerifier = state["verifier"]
        # One pass over the raw headers (a Headers mapping scans them again for every get).
        authorization = on_behalf = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-on-behalf-of":
                on_behalf = value.decode("latin-1")
        try:
            state["principal"] = await authenticate(verifier, authorization, on_behalf)
        except AppError as exc:
            response = problem_response(exc.status, exc.detail, code=exc.code, headers=exc.headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal:
    """The authenticated caller of a request (set by AuthMiddleware)."""
    principal: Principal = request.state.principal
    return principal
