"""The conversation resource over HTTP, on both stores."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence

import httpx

from conversational_core.settings import Settings
from tests.fixtures.app import auth


async def test_create_get_update_delete(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    created = await client.post(
        "/conversations",
        headers=alice,
        json={
            "title": "Trip",
            "metadata": {"topic": "travel", "n": 1},
            "system_prompt": "Be brief.",
            "model": "gpt-x",
            "temperature": 0.3,
            "max_tokens": 256,
        },
    )
    assert created.status_code == 201, created.text
    conv = created.json()
    assert created.headers["location"] == f"/conversations/{conv['id']}"
    assert created.headers["etag"]
    assert conv["user_id"] == "alice" and conv["message_count"] == 0
    assert conv["title"] == "Trip" and conv["metadata"] == {"topic": "travel", "n": 1}
    assert conv["temperature"] == 0.3 and conv["max_tokens"] == 256
    assert conv["created_at"].endswith("Z")

    got = await client.get(f"/conversations/{conv['id']}", headers=alice)
    assert got.status_code == 200 and got.json() == conv
    assert got.headers["etag"] == created.headers["etag"]

    updated = await client.put(
        f"/conversations/{conv['id']}",
        headers=alice,
        json={"title": "Trip to Rome", "temperature": None},
    )
    assert updated.status_code == 200
    body = updated.json()
    assert body["title"] == "Trip to Rome" and body["temperature"] is None
    assert body["system_prompt"] == "Be brief."  # untouched fields stay
    assert updated.headers["etag"] != created.headers["etag"]

    listed = await client.get("/conversations", headers=alice)
    assert [c["id"] for c in listed.json()["items"]] == [conv["id"]]

    assert (await client.delete(f"/conversations/{conv['id']}", headers=alice)).status_code == 204
    assert (await client.get(f"/conversations/{conv['id']}", headers=alice)).status_code == 404
    second = await client.delete(f"/conversations/{conv['id']}", headers=alice)
    assert second.status_code == 404
    assert second.headers["content-type"] == "application/problem+json"


async def test_if_match(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    created = await client.post("/conversations", headers=alice, json={"title": "a"})
    cid, etag = created.json()["id"], created.headers["etag"]
    ok = await client.put(
        f"/conversations/{cid}", headers={**alice, "If-Match": etag}, json={"title": "b"}
    )
    assert ok.status_code == 200
    stale = await client.put(
        f"/conversations/{cid}", headers={**alice, "If-Match": etag}, json={"title": "c"}
    )
    assert stale.status_code == 412
    assert stale.headers["content-type"] == "application/problem+json"
    garbage = await client.put(
        f"/conversations/{cid}", headers={**alice, "If-Match": '"zz"'}, json={"title": "c"}
    )
    assert garbage.status_code == 412
    assert (await client.get(f"/conversations/{cid}", headers=alice)).json()["title"] == "b"
    # RFC 9110 13.1.1: a weak tag never matches (strong comparison); a list matches when one of
    # its tags does.
    current = ok.headers["etag"]
    weak = await client.put(
        f"/conversations/{cid}", headers={**alice, "If-Match": f"W/{current}"}, json={"title": "w"}
    )
    assert weak.status_code == 412
    for template in ('"c999", {}', '{}, W/"c1"', '"m1",{}'):
        listed = template.format(current)
        changed = await client.put(
            f"/conversations/{cid}", headers={**alice, "If-Match": listed}, json={"title": "l"}
        )
        assert changed.status_code == 200, listed
        current = changed.headers["etag"]
    none = await client.put(
        f"/conversations/{cid}", headers={**alice, "If-Match": f'"c998", {etag}'}, json={}
    )
    assert none.status_code == 412


async def test_idempotent_create(client: httpx.AsyncClient, settings: Settings) -> None:
    headers = {**auth(settings, "alice"), "Idempotency-Key": "create-1"}
    first = await client.post("/conversations", headers=headers, json={"title": "x"})
    retry = await client.post("/conversations", headers=headers, json={"title": "x"})
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    listed = (await client.get("/conversations", headers=auth(settings, "alice"))).json()
    assert len(listed["items"]) == 1
    other_body = await client.post("/conversations", headers=headers, json={"title": "y"})
    assert other_body.status_code == 422


async def test_list_pagination_and_limits(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    ids = [
        (await client.post("/conversations", headers=alice, json={})).json()["id"] for _ in range(7)
    ]
    await client.post("/conversations", headers=auth(settings, "bob"), json={})
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/conversations", headers=alice, params=params)).json()
        seen.extend(c["id"] for c in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    tampered = [_cursor([True, "x"]), _cursor([2**70, "x"]), _cursor(["1", "x"])]
    cases: list[Mapping[str, str | int]] = [
        {"limit": 0},
        {"limit": 101},
        {"limit": "x"},
        {"cursor": "not-a-cursor"},
        *({"cursor": c} for c in tampered),
    ]
    for bad in cases:
        response = await client.get("/conversations", headers=alice, params=bad)
        assert response.status_code in (400, 422), bad
        assert response.headers["content-type"] == "application/problem+json"


async def test_validation_errors_are_problems(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    alice = auth(settings, "alice")
    cases = [
        {"title": "x" * 201},
        {"title": 5},
        {"temperature": 3},
        {"max_tokens": "many"},
        # A value of another JSON type than the field's is refused, not converted.
        {"max_tokens": "10"},
        {"max_tokens": True},
        {"max_tokens": 10.5},
        {"temperature": True},
        {"temperature": "1"},
        {"metadata": {"nested": {"a": 1}}},
        {"metadata": {f"k{i}": i for i in range(17)}},
        {"metadata": {"k": "v" * 513}},
        {"unknown_field": 1},
        {"system_prompt": "x" * (settings.MAX_SYSTEM_PROMPT_CHARS + 1)},
        [1, 2],
    ]
    for body in cases:
        response = await client.post("/conversations", headers=alice, json=body)
        assert response.status_code == 422, (body, response.text)
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["status"] == 422 and problem["errors"], body
        assert set(problem) >= {"type", "title", "status", "detail"}
    malformed = await client.post(
        "/conversations",
        headers={**alice, "Content-Type": "application/json"},
        content=b'{"title": ',
    )
    assert malformed.status_code == 400
    assert malformed.json()["detail"] == "The request body is not valid JSON."
    deep = await client.post(  # valid JSON, deeper than the parser goes: said as it is
        "/conversations",
        headers={**alice, "Content-Type": "application/json"},
        content=b'{"metadata": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001,
    )
    assert deep.status_code == 400
    assert deep.json()["detail"] == "The request body's JSON is nested too deeply."
    not_json = await client.post(
        "/conversations", headers={**alice, "Content-Type": "text/plain"}, content=b"hello"
    )
    assert not_json.status_code == 415
    # JSON is UTF-8, and a body is read as sent: another charset or a compressed body is not
    # what the service reads (415), while UTF-8 said outright is.
    for headers, status in (
        ({"Content-Type": "application/json; charset=latin-1"}, 415),
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, 415),
        ({"Content-Type": "application/json", "Content-Encoding": "br"}, 415),
        ({"Content-Type": 'application/json; charset="UTF-8"'}, 201),
        ({"Content-Type": "application/json", "Content-Encoding": "identity"}, 201),
    ):
        answer = await client.post(
            "/conversations", headers={**alice, **headers}, content=b'{"title": "t"}'
        )
        assert answer.status_code == status, headers
        if status == 415:
            assert answer.headers["content-type"] == "application/problem+json"
    listed = (await client.get("/conversations", headers=alice)).json()["items"]
    assert len(listed) == 2  # the two accepted


def _cursor(values: Sequence[object]) -> str:
    """A cursor of the service's form (base64url of a JSON array) holding `values`."""
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


