"""Authentication at the edge: every path but the operational ones needs a bearer JWT.

A pure ASGI middleware rather than a FastAPI dependency: it applies to every route by
construction (a new route cannot forget it), an unauthenticated request is refused before any
routing or body parsing (401 before 404/422: nothing about the API is revealed to anonymous
callers), and it skips FastAPI's per-request dependency solving, a measurable cost on the hot
path. Routes read the result with :func:`principal_of`.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conversational_core.auth.dependencies import Principal, authenticate
from conversational_core.auth.tokens import TokenVerifier
from conversational_core.errors import AppError, Unauthorized, problem_response
from conversational_core.observability.logging import USER_ID
from conversational_core.ratelimit import Decision, Limits, RateLimited

PUBLIC_PREFIXES = ("/health", "/metrics", "/docs", "/openapi.json")
_PUBLIC_SUBPATHS = tuple(prefix + "/" for prefix in PUBLIC_PREFIXES)


def is_public(path: str) -> bool:
    return path in PUBLIC_PREFIXES or path.startswith(_PUBLIC_SUBPATHS)


class AuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Users refused recently, until their window resets: their reads are counted first.
        self._refused: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        verifier: TokenVerifier = state["verifier"]
        limits: Limits = state["limits"]
        # One pass over the raw headers (a Headers mapping scans them again for every get).
        authorization = on_behalf = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                # Two credentials: which one is meant? Neither (a proxy and the service might
                # each read another one).
                authorization = "" if authorization is not None else value.decode("latin-1")
            elif name == b"x-on-behalf-of":
                on_behalf = value.decode("latin-1")
        try:
            principal = await authenticate(verifier, authorization, on_behalf)
        except AppError as exc:
            # Failed attempts cost the address, which slows token guessing; a token that was
            # good but has expired is no guess (its client refreshes it on the 401).
            error = exc
            if isinstance(exc, Unauthorized) and not exc.expired and limits.anonymous is not None:
                client = scope.get("client")
                address = client[0] if client else "unknown"
                decision = await limits.limiter.hit("anonymous", address, limits.anonymous)
                if not decision.allowed:
                    error = RateLimited(decision, "failed authentication attempts")
            await _refuse(error, scope, receive, send)
            return
        state["principal"] = principal
        USER_ID.set(principal.user_id)  # (the request's own context: see EdgeMiddleware)
        if limits.user is None:
            await self.app(scope, receive, send)
            return

        user, limiter = principal.user_id, limits.limiter
        leased = limiter.take("user", user, limits.user)
        if leased is not None:  # counted already, with an earlier request (RateLimiter)
            state["quota"] = leased.raw_headers()  # (EdgeMiddleware adds them to the answer)
            await self.app(scope, receive, send)
            return
        read = scope["method"] in _READS
        # A read changes nothing, so it is counted while it runs rather than before: the
        # counter's script goes to Redis in the same turn of the event loop as the read's own
        # first command, so that both are under way at once and the request waits for no round
        # trip of its own. So is a write while its user is well within the limit
        # (RateLimiter.ahead).
        alongside = not self._refusing(user) if read else limiter.ahead("user", user, limits.user)
        counting = limiter.hit("user", user, limits.user, lease=True)
        if not alongside:
            decision = await counting
            if not decision.allowed:
                self._refused_until(user, decision)
                await _refuse(RateLimited(decision, "requests"), scope, receive, send)
                return
            state["quota"] = decision.raw_headers()
            await self.app(scope, receive, send)
            return

        # The answer waits for the count. Over the limit, a read's answer is a 429 (its result
        # dropped) and a write's is its own (it has been done; a client is told with
        # `RateLimit-Remaining: 0`); either way the user's next requests are counted before
        # they run until the window resets (a refused client does not keep the store busy).
        pending = asyncio.ensure_future(counting)
        refused = False

        async def send_when_counted(message: Message) -> None:
            nonlocal refused
            if refused:
                raise _Refused()  # e.g. an event stream that would go on: end it
            if message["type"] == "http.response.start":
                decision = await pending
                if not decision.allowed:
                    self._refused_until(user, decision)
                    if read:
                        refused = True
                        await _refuse(RateLimited(decision, "requests"), scope, receive, send)
                        raise _Refused()
                message["headers"] = [*message.get("headers", ()), *decision.raw_headers()]
            await send(message)

        try:
            await self.app(scope, receive, send_when_counted)
        except* _Refused:  # (raised through a task group by a streaming response)
            pass
        finally:
            if not pending.done():
                await asyncio.shield(pending)  # counted all the same
            elif not pending.cancelled():
                pending.exception()  # retrieved (raised, if at all, by the response above)

    def _refusing(self, user_id: str) -> bool:
        until = self._refused.get(user_id)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._refused[user_id]
        return False

    def _refused_until(self, user_id: str, decision: Decision) -> None:
        if len(self._refused) >= _REFUSED_MAX:  # bounded: forget the oldest refusals
            for stale in list(self._refused)[: _REFUSED_MAX // 2]:
                del self._refused[stale]
        self._refused[user_id] = time.monotonic() + decision.reset_seconds


_READS = frozenset({"GET", "HEAD"})
_REFUSED_MAX = 10_000


class _Refused(Exception):
    """A read that was over the limit once it was counted: its answer was replaced by a 429."""


async def _refuse(error: AppError, scope: Scope, receive: Receive, send: Send) -> None:
    response = problem_response(error.status, error.detail, code=error.code, headers=error.headers)
    await response(scope, receive, send)


def principal_of(request: Request) -> Principal:
    """The authenticated caller of a request (set by AuthMiddleware). Read from the scope's
    state itself: Starlette's `request.state` builds a wrapper (after a failed attribute
    lookup) on each request, 1-2% of a page read."""
    principal: Principal = request.scope["state"]["principal"]
    return principal
