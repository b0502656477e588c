"""The message resource over HTTP, on both stores."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import Mapping, Sequence

import httpx
import pytest

from conversational_core.settings import Settings
from conversational_core.storage.models import Conversation, Message
from tests.fixtures.app import auth


async def _conversation(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.post("/conversations", headers=headers, json={"title": "t"})
    assert response.status_code == 201
    cid: str = response.json()["id"]
    return cid


async def test_message_crud(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    created = await client.post(
        f"/conversations/{cid}/messages",
        headers=alice,
        json={"content": "Hello", "metadata": {"lang": "en"}, "respond": False},
    )
    assert created.status_code == 201, created.text
    msg = created.json()
    assert created.headers["location"] == f"/conversations/{cid}/messages/{msg['id']}"
    assert msg["role"] == "user" and msg["content"] == "Hello" and msg["status"] == "completed"
    assert msg["conversation_id"] == cid and msg["metadata"] == {"lang": "en"}
    assert msg["reply_message_id"] is None

    got = await client.get(f"/conversations/{cid}/messages/{msg['id']}", headers=alice)
    assert got.json() == msg
    etag = got.headers["etag"]

    edited = await client.put(
        f"/conversations/{cid}/messages/{msg['id']}",
        headers={**alice, "If-Match": etag},
        json={"content": "Hi"},
    )
    assert edited.status_code == 200 and edited.json()["content"] == "Hi"
    assert edited.json()["metadata"] == {"lang": "en"}
    stale = await client.put(
        f"/conversations/{cid}/messages/{msg['id']}",
        headers={**alice, "If-Match": etag},
        json={"content": "Yo"},
    )
    assert stale.status_code == 412
    conv = (await client.get(f"/conversations/{cid}", headers=alice)).json()
    assert conv["message_count"] == 1

    deleted = await client.delete(f"/conversations/{cid}/messages/{msg['id']}", headers=alice)
    assert deleted.status_code == 204
    again = await client.delete(f"/conversations/{cid}/messages/{msg['id']}", headers=alice)
    assert again.status_code == 404
    assert (await client.get(f"/conversations/{cid}", headers=alice)).json()["message_count"] == 0


async def test_deleting_a_conversation_takes_its_messages(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    mid = (
        await client.post(
            f"/conversations/{cid}/messages", headers=alice, json={"content": "x", "respond": False}
        )
    ).json()["id"]
    assert (await client.delete(f"/conversations/{cid}", headers=alice)).status_code == 204
    assert (
        await client.get(f"/conversations/{cid}/messages/{mid}", headers=alice)
    ).status_code == 404
    assert (await client.get(f"/conversations/{cid}/messages", headers=alice)).status_code == 404
    posted = await client.post(
        f"/conversations/{cid}/messages", headers=alice, json={"content": "x"}
    )
    assert posted.status_code == 404


async def test_hundred_concurrent_appends(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)

    async def post(i: int) -> httpx.Response:
        # As the contract tells clients: a 503 (the store busy; on a loaded CI machine the
        # cluster answers one now and then to such a burst) is retried after its Retry-After,
        # with an Idempotency-Key (the write may have happened before the answer failed).
        for _ in range(5):
            response = await client.post(
                f"/conversations/{cid}/messages",
                headers={**alice, "Idempotency-Key": f"append-{i}"},
                json={"content": f"m{i}", "respond": False},
            )
            if response.status_code != 503:
                return response
            assert response.headers["retry-after"]
            await asyncio.sleep(0.2)  # (shorter than Retry-After: the test has no time to lose)
        return response

    responses = await asyncio.gather(*(post(i) for i in range(100)))
    refused = [(r.status_code, r.text) for r in responses if r.status_code != 201]
    assert not refused, refused[:3]
    page = (
        await client.get(f"/conversations/{cid}/messages", headers=alice, params={"limit": 200})
    ).json()
    assert len(page["items"]) == 100
    assert len({m["id"] for m in page["items"]}) == 100
    assert {m["content"] for m in page["items"]} == {f"m{i}" for i in range(100)}
    assert (await client.get(f"/conversations/{cid}", headers=alice)).json()["message_count"] == 100


async def test_idempotency_key_retry_creates_nothing(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    headers = {**alice, "Idempotency-Key": "msg-42"}
    body = {"content": "pay once", "respond": False}
    first, retry = [
        await client.post(f"/conversations/{cid}/messages", headers=headers, json=body)
        for _ in range(2)
    ]
    assert first.status_code == retry.status_code == 201
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    items = (await client.get(f"/conversations/{cid}/messages", headers=alice)).json()["items"]
    assert len(items) == 1
    mismatch = await client.post(
        f"/conversations/{cid}/messages",
        headers=headers,
        json={"content": "different", "respond": False},
    )
    assert mismatch.status_code == 422
    bad_key = await client.post(
        f"/conversations/{cid}/messages", headers={**alice, "Idempotency-Key": "x" * 300}, json=body
    )
    assert bad_key.status_code == 400


async def test_pagination_over_http(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    ids = []
    for i in range(12):
        r = await client.post(
            f"/conversations/{cid}/messages",
            headers=alice,
            json={"content": str(i), "respond": False},
        )
        ids.append(r.json()["id"])

    async def walk(**params: str | int) -> list[str]:
        seen: list[str] = []
        query: dict[str, str | int] = {"limit": 5, **params}
        while True:
            page = (
                await client.get(f"/conversations/{cid}/messages", headers=alice, params=query)
            ).json()
            seen.extend(m["id"] for m in page["items"])
            if page["next_cursor"] is None:
                return seen
            query = {
                "limit": 5,
                "cursor": page["next_cursor"],
                **({"order": params["order"]} if "order" in params else {}),
            }

    assert await walk() == ids
    assert await walk(order="desc") == ids[::-1]
    # A cursor belongs to its conversation: passed to another one, a 400 that says so (not a
    # page of that one from the position it held). One written before cursors were bound (its
    # numbers without the last) still pages, as during an upgrade.
    url = f"/conversations/{cid}/messages"
    first = (await client.get(url, headers=alice, params={"limit": 5})).json()
    other = await _conversation(client, alice)
    elsewhere = await client.get(
        f"/conversations/{other}/messages", headers=alice, params={"cursor": first["next_cursor"]}
    )
    assert elsewhere.status_code == 400
    assert elsewhere.json()["detail"] == "The cursor was made for another conversation."
    unbound = _cursor(_numbers(first["next_cursor"])[:-1])
    for cursor in (first["next_cursor"], unbound):
        page = (await client.get(url, headers=alice, params={"cursor": cursor})).json()
        assert [m["id"] for m in page["items"]] == ids[5:]
    assert await walk(after=ids[3]) == ids[4:]
    # `before` walks back through history: the page right before the anchor, then earlier ones.
    assert await walk(before=ids[8]) == ids[3:8] + ids[:3]
    before = (
        await client.get(
            f"/conversations/{cid}/messages", headers=alice, params={"before": ids[8], "limit": 3}
        )
    ).json()
    assert [m["id"] for m in before["items"]] == ids[5:8]
    unknown = await client.get(
        f"/conversations/{cid}/messages", headers=alice, params={"after": "0" * 36}
    )
    assert unknown.status_code == 400
    both = await client.get(
        f"/conversations/{cid}/messages", headers=alice, params={"after": ids[0], "before": ids[5]}
    )
    assert both.status_code == 400
    tampered = [
        _cursor([0, 0, True]),
        _cursor([False, False, True]),
        _cursor([0, 0, 2**64]),
        _cursor([0, 0, -1]),
        _cursor([0, 0, 2**53]),
        _cursor([2, 0, 3]),
    ]
    cases: list[Mapping[str, str | int]] = [
        {"limit": 0},
        {"limit": 201},
        {"order": "sideways"},
        {"cursor": "!!"},
        *({"cursor": c} for c in tampered),
    ]
    for bad in cases:
        response = await client.get(f"/conversations/{cid}/messages", headers=alice, params=bad)
        assert response.status_code in (400, 422), bad
        assert response.headers["content-type"] == "application/problem+json"
    # Positions far from any a list has (negative ones, past what a Lua number holds exactly)
    # are refused before the store: a walk from -2**63 held the Redis server for everyone.
    for values in ([True], [2**64], [-(2**63)], [-(2**53) - 10], [-2], [2**63 - 1], [2**53]):
        response = await client.get(
            f"/conversations/{cid}/messages/{ids[0]}/siblings",
            headers=alice,
            params={"cursor": _cursor(values)},
        )
        assert response.status_code == 400, values
    far = await client.get(  # (a position no sibling has: an empty page, at once)
        f"/conversations/{cid}/messages/{ids[0]}/siblings",
        headers=alice,
        params={"cursor": _cursor([2**53 - 1])},
    )
    assert far.status_code == 200 and far.json()["items"] == []


async def test_message_validation(client: httpx.AsyncClient, settings: Settings) -> None:
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    url = f"/conversations/{cid}/messages"
    for body in (
        {"content": ""},
        {"content": 1},
        {"role": "wizard", "content": "x"},
        {"content": "x", "respond": "maybe"},
        {"content": "x", "respond": "false"},  # (a string, however it reads)
        {"content": "x", "respond": 0},
        {},
        {"content": "x" * (settings.MAX_MESSAGE_CHARS + 1)},
        {"parts": [{"type": "text", "text": ""}]},  # (as an empty content)
        {"parts": [{"type": "text", "text": "x"}, {"type": "text", "text": ""}]},
    ):
        response = await client.post(url, headers=alice, json=body)
        assert response.status_code == 422, body
        assert response.headers["content-type"] == "application/problem+json"
    assert (await client.get(f"/conversations/{cid}", headers=alice)).json()["message_count"] == 0


def _cursor(values: Sequence[object]) -> str:
    """A cursor of the service's form (base64url of a JSON array) holding `values`."""
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def _numbers(cursor: str) -> list[int]:
    """What a cursor of the service's form holds."""
    values: list[int] = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    return values


