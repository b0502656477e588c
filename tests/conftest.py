"""Shared fixtures: a real Redis (own key prefix per test), a real Redis Cluster (started once per
session, on first use) and the embedded store."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
import uuid_utils
from testkit.redis import RedisCluster, redis_cluster

from conversational_core.app import create_app
from conversational_core.settings import Settings, load_settings
from conversational_core.storage.base import Store
from conversational_core.storage.embedded.limiter import MemoryCounters
from conversational_core.storage.embedded.sqlite import SqliteStore, open_sqlite_store
from conversational_core.storage.factory import Backend
from conversational_core.storage.redis.client import Connection
from conversational_core.storage.redis.events import RedisEventHub
from conversational_core.storage.redis.keys import Keys
from conversational_core.storage.redis.limiter import RedisCounters
from conversational_core.storage.redis.queue import RedisJobQueue
from conversational_core.storage.redis.store import RedisStore
from tests.fixtures.app import app_client

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


pytest_plugins = ["tests.fixtures.replies"]


def make_settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "ENVIRONMENT": "test",
        "REDIS_URL": None,
        "LOG_LEVEL": "WARNING",
        "DEV_PROVIDER_DELAY_MS": 0,
        # A title is one more completion: tests that count a model's requests or script its
        # answers would see it. Tests of titles turn it on.
        "AUTO_TITLE": False,
    }
    base.update(overrides)
    return load_settings(**base)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; only its keys are removed at the end."""
    name = f"test-{uuid_utils.uuid4().hex[:12]}"
    yield name
    cleaner = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in cleaner.scan_iter(match=f"{name}:*", count=1000)]
    if keys:
        await cleaner.unlink(*keys)
    await cleaner.aclose()


# Stores keep pages as the service's do (PAGE_CACHE_MB's default): every test that reads after a
# write checks that a kept page is not served stale.
PAGE_CACHE_BYTES = Settings.model_fields["PAGE_CACHE_MB"].default * 2**20

# Generous: on a loaded CI machine (a cluster of six servers, four test processes, coverage) a
# burst of requests can wait seconds; a store timeout there is a 503, not what the test checks.
STORE_TIMEOUT = 20


@pytest.fixture
async def redis_store(prefix: str) -> AsyncIterator[RedisStore]:
    connection = Connection.open(
        REDIS_URL, socket_timeout=STORE_TIMEOUT, connect_timeout=2, max_connections=200
    )
    try:
        await connection.ping()
    except Exception as exc:  # pragma: no cover - environment problem, not a test result
        pytest.fail(f"tests need Redis at {REDIS_URL} (make test starts one): {exc!r}")
    store = RedisStore(connection, Keys(prefix), page_cache_bytes=PAGE_CACHE_BYTES)
    yield store
    await store.close()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """3 primaries and 3 replicas, shared by the session (tests keep to their own prefix)."""
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as running:
        yield running


@pytest.fixture
async def cluster_store(cluster: RedisCluster, prefix: str) -> AsyncIterator[RedisStore]:
    connection = Connection.open(
        cluster.url,
        socket_timeout=STORE_TIMEOUT,
        connect_timeout=2,
        max_connections=200,
        cluster=True,
    )
    store = RedisStore(connection, Keys(prefix), page_cache_bytes=PAGE_CACHE_BYTES)
    yield store
    await store.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_sqlite_store(tmp_path / "data") as store:
        yield store


@pytest.fixture(params=["redis", "cluster"])
def any_redis_store(request: pytest.FixtureRequest) -> RedisStore:
    """A store on a single Redis server, then on the cluster."""
    fixture: RedisStore = request.getfixturevalue(f"{request.param}_store")
    return fixture


@pytest.fixture(params=["redis", "cluster", "sqlite"])
def store(request: pytest.FixtureRequest) -> Store:
    fixture: Store = request.getfixturevalue(f"{request.param}_store")
    return fixture


@pytest.fixture
def settings() -> Settings:
    return make_settings()


def url_of(store: RedisStore) -> str:
    """The URL a test store was opened with (the event hub opens connections of its own)."""
    client = store.redis.client
    if store.redis.cluster:
        node = client.startup_nodes[0]  # type: ignore[union-attr]
        return f"redis://{node.host}:{node.port}"
    return REDIS_URL


def backend_for(store: Store, settings: Settings) -> Backend:
    """The event hub, job queue and counters that go with a store, as open_backend would build
    them."""
    if isinstance(store, RedisStore):
        return Backend(
            store,
            RedisEventHub(store, url_of(store), client_buffer=settings.SSE_CLIENT_BUFFER),
            RedisJobQueue(store.redis, store.keys, lease_seconds=settings.JOB_LEASE_SECONDS),
            RedisCounters(store.redis, store.keys),
        )
    assert isinstance(store, SqliteStore)
    return Backend(store, store.events, store.jobs, MemoryCounters())


@pytest.fixture
async def backend(store: Store, settings: Settings) -> AsyncIterator[Backend]:
    active = backend_for(store, settings)
    yield active
    await active.events.close()


@pytest.fixture
async def client(backend: Backend, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(create_app(settings, backend=backend)) as http:
        yield http
