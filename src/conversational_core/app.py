"""The application factory. Nothing connects at import time: the lifespan opens the backend
(store, event hub, job queue), the token verifier and — unless WORKER_IN_API is off — a reply
worker, hands them to requests as typed state, and closes them in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import TypedDict

from fastapi import FastAPI
from loguru import logger

from conversational_core import __version__, openapi, routing
from conversational_core.auth.middleware import AuthMiddleware
from conversational_core.auth.tokens import TokenVerifier
from conversational_core.conversations.endpoints import router as conversations_router
from conversational_core.conversations.service import ConversationService
from conversational_core.errors import install_error_handlers
from conversational_core.health import router as health_router
from conversational_core.messages.endpoints import router as messages_router
from conversational_core.messages.service import MessageService
from conversational_core.observability import metrics
from conversational_core.observability.errors import configure_sentry
from conversational_core.observability.logging import configure_logging
from conversational_core.observability.middleware import EdgeMiddleware
from conversational_core.ratelimit import Limits
from conversational_core.replies.endpoints import OpenStreams
from conversational_core.replies.endpoints import router as replies_router
from conversational_core.replies.worker import run_worker
from conversational_core.runtime import settle_gc, stopped
from conversational_core.settings import Settings, load_settings
from conversational_core.storage.base import EventHub, JobQueue, Store
from conversational_core.storage.factory import Backend, open_backend

# What a browser page may send and read across origins (CORS_ORIGINS).
CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "If-Match",
    "Idempotency-Key",
    "Last-Event-ID",
    "X-Request-ID",
    "X-On-Behalf-Of",
]
CORS_RESPONSE_HEADERS = [
    "ETag",
    "Location",
    "Retry-After",
    "X-Request-ID",
    "Idempotent-Replayed",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
]


# Routes are matched in order: the hottest first (the messages list and append).
_ROUTERS = (messages_router, conversations_router, replies_router, health_router)


class State(TypedDict):
    """What every request sees as `request.state`."""

    settings: Settings
    store: Store
    events: EventHub
    jobs: JobQueue
    verifier: TokenVerifier
    limits: Limits
    conversations: ConversationService
    messages: MessageService
    streams: OpenStreams
    page_meter: metrics.PageCopyMeter


PAGE_METER_SECONDS = 5.0  # how often a process's page counts reach its metrics


async def _every(seconds: float, call: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            call()
        except Exception:  # (e.g. the metrics directory full): next time, and said
            logger.exception("periodic {} failed", getattr(call, "__qualname__", call))


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """Build the ASGI app. `backend` lets tests inject an already-open one."""
    settings = settings or load_settings()
    configure_logging(settings)
    configure_sentry(settings, "api")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[State]:
        async with contextlib.AsyncExitStack() as stack:
            active: Backend
            if backend is not None:
                active = backend
            else:
                active = await stack.enter_async_context(open_backend(settings))
            verifier = TokenVerifier(settings)
            stack.push_async_callback(verifier.aclose)
            if settings.WORKER_IN_API:
                await stack.enter_async_context(run_worker(settings, active))
            elif not settings.REDIS_URL:
                logger.warning(
                    "WORKER_IN_API is off on the embedded store: replies are queued "
                    "but written only once a process with the worker starts"
                )
            # Start-up objects (modules, settings, clients) never die: keep them out of the
            # collector's full scans, which otherwise stall the loop as connections pile up.
            limits = Limits.build(settings, active.counters)
            stack.callback(metrics.process_exited, os.getpid())
            page_meter = metrics.PageCopyMeter(active.store)
            if active.store.page_copy_stats() is not None:
                metering = asyncio.create_task(_every(PAGE_METER_SECONDS, page_meter.sync))
                stack.callback(page_meter.close)
                stack.push_async_callback(stopped, metering)
            settle_gc()
            yield State(
                settings=settings,
                store=active.store,
                events=active.events,
                jobs=active.jobs,
                verifier=verifier,
                limits=limits,
                conversations=ConversationService(active.store, settings),
                messages=MessageService(active.store, settings, limits),
                streams=OpenStreams(settings.SSE_MAX_STREAMS_PER_USER),
                page_meter=page_meter,
            )

    docs = settings.docs_enabled
    app = FastAPI(
        title="Conversational Core",
        version=__version__,
        description="Conversations, messages and streamed AI replies.",
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry is not used here (metrics: Prometheus; errors: Sentry);
        # left on, it asks OpenTelemetry for its providers on every request (~2% of a page).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    routes = [route for router in _ROUTERS for route in router.routes]
    routing.install(app, routes)
    openapi.install(app, settings)
    # Outermost last: EdgeMiddleware (hosts, request id, limits, CORS for CORS_ORIGINS, metrics,
    # access line) wraps AuthMiddleware, so that a preflight needs no token and a 401 is
    # readable by the page.
    app.add_middleware(AuthMiddleware)
    cors = None
    if settings.CORS_ORIGINS:
        cors = {
            "allow_origins": settings.CORS_ORIGINS,
            "allow_credentials": settings.CORS_ALLOW_CREDENTIALS,
            "allow_methods": ["GET", "POST", "PUT", "DELETE"],  # (what the routes answer)
            "allow_headers": CORS_REQUEST_HEADERS,
            "expose_headers": CORS_RESPONSE_HEADERS,
            "max_age": 600,
        }
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.MAX_BODY_BYTES,
        allowed_hosts=settings.ALLOWED_HOSTS,
        production=settings.is_production,
        access_log=logger.level(settings.LOG_LEVEL).no <= logger.level("INFO").no,
        cors=cors,
        routes=routes,
    )
    return app
