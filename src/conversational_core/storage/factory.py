"""Pick the backend from the settings: Redis when REDIS_URL is set, the embedded store otherwise.

A backend is the store, the event hub that fans events out to this process's clients, the job
queue of the reply workers, and the counters of the rate limits (see base.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from conversational_core.settings import Settings
from conversational_core.storage.base import Counters, EventHub, JobQueue, Store


@dataclass(frozen=True, slots=True)
class Backend:
    store: Store
    events: EventHub
    jobs: JobQueue
    counters: Counters


@contextlib.asynccontextmanager
async def open_backend(settings: Settings, *, worker: bool = False) -> AsyncIterator[Backend]:
    """`worker`: for a reply worker's process, whose Redis commands go over one connection of
    the fast client instead of two used in turn (the API's): a loop turn's commands then go
    out in one write and their replies come back in one read, where two connections took two
    of each. The worker's replies are small; the API's pages of 50 come back faster over two
    (README). At 500 x 200 x 2 ms (bench/relay.py, 6 measurements a side): the workers' CPU a
    token 33.7 against 38.6 µs (medians), Redis's 6.2 against 7.5."""
    if settings.REDIS_URL:
        from conversational_core.storage.redis.events import RedisEventHub
        from conversational_core.storage.redis.limiter import RedisCounters
        from conversational_core.storage.redis.queue import RedisJobQueue
        from conversational_core.storage.redis.store import open_redis_store

        async with open_redis_store(
            settings.REDIS_URL,
            prefix=settings.REDIS_KEY_PREFIX,
            socket_timeout=settings.REDIS_SOCKET_TIMEOUT,
            connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
            max_connections=settings.REDIS_MAX_CONNECTIONS,
            events_max_len=settings.EVENTS_MAX_LEN,
            events_ttl_seconds=settings.EVENTS_TTL_SECONDS,
            cluster=settings.REDIS_CLUSTER,
            page_cache_bytes=settings.PAGE_CACHE_MB * 2**20,
            fast_connections=1 if worker else 2,
        ) as store:
            hub = RedisEventHub(
                store,
                settings.REDIS_URL,
                client_buffer=settings.SSE_CLIENT_BUFFER,
                connect_timeout=settings.REDIS_CONNECT_TIMEOUT,
            )
            jobs = RedisJobQueue(store.redis, store.keys, lease_seconds=settings.JOB_LEASE_SECONDS)
            try:
                yield Backend(store, hub, jobs, RedisCounters(store.redis, store.keys))
            finally:
                await hub.close()
                await jobs.close()
    else:
        from conversational_core.storage.embedded.limiter import MemoryCounters
        from conversational_core.storage.embedded.sqlite import open_sqlite_store

        async with open_sqlite_store(
            settings.DATA_DIR,
            events_max_len=settings.EVENTS_MAX_LEN,
            client_buffer=settings.SSE_CLIENT_BUFFER,
            lease_seconds=settings.JOB_LEASE_SECONDS,
        ) as store:
            yield Backend(store, store.events, store.jobs, MemoryCounters())
