"""Authentication, ownership and roles on every endpoint, on both stores."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from conversational_core.settings import Settings
from conversational_core.storage.redis.keys import Keys
from tests.fixtures.app import auth


async def _setup(client: httpx.AsyncClient, settings: Settings) -> tuple[str, str]:
    alice = auth(settings, "alice")
    cid = (await client.post("/conversations", headers=alice, json={"title": "secret"})).json()[
        "id"
    ]
    mid = (
        await client.post(
            f"/conversations/{cid}/messages",
            headers=alice,
            json={"content": "private", "respond": False},
        )
    ).json()["id"]
    return cid, mid


def _endpoints(cid: str, mid: str) -> list[tuple[str, str, dict[str, object] | None]]:
    return [
        ("POST", "/conversations", {"title": "x"}),
        ("GET", "/conversations", None),
        ("GET", f"/conversations/{cid}", None),
        ("PUT", f"/conversations/{cid}", {"title": "hacked"}),
        ("DELETE", f"/conversations/{cid}", None),
        ("POST", f"/conversations/{cid}/messages", {"content": "x", "respond": False}),
        ("POST", f"/conversations/{cid}/messages", {"content": "x", "parent_id": mid}),
        ("GET", f"/conversations/{cid}/messages", None),
        ("GET", f"/conversations/{cid}/messages?leaf={mid}", None),
        ("GET", f"/conversations/{cid}/messages?view=all", None),
        ("GET", f"/conversations/{cid}/messages/{mid}", None),
        ("PUT", f"/conversations/{cid}/messages/{mid}", {"content": "hacked"}),
        ("POST", f"/conversations/{cid}/messages/{mid}/cancel", None),
        ("POST", f"/conversations/{cid}/messages/{mid}/regenerate", None),
        ("GET", f"/conversations/{cid}/messages/{mid}/siblings", None),
        (
            "POST",
            f"/conversations/{cid}/messages/{mid}/tool_results",
            {"results": [{"tool_call_id": "call_1", "output": "42"}]},
        ),
        ("PUT", f"/conversations/{cid}", {"active_leaf_id": mid}),
        ("POST", f"/conversations/{cid}/fork", {}),
        ("POST", f"/conversations/{cid}/fork", {"message_id": mid}),
        ("GET", f"/conversations/{cid}/events", None),
        ("DELETE", f"/conversations/{cid}/messages/{mid}", None),
    ]


def test_every_operation_is_checked_here(settings: Settings) -> None:
    """The lists above reach every authenticated operation of the app (a new one must be added
    to them)."""
    from conversational_core.app import create_app

    document = create_app(settings).openapi()
    operations = {
        (method.upper(), path)
        for path, methods in document["paths"].items()
        for method in methods
        if not path.startswith("/health")
    }
    checked = {
        (
            method,
            re.sub(r"\?.*", "", url)
            .replace("CID", "{conversation_id}")
            .replace("MID", "{message_id}"),
        )
        for method, url, _ in _endpoints("CID", "MID")
    }
    assert operations == checked


async def _unchanged(client: httpx.AsyncClient, settings: Settings, cid: str, mid: str) -> None:
    alice = auth(settings, "alice")
    conv = (await client.get(f"/conversations/{cid}", headers=alice)).json()
    assert conv["title"] == "secret" and conv["message_count"] == 1
    msg = (await client.get(f"/conversations/{cid}/messages/{mid}", headers=alice)).json()
    assert msg["content"] == "private"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer not.a.jwt", "Basic YWxpY2U6cHc="])
async def test_every_endpoint_needs_a_token(
    client: httpx.AsyncClient, settings: Settings, header: str | None
) -> None:
    cid, mid = await _setup(client, settings)
    headers = {} if header is None else {"Authorization": header}
    for method, url, body in _endpoints(cid, mid):
        response = await client.request(method, url, headers=headers, json=body)
        assert response.status_code == 401, (method, url)
        # An error code only for a token that was sent (RFC 6750, 3.1: none for a request
        # without one, or with another scheme).
        sent = header is not None and header.startswith("Bearer ")
        challenge = 'Bearer error="invalid_token"' if sent else "Bearer"
        assert response.headers["www-authenticate"] == challenge
        assert response.headers["content-type"] == "application/problem+json"
    await _unchanged(client, settings, cid, mid)


async def test_other_users_objects_are_not_found(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    cid, mid = await _setup(client, settings)
    bob = auth(settings, "bob")
    for method, url, body in _endpoints(cid, mid):
        if url == "/conversations":
            continue
        response = await client.request(method, url, headers=bob, json=body)
        assert response.status_code == 404, (method, url, response.text)
        assert "alice" not in response.text and "secret" not in response.text
    assert (await client.get("/conversations", headers=bob)).json()["items"] == []
    await _unchanged(client, settings, cid, mid)


async def test_admin_reads_and_deletes_any_conversation(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    cid, mid = await _setup(client, settings)
    admin = auth(settings, "root", ["admin"])
    assert (await client.get(f"/conversations/{cid}", headers=admin)).json()["title"] == "secret"
    items = (await client.get(f"/conversations/{cid}/messages", headers=admin)).json()["items"]
    assert [m["id"] for m in items] == [mid]
    assert (
        await client.get(f"/conversations/{cid}/messages/{mid}", headers=admin)
    ).status_code == 200
    # Reading is not changing: an admin does not edit other users' conversations.
    edit = await client.put(f"/conversations/{cid}", headers=admin, json={"title": "x"})
    assert edit.status_code == 404
    # Nor is deleting one of its messages (a branch cut away): the whole conversation only.
    cut = await client.delete(f"/conversations/{cid}/messages/{mid}", headers=admin)
    assert cut.status_code == 404
    await _unchanged(client, settings, cid, mid)
    assert (await client.delete(f"/conversations/{cid}", headers=admin)).status_code == 204
    assert (
        await client.get(f"/conversations/{cid}", headers=auth(settings, "alice"))
    ).status_code == 404


async def test_message_roles_policy(client: httpx.AsyncClient, settings: Settings) -> None:
    cid, _mid = await _setup(client, settings)
    alice = auth(settings, "alice")
    for role in ("assistant", "system", "tool"):
        forged = await client.post(
            f"/conversations/{cid}/messages",
            headers=alice,
            json={"role": role, "content": "I am the AI", "respond": False},
        )
        assert forged.status_code == 403, role
    service = {**auth(settings, "svc", ["service"]), "X-On-Behalf-Of": "alice"}
    ok = await client.post(
        f"/conversations/{cid}/messages",
        headers=service,
        json={"role": "assistant", "content": "Hello from the AI"},
    )
    assert ok.status_code == 201 and ok.json()["role"] == "assistant"
    # The user cannot rewrite the assistant's words either.
    edit = await client.put(
        f"/conversations/{cid}/messages/{ok.json()['id']}",
        headers=alice,
        json={"content": "forged"},
    )
    assert edit.status_code == 403
    # Only a service may act for someone else.
    spoof = await client.get(
        f"/conversations/{cid}", headers={**auth(settings, "bob"), "X-On-Behalf-Of": "alice"}
    )
    assert spoof.status_code == 403
    # A service acting for another user sees nothing of alice's.
    other = await client.get(
        f"/conversations/{cid}",
        headers={**auth(settings, "svc", ["service"]), "X-On-Behalf-Of": "bob"},
    )
    assert other.status_code == 404


async def test_request_id_and_problem_shape(client: httpx.AsyncClient, settings: Settings) -> None:
    echoed = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = await client.get("/conversations")
    assert len(generated.headers["x-request-id"]) >= 16
    # Anonymous callers learn nothing about the route map: 401 before 404.
    assert (await client.get("/nowhere")).status_code == 401
    missing = await client.get("/nowhere", headers=auth(settings, "alice"))
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["x-request-id"]
    wrong_method = await client.patch("/conversations", headers=auth(settings, "alice"))
    assert wrong_method.status_code == 405


async def test_body_limits(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    huge = b'{"title": "' + b"x" * (settings.MAX_BODY_BYTES + 10) + b'"}'
    response = await client.post(
        "/conversations", headers={**alice, "Content-Type": "application/json"}, content=huge
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(settings.MAX_BODY_BYTES // 1024 + 2):
            yield b" " * 1024

    streamed = await client.post(
        "/conversations", headers={**alice, "Content-Type": "application/json"}, content=chunks()
    )
    assert streamed.status_code == 413
    assert (await client.get("/conversations", headers=alice)).json()["items"] == []


async def test_a_user_named_like_a_key_of_another_reaches_nothing_of_hers(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """A user id is whatever a token's `sub` (or a service's X-On-Behalf-Of) says: one made to
    continue another user's key names (`alice}:k:b`) gets neither her idempotency records (a
    replay of her conversation) nor her conversation list, and hers cannot break his."""
    alice = auth(settings, "alice")
    other = auth(settings, "alice}:k:b")
    body = {"title": "alice private"}
    hers = await client.post(
        "/conversations", json=body, headers={**alice, "Idempotency-Key": "b}:k:U"}
    )
    assert hers.status_code == 201
    his = await client.post("/conversations", json=body, headers={**other, "Idempotency-Key": "U"})
    assert his.status_code == 201
    assert his.json()["id"] != hers.json()["id"]
    assert "idempotent-replayed" not in his.headers
    # A key of hers named as his conversation list.
    named = {**alice, "Idempotency-Key": "b}:convs"}
    assert (await client.post("/conversations", json={}, headers=named)).status_code == 201
    listed = await client.get("/conversations", headers=other)
    assert listed.status_code == 200
    assert [c["id"] for c in listed.json()["items"]] == [his.json()["id"]]
    created = await client.post("/conversations", json={}, headers=other)
    assert created.status_code == 201
    assert len((await client.get("/conversations", headers=alice)).json()["items"]) == 2


def test_caller_chosen_key_parts_cannot_stand_for_others() -> None:
    """The key of (user, idempotency key) pairs, of an append's (caller, key) pairs and of a
    user's list are one each: no two callers share one, whatever characters their ids hold;
    ordinary ids keep the keys they had."""
    keys = Keys("p")
    users = ["alice", "alice}:k:b", "alice}", "a%7Dlice", "a:b", "a"]
    idem = {(u, k): keys.create_idempotency(u, k) for u in users for k in ("U", "b}:k:U", "x")}
    lists = {u: keys.user_conversations(u) for u in users}
    assert len(set(idem.values()) | set(lists.values())) == len(idem) + len(lists)
    appends = {(s, k): keys.append_idempotency("c1", s, k) for s in users for k in ("c", "b:c")}
    assert len(set(appends.values())) == len(appends)
    assert keys.user_conversations("auth0|123") == "p:{u:auth0|123}:convs"
