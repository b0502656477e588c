"""Production behaviour seen from outside: metrics, logs, rate limits, CORS and hosts, security
headers, Sentry, health probes."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from conversational_core.app import create_app
from conversational_core.auth.tokens import issue_token
from conversational_core.settings import Settings
from conversational_core.storage.base import Store
from conversational_core.storage.factory import Backend
from conversational_core.storage.redis.client import Connection
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import REDIS_URL, backend_for, make_settings
from tests.fixtures.app import app_client, auth
from tests.fixtures.http_server import QuietHandler, local_http_server
from tests.fixtures.live import SseEvent, collect_until_end, serve, sse_events
from tests.fixtures.metrics import value
from tests.fixtures.server import sigterm_received, start_service

SECRET = "a-production-secret-of-more-than-32-bytes!"


@pytest.fixture
async def app_on(store: Store) -> AsyncIterator[tuple[Settings, Backend]]:
    settings = make_settings()
    active = backend_for(store, settings)
    yield settings, active
    await active.events.close()


# --- Metrics --------------------------------------------------------------------------------------


async def test_metrics_follow_requests_messages_and_replies(
    app_on: tuple[Settings, Backend],
) -> None:
    settings, active = app_on
    alice = auth(settings, "alice")
    async with (
        serve(create_app(settings, backend=active)) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as http,
    ):
        before = (await http.get("/metrics")).text
        cid = (await http.post("/conversations", json={}, headers=alice)).json()["id"]
        posted = await http.post(
            f"/conversations/{cid}/messages", json={"content": "hi"}, headers=alice
        )
        reply_id = posted.json()["reply_message_id"]
        await collect_until_end(http, f"/conversations/{cid}/events", alice, reply_id, "0")
        assert (await http.get(f"/conversations/{cid}")).status_code == 401
        after = (await http.get("/metrics")).text

    template = "/conversations/{conversation_id}/messages"
    delta = value(
        after, "conversational_core_requests_total", endpoint=template, method="POST", status="201"
    ) - value(
        before, "conversational_core_requests_total", endpoint=template, method="POST", status="201"
    )
    assert delta == 1
    unauthorized = "/conversations/{conversation_id}"
    assert (
        value(
            after,
            "conversational_core_requests_total",
            endpoint=unauthorized,
            method="GET",
            status="401",
        )
        >= 1
    )
    for name, labels, moved in [
        ("conversational_core_conversations_total", {}, 1),
        ("conversational_core_messages_total", {"role": "user"}, 1),
        ("conversational_core_messages_total", {"role": "assistant"}, 1),
        ("conversational_core_replies_total", {"outcome": "completed"}, 1),
        ("conversational_core_reply_time_to_first_token_seconds_count", {"provider": "dev"}, 1),
        (
            "conversational_core_reply_duration_seconds_count",
            {"provider": "dev", "outcome": "completed"},
            1,
        ),
    ]:
        assert value(after, name, **labels) - value(before, name, **labels) == moved, name
    tokens = value(after, "conversational_core_tokens_total", provider="dev", kind="completion")
    assert tokens > value(
        before, "conversational_core_tokens_total", provider="dev", kind="completion"
    )
    assert (
        value(
            after,
            "conversational_core_request_duration_seconds_count",
            method="POST",
            endpoint=template,
        )
        >= 1
    )
    assert "conversational_core_queue_jobs" in after
    assert "conversational_core_sse_connections" in after
    # No raw id in any label: only route templates and fixed sets.
    assert cid not in after and reply_id not in after and "alice" not in after


def test_metrics_add_up_across_two_worker_processes(prefix: str) -> None:
    env = {"REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": prefix, "WORKERS": "2", "JWT_SECRET": SECRET}
    token = issue_token(make_settings(JWT_SECRET=SECRET), "alice", [])
    with start_service(env) as service, httpx.Client(base_url=service.url) as http:
        headers = {"Authorization": f"Bearer {token}"}
        for _ in range(40):  # new connections: the kernel spreads them over both processes
            with httpx.Client(base_url=service.url, headers=headers) as one:
                assert one.post("/conversations", json={}).status_code == 201
        totals = [
            value(http.get("/metrics").text, "conversational_core_conversations_total")
            for _ in range(6)  # whichever process answers, the sum is the same
        ]

        def created() -> float:
            return value(
                http.get("/metrics").text,
                "conversational_core_requests_total",
                endpoint="/conversations",
                method="POST",
                status="201",
            )

        # Request counts are handed over by each process within a second (RequestTally).
        deadline = time.monotonic() + 5
        while created() < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        counted = [created() for _ in range(6)]
    assert totals == [40.0] * 6
    assert counted == [40.0] * 6


async def test_queue_gauges_and_cancelled_replies(store: Store) -> None:
    settings = make_settings(WORKER_IN_API=False)  # nobody takes the job: it waits
    active = backend_for(store, settings)
    alice = auth(settings, "alice")
    async with app_client(create_app(settings, backend=active)) as http:
        before = (await http.get("/metrics")).text
        assert value(before, "conversational_core_queue_jobs") == 0
        cid = (await http.post("/conversations", json={}, headers=alice)).json()["id"]
        posted = time.monotonic()
        sent = await http.post(
            f"/conversations/{cid}/messages", json={"content": "hi"}, headers=alice
        )
        waiting = (await http.get("/metrics")).text
        waited = time.monotonic() - posted
        assert value(waiting, "conversational_core_queue_jobs") == 1
        # The job's age: no older than the time since it was asked for (Redis stream ids are
        # in milliseconds of the wall clock: a millisecond of slack), and it grows.
        age = value(waiting, "conversational_core_queue_oldest_job_age_seconds")
        assert 0 <= age <= waited + 0.002, (age, waited)
        later = value(
            (await http.get("/metrics")).text, "conversational_core_queue_oldest_job_age_seconds"
        )
        assert later >= age
        reply = sent.json()["reply_message_id"]
        cancelled = await http.post(f"/conversations/{cid}/messages/{reply}/cancel", headers=alice)
        assert cancelled.status_code == 200
        after = (await http.get("/metrics")).text
    await active.events.close()
    moved = value(after, "conversational_core_replies_total", outcome="cancelled") - value(
        before, "conversational_core_replies_total", outcome="cancelled"
    )
    assert moved == 1


# --- Logs -----------------------------------------------------------------------------------------


def test_production_logs_are_json_with_request_id_and_never_a_token(prefix: str) -> None:
    env = {
        "ENVIRONMENT": "production",
        "JWT_SECRET": SECRET,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "LOG_LEVEL": "DEBUG",
    }
    token = issue_token(make_settings(JWT_SECRET=SECRET), "alice", [])
    forged = token[:-4] + "AAAA"
    with start_service(env) as service, httpx.Client(base_url=service.url) as http:
        ok = http.post(
            "/conversations",
            json={"title": "secret plans"},
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": "req-42"},
        )
        assert ok.status_code == 201
        bad = http.get("/conversations", headers={"Authorization": f"Bearer {forged}"})
        assert bad.status_code == 401
        service.proc.terminate()
        service.proc.wait(timeout=30)
    lines = [line for line in service.lines if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [r for r in records if r.get("access")]
    created = next(r for r in access if r["method"] == "POST")
    assert created["request_id"] == "req-42" and created["status"] == 201
    assert created["user_id"] == "alice" and created["path"] == "/conversations"
    refused = next(r for r in access if r["status"] == 401)
    assert refused["request_id"] == bad.headers["x-request-id"]
    output = service.output
    assert token not in output and forged not in output
    assert token.split(".")[2] not in output  # not even the signature
    assert "secret plans" not in output  # no message or conversation text


# --- Rate limits ----------------------------------------------------------------------------------


def _hammer(url: str, token: str, n: int) -> list[httpx.Response]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        return [http.get("/conversations") for _ in range(n)]


def test_rate_limit_holds_across_two_processes(prefix: str) -> None:
    env = {
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "RATE_LIMIT": "20/minute",
        "JWT_SECRET": SECRET,
    }
    settings = make_settings(JWT_SECRET=SECRET)
    alice = issue_token(settings, "alice", [])
    bob = issue_token(settings, "bob", [])
    with start_service(env) as one, start_service(env) as two:
        responses = _hammer(one.url, alice, 13) + _hammer(two.url, alice, 12)
        others = _hammer(two.url, bob, 3)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 20 and statuses.count(429) == 5, statuses
    assert statuses[:20] == [200] * 20
    for refused in responses[20:]:
        assert 0 < int(refused.headers["retry-after"]) <= 60
        assert refused.headers["ratelimit-remaining"] == "0"
        assert refused.headers["content-type"] == "application/problem+json"
    assert responses[0].headers["ratelimit-limit"] == "20"
    assert responses[0].headers["ratelimit-remaining"] == "19"
    assert [r.status_code for r in others] == [200] * 3  # another user is unaffected


async def test_rate_limits_per_user_ai_and_anonymous(store: Store) -> None:
    settings = make_settings(
        RATE_LIMIT="9/minute", AI_RATE_LIMIT="2/minute", ANONYMOUS_RATE_LIMIT="3/minute"
    )
    active = backend_for(store, settings)
    alice, bob = auth(settings, "alice"), auth(settings, "bob")
    async with app_client(create_app(settings, backend=active)) as http:
        cid = (await http.post("/conversations", json={}, headers=alice)).json()["id"]
        url = f"/conversations/{cid}/messages"
        retry = {**alice, "Idempotency-Key": "ask-1"}
        asks = [await http.post(url, json={"content": "q"}, headers=retry) for _ in range(3)]
        assert [r.status_code for r in asks] == [201, 201, 201]  # one reply, retried: 1 spent
        nowhere = await http.post(
            "/conversations/nope/messages", json={"content": "q"}, headers=alice
        )
        assert nowhere.status_code == 404  # no reply queued: nothing spent
        asks = [await http.post(url, json={"content": "q"}, headers=alice) for _ in range(2)]
        assert [r.status_code for r in asks] == [201, 429]
        assert "AI replies" in asks[1].json()["detail"] and asks[1].headers["retry-after"]
        quiet = await http.post(url, json={"content": "note", "respond": False}, headers=alice)
        assert quiet.status_code == 201  # only AI replies have the second budget
        rest = [await http.get("/conversations", headers=alice) for _ in range(2)]
        assert [r.status_code for r in rest] == [200, 429]  # 10 requests in all
        assert (await http.get("/conversations", headers=bob)).status_code == 200

        stale = {"Authorization": f"Bearer {issue_token(settings, 'alice', [], -120)}"}
        expired = [await http.get("/conversations", headers=stale) for _ in range(4)]
        assert [r.status_code for r in expired] == [401] * 4  # expiry is no guess: refresh
        guesses = [
            await http.get("/conversations", headers={"Authorization": "Bearer nope"})
            for _ in range(4)
        ]
        assert [r.status_code for r in guesses] == [401, 401, 401, 429]
        counted = (await http.get("/metrics")).text
        for scope in ("ai", "user", "anonymous"):
            assert value(counted, "conversational_core_rate_limited_total", scope=scope) >= 1
        assert (await http.get("/health/live")).status_code == 200  # probes are never limited
    await active.events.close()


async def test_reads_over_the_limit_are_refused_streams_too(store: Store) -> None:
    """Reads are counted while they run (sharing their Redis round trip): over the limit the
    answer is still a 429, for a page as for an event stream, and nothing else is sent."""
    settings = make_settings(RATE_LIMIT="3/minute")
    active = backend_for(store, settings)
    alice = auth(settings, "alice")
    async with app_client(create_app(settings, backend=active)) as http:
        cid = (await http.post("/conversations", json={}, headers=alice)).json()["id"]
        page = await http.get(f"/conversations/{cid}/messages", headers=alice)
        assert page.status_code == 200 and page.headers["ratelimit-remaining"] == "1"
        assert (await http.get(f"/conversations/{cid}", headers=alice)).status_code == 200
        over = await http.get(f"/conversations/{cid}/messages", headers=alice)
        assert over.status_code == 429 and over.headers["retry-after"]
        assert over.json()["status"] == 429 and "items" not in over.text
        async with http.stream("GET", f"/conversations/{cid}/events", headers=alice) as sse:
            assert sse.status_code == 429
            body = await sse.aread()
        assert b"Too many requests" in body and b"connected" not in body
    await active.events.close()


async def test_writes_meet_the_limit_exactly_and_a_refused_one_stores_nothing(
    store: Store,
) -> None:
    """A write of a user well within the limit is counted while it runs (no round trip before
    it); near the limit writes are counted before they run again, so that one write after
    another meets the limit exactly, and the write over it is refused before it is made."""
    settings = make_settings(RATE_LIMIT="12/minute")
    active = backend_for(store, settings)
    alice, admin = auth(settings, "alice"), auth(settings, "root", ["admin"])
    async with app_client(create_app(settings, backend=active)) as http:
        created = await http.post("/conversations", json={}, headers=alice)
        assert created.headers["ratelimit-remaining"] == "11"
        url = f"/conversations/{created.json()['id']}/messages"
        writes = [
            await http.post(url, json={"content": f"m{i}", "respond": False}, headers=alice)
            for i in range(13)
        ]
        assert [r.status_code for r in writes] == [201] * 11 + [429] * 2
        left = [r.headers["ratelimit-remaining"] for r in writes]
        assert left == [str(n) for n in range(10, -1, -1)] + ["0", "0"]
        assert writes[11].headers["retry-after"] and "Too many requests" in writes[11].text
        page = await http.get(url, headers=admin)  # (an admin's reads: another user's budget)
        assert [m["content"] for m in page.json()["items"]] == [f"m{i}" for i in range(11)]
    await active.events.close()


async def test_a_write_over_the_limit_in_a_race_is_done_and_the_next_refused(
    store: Store,
) -> None:
    """Requests of the user in other processes (here: counted straight on the counters) spend
    the budget after this process last counted: its next write, counted while it runs, is
    done and answered as done (a retry would write it twice), with nothing left in the
    headers; the writes after it are counted first, and refused."""
    settings = make_settings(RATE_LIMIT="12/minute")
    active = backend_for(store, settings)
    alice = auth(settings, "alice")
    async with app_client(create_app(settings, backend=active)) as http:
        created = await http.post("/conversations", json={}, headers=alice)
        assert created.headers["ratelimit-remaining"] == "11"
        for _ in range(11):  # the rest of the window, elsewhere
            await active.counters.hit("user", "alice", 12, 60)
        url = f"/conversations/{created.json()['id']}/messages"
        late = await http.post(url, json={"content": "late", "respond": False}, headers=alice)
        assert late.status_code == 201 and late.headers["ratelimit-remaining"] == "0"
        assert late.json()["content"] == "late"
        after = await http.post(url, json={"content": "after", "respond": False}, headers=alice)
        assert after.status_code == 429 and after.headers["retry-after"]
        page = await http.get(url, headers=auth(settings, "root", ["admin"]))
        assert [m["content"] for m in page.json()["items"]] == ["late"]
    await active.events.close()


async def test_a_generous_rate_is_counted_in_leases_and_holds_exactly(store: Store) -> None:
    """At 640 a minute a process counts a user's requests in the store about ten at a time (a
    lease: a 64th of what is left), not one by one; the headers still count down one by one,
    and two processes sending the user's requests in turn let exactly 640 through before both
    refuse."""
    settings = make_settings(RATE_LIMIT="640/minute")
    active = backend_for(store, settings)
    alice = auth(settings, "alice")
    app_one, app_two = create_app(settings, backend=active), create_app(settings, backend=active)
    async with app_client(app_one) as one, app_client(app_two) as two:
        first = [await one.get("/conversations", headers=alice) for _ in range(30)]
        assert [r.headers["ratelimit-remaining"] for r in first] == [
            str(n) for n in range(639, 609, -1)
        ]
        if isinstance(store, RedisStore):  # in four counts: leases of 10, 9, 9 and 9 requests
            key = store.keys.rate("user", "alice", 640, 60)
            assert int(await store.redis.call("GET", key)) == 37
        statuses = [r.status_code for r in first]
        while statuses[-2:] != [429, 429]:
            for http in (two, one):
                statuses.append((await http.get("/conversations", headers=alice)).status_code)
        assert statuses.count(200) == 640, statuses.count(200)
        refused = await one.get("/conversations", headers=alice)
        assert refused.status_code == 429 and refused.headers["ratelimit-remaining"] == "0"
    await active.events.close()


async def test_requests_arriving_together_lease_one_share_at_a_time(store: Store) -> None:
    """A user's requests that arrive together while this process has no lease: one of them
    leases a share of the window, the others are counted one by one - not a share each,
    which left this process holding most of the window unused while it refused the user."""
    settings = make_settings(RATE_LIMIT="600/minute")
    active = backend_for(store, settings)
    alice = auth(settings, "alice")
    async with app_client(create_app(settings, backend=active)) as http:
        answers = await asyncio.gather(
            *(http.get("/conversations", headers=alice) for _ in range(70))
        )
        assert [r.status_code for r in answers] == [200] * 70
        if isinstance(store, RedisStore):
            counted = int(await store.redis.call("GET", store.keys.rate("user", "alice", 600, 60)))
            assert 70 <= counted <= 70 + 600 // 64, counted
    await active.events.close()


# --- Edges ----------------------------------------------------------------------------------------


async def test_cors_hosts_and_security_headers(store: Store) -> None:
    settings = make_settings(
        CORS_ORIGINS="https://app.example.com",
        ALLOWED_HOSTS="api.example.com,*.internal.example.com",
    )
    active = backend_for(store, settings)
    alice = auth(settings, "alice")
    async with app_client(create_app(settings, backend=active)) as http:
        host = {"Host": "api.example.com"}
        allowed = await http.get(
            "/conversations", headers={**alice, **host, "Origin": "https://app.example.com"}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "Origin" in allowed.headers["vary"]
        assert "ETag" in allowed.headers["access-control-expose-headers"]
        foreign = await http.get(
            "/conversations", headers={**alice, **host, "Origin": "https://evil.example"}
        )
        assert foreign.status_code == 200
        assert "access-control-allow-origin" not in foreign.headers
        preflight = await http.options(
            "/conversations",
            headers={
                **host,
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200  # no token needed for a preflight
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "PATCH" not in preflight.headers["access-control-allow-methods"]  # (no route)
        # A refused preflight is a problem, as every error of the service.
        for origin, method in (
            ("https://evil.example", "POST"),
            ("https://app.example.com", "PATCH"),
        ):
            refused = await http.options(
                "/conversations",
                headers={**host, "Origin": origin, "Access-Control-Request-Method": method},
            )
            assert refused.status_code == 400, (origin, method)
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["detail"].startswith("Disallowed CORS")
            assert refused.headers["x-request-id"]

        sub = await http.get("/health/live", headers={"Host": "eu.internal.example.com:8000"})
        assert sub.status_code == 200
        probe = await http.get("/health/ready", headers={"Host": "10.1.2.3:8000"})
        assert probe.status_code == 200  # probes address the pod, not the public name
        evil = await http.get("/conversations", headers={**alice, "Host": "evil.example"})
        assert evil.status_code == 400
        assert evil.headers["content-type"] == "application/problem+json"
        assert evil.headers["x-request-id"]

        for name, expected in [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
        ]:
            assert allowed.headers[name] == expected
        assert "default-src 'none'" in allowed.headers["content-security-policy"]
        assert "strict-transport-security" not in allowed.headers  # development
    await active.events.close()


async def test_default_hosts_and_cors_are_the_seeds(sqlite_store: Store) -> None:
    settings = make_settings()
    assert settings.ALLOWED_HOSTS == ["localhost", "127.0.0.1"]
    assert settings.CORS_ORIGINS == ["http://localhost:3000"]
    active = backend_for(sqlite_store, settings)
    alice = auth(settings, "alice")
    async with app_client(create_app(settings, backend=active)) as http:
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000"):
            answer = await http.get("/conversations", headers={**alice, "Host": host})
            assert answer.status_code == 200, host
        foreign = await http.get("/conversations", headers={**alice, "Host": "example.com"})
        assert foreign.status_code == 400
        assert foreign.json()["detail"] == (
            "The Host header names a host this service does not serve."
        )
        local_app = await http.get(
            "/conversations", headers={**alice, "Origin": "http://localhost:3000"}
        )
        assert local_app.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = await http.get("/conversations", headers={**alice, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
    await active.events.close()


async def test_production_hides_docs_and_sends_hsts(sqlite_store: Store) -> None:
    settings = make_settings(ENVIRONMENT="production", JWT_SECRET=SECRET)
    active = backend_for(sqlite_store, settings)
    async with app_client(create_app(settings, backend=active)) as http:
        assert (await http.get("/docs")).status_code == 404
        assert (await http.get("/openapi.json")).status_code == 404
        live = await http.get("/health/live")
        assert live.headers["strict-transport-security"].startswith("max-age=")
    switched_on = make_settings(ENVIRONMENT="production", JWT_SECRET=SECRET, DOCS_ENABLED=True)
    async with app_client(create_app(switched_on, backend=active)) as http:
        assert (await http.get("/openapi.json")).status_code == 200


# --- Sentry ---------------------------------------------------------------------------------------


class _Broken:
    """A store that fails after appending, in a way nobody planned for (a bug, not an outage):
    the failing request has written message text to the store just before."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def append_messages(self, *args: Any, **kwargs: Any) -> Any:
        await self._store.append_messages(*args, **kwargs)
        raise RuntimeError("a bug after the append")


