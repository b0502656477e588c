"""Pick the backend from the settings: Redis when REDIS_URL is set, the embedded store otherwise.

A backend is the store, the event hub that fans events out to this process's clients, and the
job queue of the reply workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from conversational_core.settings import Settings
from conversational_core.storage.base import EventHub, JobQueue, Store


@dataclass(frozen=True, slots=True)
class Backend:
    store: Store
    events: EventHub
    jobs: JobQueue


@contextlib.asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[Backend]:
    if settings.REDIS_URL:
        from conversational_core.storage.redis import open_redis_store
        from conversational_core.storage.redis_events import RedisEventHub
        from conversational_core.storage.redis_queue import RedisJobQueue

        async with open_redis_store(
            settings.REDIS_URL,
            prefix=settings.REDIS_KEY_PREFIX,
            socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
            connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
            max_connections=settings.REDIS_MAX_CONNECTIONS,
            events_max_len=settings.EVENTS_MAX_LEN,
            events_ttl_seconds=settings.EVENTS_TTL_SECONDS,
            cluster=settings.REDIS_CLUSTER,
        ) as redis_store:
            hub = RedisEventHub(
                redis_store,
                settings.REDIS_URL,
                client_buffer=settings.SSE_CLIENT_BUFFER,
                connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
            )
            jobs = RedisJobQueue(redis_store, lease_seconds=settings.JOB_LEASE_SECONDS)
            try:
                yield Backend(redis_store, hub, jobs)
            finally:
                await hub.close()
                await jobs.close()
    else:
        from conversational_core.storage.sqlite import open_sqlite_store

        async with open_sqlite_store(
            settings.DATA_DIR,
            events_max_len=settings.EVENTS_MAX_LEN,
            client_buffer=settings.SSE_CLIENT_BUFFER,
            lease_seconds=settings.JOB_LEASE_SECONDS,
        ) as sqlite_store:
            yield Backend(sqlite_store, sqlite_store.events, sqlite_store.jobs)
