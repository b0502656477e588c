"""Pick the store from the settings: Redis when REDIS_URL is set, the embedded store otherwise."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from conversational_core.settings import Settings
from conversational_core.storage.base import Store


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Store]:
    if settings.REDIS_URL:
        from conversational_core.storage.redis import open_redis_store

        async with open_redis_store(
            settings.REDIS_URL,
            prefix=settings.REDIS_KEY_PREFIX,
            socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
            connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
            max_connections=settings.REDIS_MAX_CONNECTIONS,
        ) as redis_store:
            yield redis_store
    else:
        from conversational_core.storage.sqlite import open_sqlite_store

        async with open_sqlite_store(settings.DATA_DIR) as sqlite_store:
            yield sqlite_store