async def test_a_conversation_may_be_created_without_a_body(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Every field of a new conversation is optional (API.md), the body too."""
    alice = auth(settings, "alice")
    for headers in (alice, {**alice, "Content-Type": "application/json"}):
        created = await client.post("/conversations", headers=headers)
        assert created.status_code == 201, created.text
        assert created.json()["message_count"] == 0


async def test_an_integral_number_is_an_integer(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """JSON Schema's integer includes 1024.0 (clients whose numbers are all floats send so)."""
    alice = auth(settings, "alice")
    created = await client.post("/conversations", headers=alice, json={"max_tokens": 1024.0})
    assert created.status_code == 201, created.text
    assert created.json()["max_tokens"] == 1024


async def test_a_body_of_many_wrong_fields_gets_a_short_answer(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Thousands of unknown fields: the first 50 are listed, and the answer says how many more
    (it is not several times the size of the request)."""
    alice = auth(settings, "alice")
    body = {f"unknown{i}": i for i in range(5000)}
    response = await client.post("/conversations", headers=alice, json=body)
    assert response.status_code == 422
    problem = response.json()
    assert len(problem["errors"]) == 50
    assert "4950 more" in problem["detail"]
    assert len(response.content) < 10_000


async def test_a_change_of_nothing_keeps_the_version(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """`PUT {}` changes nothing: the same ETag after (other clients' If-Match still holds), and
    a stale If-Match is still a 412."""
    alice = auth(settings, "alice")
    created = await client.post("/conversations", headers=alice, json={"title": "a"})
    cid, etag = created.json()["id"], created.headers["etag"]
    mid = (
        await client.post(
            f"/conversations/{cid}/messages", headers=alice, json={"content": "x", "respond": False}
        )
    ).json()["id"]
    for url, tag in (
        (f"/conversations/{cid}", etag),
        (f"/conversations/{cid}/messages/{mid}", None),
    ):
        before = (await client.get(url, headers=alice)).headers["etag"]
        same = await client.put(url, headers=alice, json={})
        assert same.status_code == 200
        assert same.headers["etag"] == before == (tag or before)
        assert (await client.get(url, headers=alice)).headers["etag"] == before
    stale = await client.put(
        f"/conversations/{cid}", headers={**alice, "If-Match": '"c99"'}, json={}
    )
    assert stale.status_code == 412
