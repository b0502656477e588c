"""The application factory. Nothing connects at import time: the lifespan builds the store, the
token verifier and the services, hands them to requests as typed state, and closes them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypedDict

from fastapi import FastAPI

from conversational_core import __version__
from conversational_core.auth.tokens import TokenVerifier
from conversational_core.conversations.endpoints import router as conversations_router
from conversational_core.conversations.service import ConversationService
from conversational_core.errors import install_error_handlers
from conversational_core.health import router as health_router
from conversational_core.messages.endpoints import router as messages_router
from conversational_core.messages.service import MessageService
from conversational_core.observability.logging import configure_logging
from conversational_core.observability.middleware import EdgeMiddleware
from conversational_core.settings import Settings, load_settings
from conversational_core.storage.base import Store
from conversational_core.storage.factory import open_store


class State(TypedDict):
    """What every request sees as `request.state`."""

    settings: Settings
    store: Store
    verifier: TokenVerifier
    conversations: ConversationService
    messages: MessageService


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """Build the ASGI app. `store` lets tests inject an already-open store."""
    settings = settings or load_settings()
    configure_logging(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[State]:
        async with contextlib.AsyncExitStack() as stack:
            active = (
                store
                if store is not None
                else await stack.enter_async_context(open_store(settings))
            )
            verifier = TokenVerifier(settings)
            stack.push_async_callback(verifier.aclose)
            yield State(
                settings=settings,
                store=active,
                verifier=verifier,
                conversations=ConversationService(active, settings),
                messages=MessageService(active, settings),
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
    app.include_router(health_router)
    app.include_router(conversations_router)
    app.include_router(messages_router)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.MAX_BODY_BYTES)
    return app