@pytest.fixture
def sentry_server() -> Iterator[tuple[str, list[bytes]]]:
    """A local HTTP endpoint that takes Sentry envelopes the way sentry.io does."""
    received: list[bytes] = []

    class Handler(QuietHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            received.append(body)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

    with local_http_server(Handler) as base:
        yield base.replace("http://", "http://public@") + "/1", received


async def test_unexpected_errors_reach_sentry_without_secrets(
    store: Store, prefix: str, sentry_server: tuple[str, list[bytes]]
) -> None:
    import sentry_sdk

    if isinstance(store, RedisStore) and not store.redis.cluster:
        # Every command through redis-py (as with rediss:// or a unix socket, where the fast
        # client is not used): its commands carry message text.
        store = RedisStore(Connection(store.redis.client), store.keys)
    dsn, received = sentry_server
    settings = make_settings(SENTRY_DSN=dsn)
    token = issue_token(settings, "alice", [])
    headers = {"Authorization": f"Bearer {token}"}
    active = backend_for(store, settings)
    broken = Backend(_Broken(active.store), active.events, active.jobs, active.counters)  # type: ignore[arg-type]
    try:
        async with app_client(create_app(settings, backend=broken)) as http:
            created = await http.post(
                "/conversations",
                json={"system_prompt": "the secret prompt"},
                headers={**headers, "Idempotency-Key": "k1"},  # (written through redis-py)
            )
            cid = created.json()["id"]
            failed = await http.post(
                f"/conversations/{cid}/messages",
                json={"content": "my secret diagnosis", "respond": False},
                headers=headers,
            )
        assert failed.status_code == 500
        assert failed.json()["detail"] == "An unexpected error occurred."
        sentry_sdk.flush(timeout=5)
        payload = b"\n".join(received)
        assert b"RuntimeError" in payload and b"a bug after the append" in payload
        assert token.encode() not in payload and token.split(".")[2].encode() not in payload
        assert b"secret diagnosis" not in payload and b"secret prompt" not in payload
    finally:
        sentry_sdk.init(dsn=None)  # off again for the other tests
        await active.events.close()


# --- Health ---------------------------------------------------------------------------------------


async def test_liveness_and_readiness(sqlite_store: Store) -> None:
    settings = make_settings()
    active = backend_for(sqlite_store, settings)
    async with app_client(create_app(settings, backend=active)) as http:
        assert (await http.get("/health/live")).json() == {"status": "ok"}
        assert (await http.get("/health/ready")).status_code == 200
        with sigterm_received():
            draining = await http.get("/health/ready")
            assert draining.status_code == 503 and draining.json()["status"] == "draining"
            assert draining.headers["retry-after"]
            assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/health/ready")).status_code == 200


# --- SIGTERM during streaming replies ------------------------------------------------------------


async def test_sigterm_to_the_api_mid_reply_loses_nothing(prefix: str) -> None:
    """The API (with its embedded worker) is stopped while a reply streams: its event stream
    ends with a reconnect hint, the worker hands the reply back, a new API process finishes it,
    and the client reconnecting with Last-Event-ID receives the rest: no gap, no duplicate."""
    env = {
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "JWT_SECRET": SECRET,
        "LLM_PROVIDER": "dev",
        "DEV_PROVIDER_DELAY_MS": "40",
        "WORKER_SHUTDOWN_GRACE_SECONDS": "0",
        "JOB_LEASE_SECONDS": "60",
    }
    headers = {
        "Authorization": f"Bearer {issue_token(make_settings(JWT_SECRET=SECRET), 'alice', [])}"
    }
    first: list[SseEvent] = []
    raw: list[str] = []
    with start_service(env) as old:
        async with httpx.AsyncClient(base_url=old.url, headers=headers, timeout=20) as http:
            cid = (await http.post("/conversations", json={})).json()["id"]
            sent = await http.post(f"/conversations/{cid}/messages", json={"content": "hello"})
            reply_id = sent.json()["reply_message_id"]
            async with http.stream(
                "GET", f"/conversations/{cid}/events", headers={"Last-Event-ID": "0"}
            ) as stream:
                deltas = 0
                async for event in sse_events(stream, raw):
                    first.append(event)
                    if event.event == "message.delta":
                        deltas += 1
                        if deltas == 3:
                            old.proc.terminate()  # SIGTERM mid-reply, stream still open
                # The stream ended by itself (the server drained it).
        # uvicorn ends by re-raising SIGTERM once it has shut down cleanly.
        assert old.proc.wait(timeout=30) in (0, -signal.SIGTERM), old.output
        assert "Application shutdown complete" in old.output
    assert any("restarting" in line and "Last-Event-ID" in line for line in raw), raw
    assert not any(e.event == "message.completed" for e in first)
    assert "handed job" in old.output

    with start_service(env) as new:
        async with httpx.AsyncClient(base_url=new.url, headers=headers, timeout=20) as http:
            rest = await collect_until_end(
                http, f"/conversations/{cid}/events", {}, reply_id, after=first[-1].id
            )
            final = (await http.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    ids = [e.id for e in first + rest]
    assert len(ids) == len(set(ids))  # nothing twice
    assert rest[-1].event == "message.completed"
    assert final["status"] == "completed" and final["context"]["attempts"] == 2
    restart = [
        e
        for e in rest
        if e.event == "message.updated"
        and e.data["message"]["id"] == reply_id
        and e.data["message"]["content"] == ""
    ]
    assert restart, "the new attempt is announced (clients drop the partial text)"
    after_restart = rest[rest.index(restart[-1]) + 1 :]
    text = "".join(e.data["delta"] for e in after_restart if e.event == "message.delta")
    assert text == final["content"] and final["content"].startswith("[development reply]")
