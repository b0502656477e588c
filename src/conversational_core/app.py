"""The application factory. Nothing connects at import time: the lifespan opens the backend
(store, event hub, job queue), the token verifier and — unless WORKER_IN_API is off — a reply
worker, hands them to requests as typed state, and closes them in reverse order."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any, TypedDict

from fastapi import FastAPI
from loguru import logger

from conversational_core import __version__
from conversational_core.auth.middleware import AuthMiddleware
from conversational_core.auth.tokens import TokenVerifier
from conversational_core.conversations.endpoints import router as conversations_router
from conversational_core.conversations.service import ConversationService
from conversational_core.errors import install_error_handlers
from conversational_core.health import router as health_router
from conversational_core.messages.endpoints import router as messages_router
from conversational_core.messages.service import MessageService
from conversational_core.observability.logging import configure_logging
from conversational_core.observability.middleware import EdgeMiddleware
from conversational_core.replies.endpoints import router as replies_router
from conversational_core.replies.worker import run_worker
from conversational_core.settings import Settings, load_settings
from conversational_core.storage.base import EventHub, JobQueue, Store
from conversational_core.storage.factory import Backend, open_backend


class State(TypedDict):
    """What every request sees as `request.state`."""

    settings: Settings
    store: Store
    events: EventHub
    jobs: JobQueue
    verifier: TokenVerifier
    conversations: ConversationService
    messages: MessageService


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """Build the ASGI app. `backend` lets tests inject an already-open one."""
    settings = settings or load_settings()
    configure_logging(settings)

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
            gc.collect()
            gc.freeze()
            yield State(
                settings=settings,
                store=active.store,
                events=active.events,
                jobs=active.jobs,
                verifier=verifier,
                conversations=ConversationService(active.store, settings),
                messages=MessageService(active.store, settings),
            )

    docs = settings.DOCS_ENABLED
    app = FastAPI(
        title="Conversational Core",
        version=__version__,
        description="Conversations, messages and streamed AI replies.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    # Routers are matched in order: the hottest routes first.
    app.include_router(messages_router)
    app.include_router(conversations_router)
    app.include_router(replies_router)
    app.include_router(health_router)
    # Outermost last: EdgeMiddleware (request id, body limits) wraps AuthMiddleware.
    app.add_middleware(AuthMiddleware)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.MAX_BODY_BYTES)
    _declare_bearer_auth(app)
    return app


def _declare_bearer_auth(app: FastAPI) -> None:
    """Every operation but the operational ones needs a bearer JWT (the "Authorize" button of
    /docs). Declared here because the auth dependency reads the header itself."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
        }
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/health"):
                continue
            for operation in operations.values():
                operation["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
