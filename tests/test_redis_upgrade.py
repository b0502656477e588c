"""Conversations written on Redis by the version before trees read as one branch, with no step for
the operator: the keys the released version wrote through its own API (tests/fixtures/legacy/,
made by make_fixtures.py there) are loaded under a fresh prefix and served by this version, on a
single server and on a cluster. Every field the old API answered is unchanged; the new ones say
"one branch"; and the old conversations take edits, regenerates, switches and deletes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from testkit.redis import RedisCluster

import redis
from conversational_core.app import create_app
from conversational_core.settings import Settings
from conversational_core.storage.factory import Backend
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import REDIS_URL, backend_for, make_settings
from tests.fixtures.app import app_client, auth
from tests.fixtures.legacy.load import load_expected, load_redis

EXPECTED = load_expected()["redis"]


@pytest.fixture
def settings() -> Settings:
    return make_settings(LLM_PROVIDER="dev")


@pytest.fixture
async def legacy(
    any_redis_store: RedisStore, settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[Backend]:
    """The released version's keys under the store's prefix, and a backend on them."""
    if any_redis_store.redis.cluster:
        cluster: RedisCluster = request.getfixturevalue("cluster")
        host, port = cluster.url.removeprefix("redis://").split(":")
        client: Any = redis.RedisCluster(host=host, port=int(port))
    else:
        client = redis.Redis.from_url(REDIS_URL)
    try:
        load_redis(client, any_redis_store.keys.prefix, skip_transient=True)
    finally:
        client.close()
    backend = backend_for(any_redis_store, settings)
    yield backend
    await backend.events.close()


@pytest.fixture
async def http(legacy: Backend, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(create_app(settings, backend=legacy)) as client:
        yield client


def _as(settings: Settings, user: str) -> dict[str, str]:
    return auth(settings, user)


def _fields(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    return {k: new.get(k) for k in old}


async def test_old_conversations_read_as_one_branch(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    for label, recorded in EXPECTED["conversations"].items():
        headers = _as(settings, recorded["user_id"])
        got = await http.get(recorded["conversation"]["path"], headers=headers)
        assert got.status_code == 200, label
        old = recorded["conversation"]["body"]
        conversation = got.json()
        assert _fields(old, conversation) == old, label
        assert got.headers["etag"] == recorded["conversation"]["etag"]
        assert conversation["title_source"] == ("user" if old["title"] is not None else None)
        assert (conversation["on_busy"], conversation["forked_from"]) == ("queue", None)
        assert (conversation["tools"], conversation["tool_choice"]) == (None, None)

        listed = await http.get(recorded["messages"]["path"], headers=headers)
        old_items = recorded["messages"]["body"]["items"]
        items = listed.json()["items"]
        assert [_fields(was, now) for was, now in zip(old_items, items, strict=True)] == old_items
        assert len(items) == len(old_items)
        # Text only, as parts too (an empty reply: none).
        assert all(
            m["parts"] == ([{"type": "text", "text": m["content"]}] if m["content"] else [])
            for m in items
        )
        # Each follows the one before it (a deleted message's reply follows what came before
        # the deleted one), an only child.
        assert [m["parent_id"] for m in items] == [None, *(m["id"] for m in items[:-1])][
            : len(items)
        ]
        assert all((m["sibling_count"], m["sibling_index"]) == (1, 0) for m in items)
        assert conversation["active_leaf_id"] == (items[-1]["id"] if items else None)
        everything = await http.get(
            recorded["messages"]["path"], params={"view": "all"}, headers=headers
        )
        assert everything.json()["items"] == items
        for m in items:
            one = await http.get(
                f"{recorded['conversation']['path']}/messages/{m['id']}", headers=headers
            )
            assert one.json() == m


async def test_old_conversations_take_edits_regenerates_and_deletes(
    http: httpx.AsyncClient, settings: Settings, legacy: Backend
) -> None:
    recorded = EXPECTED["conversations"]["A"]
    path = recorded["conversation"]["path"]
    alice = _as(settings, recorded["user_id"])
    old = (await http.get(f"{path}/messages", headers=alice)).json()["items"]

    # An edit of an old message updates its document in place (the compare-and-set matches the
    # document the released version wrote).
    first = old[0]
    edited = await http.put(
        f"{path}/messages/{first['id']}", json={"metadata": {"seen": True}}, headers=alice
    )
    assert edited.status_code == 200 and edited.json()["parent_id"] is None

    # A new message follows the last old one; an edit of an old turn is a sibling.
    follow = await http.post(
        f"{path}/messages", json={"content": "and then?", "respond": False}, headers=alice
    )
    assert follow.json()["parent_id"] == old[-1]["id"]
    middle = old[2]
    again = await http.post(
        f"{path}/messages",
        json={"content": "instead", "respond": False, "parent_id": middle["parent_id"]},
        headers=alice,
    )
    assert (again.json()["sibling_count"], again.json()["sibling_index"]) == (2, 1)
    branch = (await http.get(f"{path}/messages", headers=alice)).json()["items"]
    assert [m["id"] for m in branch] == [*(m["id"] for m in old[:2]), again.json()["id"]]
    siblings = (await http.get(f"{path}/messages/{middle['id']}/siblings", headers=alice)).json()
    assert [m["id"] for m in siblings["items"]] == [middle["id"], again.json()["id"]]

    # A regenerate of an old reply, then back to the old branch, then the old branch cut.
    reply = next(m for m in old if m["role"] == "assistant")
    regenerated = await http.post(f"{path}/messages/{reply['id']}/regenerate", headers=alice)
    assert regenerated.status_code == 201 and regenerated.json()["parent_id"] == reply["parent_id"]
    back = await http.put(path, json={"active_leaf_id": middle["id"]}, headers=alice)
    assert back.json()["active_leaf_id"] == follow.json()["id"]
    gone = await http.delete(f"{path}/messages/{middle['id']}", headers=alice)
    assert gone.status_code == 204
    conversation = (await http.get(path, headers=alice)).json()
    after = (await http.get(f"{path}/messages", headers=alice)).json()["items"]
    assert after[-1]["id"] == again.json()["id"] == conversation["active_leaf_id"]
    everything = (await http.get(f"{path}/messages?view=all", headers=alice)).json()["items"]
    assert len(everything) == conversation["message_count"]
    assert middle["id"] not in {m["id"] for m in everything}


async def test_an_old_idempotency_record_still_replays(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    """A retry, after the upgrade, of a POST the released version answered: the first result,
    with what it did not know (its parent) as the message is now."""
    recorded = EXPECTED["idempotent_append"]
    conversation = EXPECTED["conversations"][recorded["conversation"]]
    path = conversation["conversation"]["path"]
    headers = {**_as(settings, recorded["as"]), "Idempotency-Key": recorded["key"]}
    replay = await http.post(f"{path}/messages", json=recorded["body"], headers=headers)
    assert replay.status_code == 201, replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    first = recorded["first_response"]
    body = replay.json()
    assert _fields(first, body) == first
    listed = (await http.get(f"{path}/messages", headers=headers)).json()["items"]
    ids = [m["id"] for m in listed]
    assert body["parent_id"] == ids[ids.index(body["id"]) - 1]
    assert len(listed) == conversation["conversation"]["body"]["message_count"]