async def test_a_query_sent_again_is_read_as_the_first_time(
    client: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validated queries are kept by their bytes (routing.Operation): the same query answers
    alike every time, a different one is read afresh, a bad one is refused every time, and
    more queries than are kept change nothing."""
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    for text in ("a", "b", "c"):
        posted = await client.post(
            f"/conversations/{cid}/messages",
            headers=alice,
            json={"content": text, "respond": False},
        )
        assert posted.status_code == 201

    async def contents(query: str) -> list[str]:
        response = await client.get(f"/conversations/{cid}/messages?{query}", headers=alice)
        assert response.status_code == 200, response.text
        return [m["content"] for m in response.json()["items"]]

    for _ in range(2):
        assert await contents("limit=2") == ["a", "b"]
        assert await contents("limit=2&order=desc") == ["c", "b"]
        assert await contents("order=desc&limit=1") == ["c"]
        bad = await client.get(f"/conversations/{cid}/messages?limit=0", headers=alice)
        assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["query", "limit"]
    monkeypatch.setattr("conversational_core.routing._CACHED_QUERIES", 8)
    for limit in range(1, 30):  # past what one operation keeps (8 here)
        assert len(await contents(f"limit={limit % 4 or 1}&n={limit}")) == min(limit % 4 or 1, 3)
    assert await contents("limit=2&order=desc") == ["c", "b"]


async def test_a_written_message_is_answered_as_a_read_gives_it(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """The answer to a POST is the message as a GET right after gives it, byte for byte
    (parent, sibling position, escaped text and metadata alike)."""
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    path = f"/conversations/{cid}/messages"
    first_id = ""
    for body in (
        {"content": 'Hi "you" ü\n', "metadata": {"k": "é", "n": 1.5}, "respond": False},
        {"content": "a second root", "parent_id": None, "respond": False},  # siblings 2/2
        {"content": "under the first", "parent_id": "FIRST", "respond": False},
        {"content": "at the active leaf", "respond": False},
    ):
        if body.get("parent_id") == "FIRST":
            body["parent_id"] = first_id
        created = await client.post(path, headers=alice, json=body)
        assert created.status_code == 201, created.text
        first_id = first_id or created.json()["id"]
        got = await client.get(f"{path}/{created.json()['id']}", headers=alice)
        assert created.content == got.content, body
        assert created.headers["etag"] == got.headers["etag"]


async def test_answers_hold_the_records_fields_and_nothing_else(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Messages and conversations are serialized from their dataclasses' attributes (no
    `__slots__`: orjson writes every public attribute): an attribute set by mistake would show
    in the API. Their answers hold exactly the declared fields, in order."""
    alice = auth(settings, "alice")
    cid = await _conversation(client, alice)
    created = await client.post(
        f"/conversations/{cid}/messages", headers=alice, json={"content": "x"}
    )
    reply_id = created.json()["reply_message_id"]
    got = await client.get(f"/conversations/{cid}/messages/{reply_id}", headers=alice)
    conversation = await client.get(f"/conversations/{cid}", headers=alice)
    message_fields = [f.name for f in dataclasses.fields(Message)]
    assert list(created.json()) == message_fields
    assert list(got.json()) == message_fields
    assert list(conversation.json()) == [f.name for f in dataclasses.fields(Conversation)]
