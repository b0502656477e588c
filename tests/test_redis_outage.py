"""Redis going away and coming back: 503 with Retry-After, then 2xx again without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from testkit.redis import RedisProcess

from conversational_core.app import create_app
from tests.conftest import make_settings
from tests.fixtures.app import app_client, auth


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.redis_restart
async def test_store_outage_and_recovery(own_redis: RedisProcess) -> None:
    settings = make_settings(
        REDIS_URL=own_redis.url,
        REDIS_SOCKET_TIMEOUT=1.0,
        REDIS_CONNECT_TIMEOUT=0.5,
        RATE_LIMIT="60/minute",  # (counted request by request: too small for leases)
    )
    alice = auth(settings, "alice")
    async with app_client(create_app(settings)) as client:
        cid = (await client.post("/conversations", headers=alice, json={})).json()["id"]
        assert (await client.get("/health")).status_code == 200

        skipped = REGISTRY.get_sample_value("conversational_core_rate_limiter_errors_total") or 0
        errors = {"component": "api"}
        failed = REGISTRY.get_sample_value("conversational_core_store_errors_total", errors) or 0
        own_redis.stop()
        for method, url, body in [
            ("GET", "/conversations", None),
            ("POST", f"/conversations/{cid}/messages", {"content": "x", "respond": False}),
            ("GET", f"/conversations/{cid}", None),
        ]:
            response = await client.request(method, url, headers=alice, json=body)
            assert response.status_code == 503, (url, response.text)
            assert response.headers["retry-after"]
            assert response.headers["content-type"] == "application/problem+json"
            assert "127.0.0.1" not in response.text and "Error" not in response.json()["detail"]
        # The rate limiter could not count them either: it let them through (fail open), so
        # the answer is the store's 503, never a 429 or a 500.
        counted = REGISTRY.get_sample_value("conversational_core_rate_limiter_errors_total")
        assert counted is not None and counted > skipped
        assert REGISTRY.get_sample_value("conversational_core_store_errors_total", errors) == (
            failed + 3
        )
        health = await client.get("/health")
        assert health.status_code == 503 and health.headers["retry-after"]
        assert health.json()["status"] == "unavailable"

        own_redis.start()  # a fresh, empty server on the same port (nothing is kept on disk)
        assert (await client.get("/health")).status_code == 200
        created = await client.post("/conversations", headers=alice, json={"title": "back"})
        assert created.status_code == 201
        cid2 = created.json()["id"]
        posted = await client.post(
            f"/conversations/{cid2}/messages",
            headers=alice,
            json={"content": "hello again", "respond": False},
        )
        assert posted.status_code == 201  # Lua scripts were reloaded after the restart
        listed = await client.get(f"/conversations/{cid2}/messages", headers=alice)
        assert [m["content"] for m in listed.json()["items"]] == ["hello again"]


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path, options=("--requirepass", "s3cret"))
    server.start(wait=False)  # (it answers PING with NOAUTH: nothing to wait on but the port)
    yield server
    server.stop()


@pytest.mark.redis_restart
async def test_credentials_redis_refuses_are_an_outage_not_a_bug(
    locked_redis: RedisProcess, tmp_path: Path
) -> None:
    """A password missing, wrong, or sent to a server that has none (a deployment's mistake,
    or a password rotated under a running service): every request and /health answer 503,
    as in any outage, not 500 (a bug) - and the service recovers once the password is right."""
    plain = RedisProcess(tmp_path / "plain")
    (tmp_path / "plain").mkdir()
    plain.start()
    try:
        url = locked_redis.url
        for wrong in (
            url,
            url.replace("redis://", "redis://:wrong@"),
            plain.url.replace("redis://", "redis://:pw@"),
        ):
            settings = make_settings(
                REDIS_URL=wrong, REDIS_SOCKET_TIMEOUT=1.0, REDIS_CONNECT_TIMEOUT=0.5
            )
            async with app_client(create_app(settings)) as client:
                health = await client.get("/health")
                assert health.status_code == 503, (wrong, health.text)
                assert health.json()["status"] == "unavailable"
                posted = await client.post(
                    "/conversations", headers=auth(settings, "alice"), json={}
                )
                assert posted.status_code == 503, (wrong, posted.text)
                assert posted.headers["retry-after"]
                assert "s3cret" not in posted.text and "wrong" not in posted.text
        right = make_settings(REDIS_URL=url.replace("redis://", "redis://:s3cret@"))
        async with app_client(create_app(right)) as client:
            assert (await client.get("/health")).status_code == 200
    finally:
        plain.stop()
