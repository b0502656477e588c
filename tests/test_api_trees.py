"""Conversation trees over HTTP, on every store: edits and regenerates make siblings and move the
active branch, the model is sent exactly the reply's branch (the fake model records every
request), switching, deleting a subtree while its reply streams, forks, on_busy, titles."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from testkit.fake_llm import FakeLLM, Reply

from conversational_core.settings import Settings
from tests.fixtures.app import auth
from tests.fixtures.live import SseEvent, collect_until
from tests.fixtures.replies import ask, llm_settings, new_conversation, wait_end

SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture
def settings(llm: FakeLLM) -> Settings:
    return llm_settings(llm)


async def _messages(api: httpx.AsyncClient, cid: str, **params: str) -> list[dict[str, Any]]:
    response = await api.get(f"/conversations/{cid}/messages", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def _post(api: httpx.AsyncClient, cid: str, **body: Any) -> dict[str, Any]:
    response = await api.post(f"/conversations/{cid}/messages", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def _sent(request: dict[str, Any]) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = request["messages"]
    return messages


async def _events_until(
    api: httpx.AsyncClient, cid: str, kind: str, **where: Any
) -> list[SseEvent]:
    """The conversation's events, from the first retained, up to the first `kind` event whose
    data (or data["conversation"]) has the given values."""

    def done(event: SseEvent) -> bool:
        if event.event != kind:
            return False
        data = event.data.get("conversation", event.data)
        return all(data.get(k) == v for k, v in where.items())

    return await asyncio.wait_for(collect_until(api, f"/conversations/{cid}/events", done), 10)


async def test_edits_and_regenerates_are_siblings_and_the_model_gets_the_branch(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    llm.script = [Reply(["A1"]), Reply(["A2"]), Reply(["A2 edited"]), Reply(["A2 again"])]
    cid = await new_conversation(api, system_prompt="Be brief.")
    r1 = await ask(api, cid, "one")
    await wait_end(api, cid, r1)
    two = await _post(api, cid, content="two")
    await wait_end(api, cid, two["reply_message_id"])
    u1 = (await _messages(api, cid))[0]

    # An edit of "two": the new text under its parent.
    edit = await _post(api, cid, content="two, edited", parent_id=r1)
    assert edit["parent_id"] == r1 and (edit["sibling_count"], edit["sibling_index"]) == (2, 1)
    r2e = edit["reply_message_id"]
    await wait_end(api, cid, r2e)
    assert _sent(llm.requests[2]) == [
        SYSTEM,
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "two, edited"},
    ]
    branch = await _messages(api, cid)
    assert [m["content"] for m in branch] == ["one", "A1", "two, edited", "A2 edited"]
    assert [m["parent_id"] for m in branch] == [None, u1["id"], r1, edit["id"]]
    assert [(m["sibling_count"], m["sibling_index"]) for m in branch] == [
        (1, 0),
        (1, 0),
        (2, 1),
        (1, 0),
    ]
    conversation = (await api.get(f"/conversations/{cid}")).json()
    assert conversation["active_leaf_id"] == r2e and conversation["message_count"] == 6

    # A regenerate of that reply: a sibling, written from the same branch, with its settings.
    again = await api.post(
        f"/conversations/{cid}/messages/{r2e}/regenerate", json={"temperature": 0.5}
    )
    assert again.status_code == 201, again.text
    r2r = again.json()
    assert again.headers["location"] == f"/conversations/{cid}/messages/{r2r['id']}"
    assert r2r["parent_id"] == edit["id"] and r2r["status"] == "pending"
    assert (r2r["sibling_count"], r2r["sibling_index"]) == (2, 1)
    await wait_end(api, cid, r2r["id"])
    assert _sent(llm.requests[3]) == _sent(llm.requests[2])
    assert llm.requests[3]["temperature"] == 0.5 and "temperature" not in llm.requests[2]
    assert [m["content"] for m in await _messages(api, cid)] == [
        "one",
        "A1",
        "two, edited",
        "A2 again",
    ]
    done = (await api.get(f"/conversations/{cid}/messages/{r2r['id']}")).json()
    assert done["context"]["requested"] == {"temperature": 0.5}

    # The versions of each turn, and the branches by their leaves.
    siblings = (await api.get(f"/conversations/{cid}/messages/{two['id']}/siblings")).json()
    assert [m["content"] for m in siblings["items"]] == ["two", "two, edited"]
    assert siblings["next_cursor"] is None
    first_page = (
        await api.get(f"/conversations/{cid}/messages/{r2e}/siblings", params={"limit": 1})
    ).json()
    assert [m["content"] for m in first_page["items"]] == ["A2 edited"]
    rest = (
        await api.get(
            f"/conversations/{cid}/messages/{r2e}/siblings",
            params={"cursor": first_page["next_cursor"]},
        )
    ).json()
    assert [m["content"] for m in rest["items"]] == ["A2 again"]
    mixed = await api.get(  # (that cursor, for the siblings of another message)
        f"/conversations/{cid}/messages/{two['id']}/siblings",
        params={"cursor": first_page["next_cursor"]},
    )
    assert mixed.status_code == 400
    assert mixed.json()["detail"] == "The cursor was made for the siblings of another message."
    old = await _messages(api, cid, leaf=two["reply_message_id"])
    assert [m["content"] for m in old] == ["one", "A1", "two", "A2"]
    everything = await _messages(api, cid, view="all")
    assert [m["content"] for m in everything] == [
        "one",
        "A1",
        "two",
        "A2",
        "two, edited",
        "A2 edited",
        "A2 again",
    ]
    newest_first = await _messages(api, cid, order="desc", limit="2")
    assert [m["content"] for m in newest_first] == ["A2 again", "two, edited"]

    # What cannot be regenerated, and a replay.
    user_message = await api.post(f"/conversations/{cid}/messages/{edit['id']}/regenerate")
    assert user_message.status_code == 409
    missing = await api.post(f"/conversations/{cid}/messages/{u1['id'][:-4]}0000/regenerate")
    assert missing.status_code == 404
    key = {"Idempotency-Key": "regen-1"}
    llm.script = [Reply(["A2 third"])]
    once = await api.post(f"/conversations/{cid}/messages/{r2e}/regenerate", headers=key)
    twice = await api.post(f"/conversations/{cid}/messages/{r2e}/regenerate", headers=key)
    assert once.status_code == twice.status_code == 201
    assert twice.json()["id"] == once.json()["id"]
    assert twice.headers["idempotent-replayed"] == "true"
    other_body = await api.post(
        f"/conversations/{cid}/messages/{r2e}/regenerate", headers=key, json={"max_tokens": 5}
    )
    assert other_body.status_code == 422
    await wait_end(api, cid, once.json()["id"])
    # An unknown parent is refused, naming the field.
    unknown = await api.post(
        f"/conversations/{cid}/messages", json={"content": "x", "parent_id": "nope"}
    )
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["loc"] == ["body", "parent_id"]
    assert (await api.get(f"/conversations/{cid}")).json()["message_count"] == 8


async def test_switching_branches(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    cid = await new_conversation(api)
    first = await _post(api, cid, content="first", respond=False)
    old = await _post(api, cid, content="old", respond=False)
    tail = await _post(api, cid, content="old tail", respond=False)
    new = await _post(api, cid, content="new", respond=False, parent_id=first["id"])
    conversation = await api.get(f"/conversations/{cid}")
    etag = conversation.headers["etag"]
    assert conversation.json()["active_leaf_id"] == new["id"]

    switched = await api.put(
        f"/conversations/{cid}", json={"active_leaf_id": old["id"]}, headers={"If-Match": etag}
    )
    assert switched.status_code == 200, switched.text
    assert switched.json()["active_leaf_id"] == tail["id"]  # down its newest child
    assert switched.headers["etag"] != etag
    assert [m["content"] for m in await _messages(api, cid)] == ["first", "old", "old tail"]
    events = await _events_until(api, cid, "conversation.updated", active_leaf_id=tail["id"])
    assert events[-1].data["conversation"]["version"] == switched.json()["version"]

    stale = await api.put(
        f"/conversations/{cid}", json={"active_leaf_id": new["id"]}, headers={"If-Match": etag}
    )
    assert stale.status_code == 412
    from_root = await api.put(f"/conversations/{cid}", json={"active_leaf_id": first["id"]})
    assert from_root.json()["active_leaf_id"] == new["id"]  # the newest child of "first"
    unknown = await api.put(f"/conversations/{cid}", json={"active_leaf_id": "not-a-message"})
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["loc"] == ["body", "active_leaf_id"]
    null = await api.put(f"/conversations/{cid}", json={"active_leaf_id": None})
    assert null.status_code == 422
    # A change of settings beside a leaf that is no message: a 422 that changed nothing (the
    # client's retry with its If-Match then works).
    before = await api.get(f"/conversations/{cid}")
    refused = await api.put(
        f"/conversations/{cid}",
        json={"title": "not applied", "active_leaf_id": "not-a-message"},
        headers={"If-Match": before.headers["etag"]},
    )
    assert refused.status_code == 422
    after = await api.get(f"/conversations/{cid}")
    assert after.headers["etag"] == before.headers["etag"]
    assert after.json()["title"] == before.json()["title"]
    both = await api.put(
        f"/conversations/{cid}", json={"title": "two at once", "active_leaf_id": tail["id"]}
    )
    assert both.status_code == 200
    assert (both.json()["title"], both.json()["active_leaf_id"]) == ("two at once", tail["id"])
    # A new message goes under the active leaf.
    follow = await _post(api, cid, content="follow", respond=False)
    assert follow["parent_id"] == tail["id"]


async def test_deleting_a_subtree_while_its_reply_streams(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    llm.script = [Reply([f"w{i} " for i in range(200)], hold_after=3, delay=0.002)]
    cid = await new_conversation(api)
    base = await _post(api, cid, content="base", respond=False)
    side = await _post(api, cid, content="side", respond=False)
    await api.put(f"/conversations/{cid}", json={"active_leaf_id": base["id"]})
    asked = await _post(api, cid, content="question", parent_id=base["id"])
    reply = asked["reply_message_id"]
    await asyncio.wait_for(llm.holding.wait(), 10)

    deleted = await api.delete(f"/conversations/{cid}/messages/{asked['id']}")
    assert deleted.status_code == 204
    llm.release.set()
    await asyncio.wait_for(llm.aborted.wait(), 10)  # the provider's stream was closed
    conversation = (await api.get(f"/conversations/{cid}")).json()
    assert conversation["message_count"] == 2 and conversation["active_leaf_id"] == side["id"]
    events = await _events_until(api, cid, "conversation.updated", version=conversation["version"])
    assert events[-1].data["conversation"]["active_leaf_id"] == side["id"]
    gone = [e for e in events if e.event == "message.deleted"]
    assert gone[-1].data == {
        "message_id": asked["id"],
        "deleted_message_ids": [asked["id"], reply],
    }
    assert [m["content"] for m in await _messages(api, cid)] == ["base", "side"]
    assert (await api.get(f"/conversations/{cid}/messages/{reply}")).status_code == 404
    assert not [e for e in events if e.event == "message.completed"]


async def test_a_fork_copies_a_branch_into_a_new_conversation(
    api: httpx.AsyncClient, llm: FakeLLM, settings: Settings
) -> None:
    cid = await new_conversation(api, title="original", system_prompt="Be brief.", model="m2")
    r1 = await ask(api, cid, "one")
    await wait_end(api, cid, r1)
    await _post(api, cid, content="two", respond=False)

    forked = await api.post(f"/conversations/{cid}/fork", json={"message_id": r1})
    assert forked.status_code == 201, forked.text
    copy = forked.json()
    assert forked.headers["location"] == f"/conversations/{copy['id']}"
    assert copy["forked_from"] == {"conversation_id": cid, "message_id": r1}
    assert (copy["title"], copy["system_prompt"], copy["model"]) == ("original", "Be brief.", "m2")
    assert copy["message_count"] == 2
    copied = await _messages(api, copy["id"])
    assert [(m["role"], m["content"]) for m in copied] == [
        ("user", "one"),
        ("assistant", "Hello, world!"),
    ]
    assert copied[0]["reply_message_id"] == copied[1]["id"] != r1
    assert copy["active_leaf_id"] == copied[1]["id"]
    # The copy is a conversation of its own: it goes on without the original.
    follow = await ask(api, copy["id"], "three")
    await wait_end(api, copy["id"], follow)
    assert _sent(llm.requests[-1])[-1] == {"role": "user", "content": "three"}
    assert len(await _messages(api, cid)) == 3

    whole = await api.post(f"/conversations/{cid}/fork", json={"title": "mine"})
    assert whole.json()["title"] == "mine" and whole.json()["message_count"] == 3
    empty_body = await api.post(f"/conversations/{cid}/fork")
    assert empty_body.status_code == 201 and empty_body.json()["message_count"] == 3
    unknown = await api.post(f"/conversations/{cid}/fork", json={"message_id": "nope"})
    assert unknown.status_code == 422
    listed = (await api.get("/conversations")).json()["items"]
    assert {c["id"] for c in listed} >= {cid, copy["id"], whole.json()["id"]}
    bob = auth(settings, "bob")
    assert (await api.post(f"/conversations/{cid}/fork", headers=bob)).status_code == 404


async def test_forks_of_the_active_branch_while_a_writer_moves_it(api: httpx.AsyncClient) -> None:
    """Forks that leave message_id out (the active leaf) while another client appends and
    deletes at the leaf: each is a copy of a branch as it was (201), or a 409 to try again -
    never a 422 about a message_id the client did not send."""
    cid = await new_conversation(api)
    for i in range(5):
        await _post(api, cid, content=f"m{i}", respond=False)
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            added = await _post(api, cid, content="moving", respond=False)
            await api.delete(f"/conversations/{cid}/messages/{added['id']}")

    moving = asyncio.create_task(writer())
    try:
        forks = await asyncio.gather(
            *(api.post(f"/conversations/{cid}/fork", json={}) for _ in range(40))
        )
    finally:
        stop.set()
        await moving
    statuses = [f.status_code for f in forks]
    assert set(statuses) <= {201, 409}, [f.text for f in forks if f.status_code not in (201, 409)]
    assert 201 in statuses
    for fork in forks:
        if fork.status_code == 201:
            assert fork.json()["message_count"] in (5, 6)


@pytest.mark.parametrize("policy", ["reject", "interrupt", "queue"])
async def test_a_message_while_a_reply_is_written_follows_on_busy(
    api: httpx.AsyncClient, llm: FakeLLM, policy: str
) -> None:
    held = Reply([f"h{i} " for i in range(100)], hold_after=2, delay=0.001)
    llm.script = [held, Reply(["second"])]
    cid = await new_conversation(api, on_busy=policy)
    first = await ask(api, cid, "first")
    await asyncio.wait_for(llm.holding.wait(), 10)

    response = await api.post(f"/conversations/{cid}/messages", json={"content": "again"})
    if policy == "reject":
        assert response.status_code == 409, response.text
        assert "on_busy" in response.json()["detail"]
        assert (await api.get(f"/conversations/{cid}")).json()["message_count"] == 2
        llm.release.set()
        await wait_end(api, cid, first)
        return
    assert response.status_code == 201, response.text
    second = response.json()
    assert second["parent_id"] == first  # under the running reply, the active leaf
    llm.release.set()
    if policy == "interrupt":
        await asyncio.wait_for(llm.aborted.wait(), 10)  # the running reply's stream closed
    await wait_end(api, cid, second["reply_message_id"])
    ended = (await api.get(f"/conversations/{cid}/messages/{first}")).json()
    if policy == "interrupt":
        assert ended["status"] == "cancelled" and ended["content"] == "h0 h1 "
        # A cancelled reply is not history.
        assert _sent(llm.requests[1]) == [
            {"role": "user", "content": "first"},
            {"role": "user", "content": "again"},
        ]
    else:
        assert ended["status"] == "completed"
        assert _sent(llm.requests[1])[1]["role"] == "assistant"
    final = (await api.get(f"/conversations/{cid}/messages/{second['reply_message_id']}")).json()
    assert final["status"] == "completed" and final["content"] == "second"


async def test_on_busy_is_a_setting(api: httpx.AsyncClient) -> None:
    cid = await new_conversation(api)
    conversation = (await api.get(f"/conversations/{cid}")).json()
    assert conversation["on_busy"] == "queue"
    changed = await api.put(f"/conversations/{cid}", json={"on_busy": "reject"})
    assert changed.json()["on_busy"] == "reject"
    assert (await api.put(f"/conversations/{cid}", json={"on_busy": "never"})).status_code == 422
    assert (await api.put(f"/conversations/{cid}", json={"on_busy": None})).status_code == 422


class TestTitles:
    @pytest.fixture
    def settings(self, llm: FakeLLM) -> Settings:
        return llm_settings(llm, AUTO_TITLE=True)

    async def test_the_model_names_a_conversation_after_its_first_reply(
        self, api: httpx.AsyncClient, llm: FakeLLM
    ) -> None:
        llm.script = [Reply(["Sure."]), Reply(['"Planning a ', "trip to ", 'Lisbon".'])]
        cid = await new_conversation(api)
        assert (await api.get(f"/conversations/{cid}")).json()["title_source"] is None
        await ask(api, cid, "I want to visit Lisbon in May, what should I see?")
        events = await _events_until(api, cid, "conversation.updated", title_source="auto")
        assert events[-1].data["conversation"]["title"] == "Planning a trip to Lisbon"
        # After the reply's end: the title is written from a reply that completed.
        kinds = [e.event for e in events]
        assert kinds.index("message.completed") < kinds.index("conversation.updated")
        conversation = (await api.get(f"/conversations/{cid}")).json()
        assert conversation["title"] == "Planning a trip to Lisbon"
        assert conversation["title_source"] == "auto"
        title_request = llm.requests[1]
        assert title_request["messages"][-1] == {
            "role": "user",
            "content": "I want to visit Lisbon in May, what should I see?",
        }
        assert title_request["max_tokens"] <= 32
        # Only once: the next reply asks for no title.
        second = await ask(api, cid, "And in June?")
        await wait_end(api, cid, second)
        assert len(llm.requests) == 3

    async def test_a_title_from_the_user_is_never_replaced(
        self, api: httpx.AsyncClient, llm: FakeLLM
    ) -> None:
        given = await new_conversation(api, title="Mine")
        reply = await ask(api, given, "hello")
        await wait_end(api, given, reply)
        cleared = await new_conversation(api)
        await api.put(f"/conversations/{cleared}", json={"title": None})
        reply = await ask(api, cleared, "hello")
        await wait_end(api, cleared, reply)
        assert len(llm.requests) == 2  # the replies only: no title asked for
        assert (await api.get(f"/conversations/{given}")).json()["title"] == "Mine"
        after = (await api.get(f"/conversations/{cleared}")).json()
        assert (after["title"], after["title_source"]) == (None, "user")

    async def test_a_title_the_provider_is_slow_to_write_does_not_hold_the_next_reply(
        self, api: httpx.AsyncClient, llm: FakeLLM
    ) -> None:
        """The title is a completion of its own: a provider that stalls on it (60 s here, its
        timeout) does not hold the conversation's next reply, which is written at once."""
        llm.script = [Reply(["Sure."]), Reply(["A title"], first_delay=60), Reply(["next"])]
        cid = await new_conversation(api)
        await wait_end(api, cid, await ask(api, cid, "hello"))
        while len(llm.requests) < 2:  # the title asked for
            await asyncio.sleep(0.01)
        second = await ask(api, cid, "hello again")
        async with asyncio.timeout(10):
            await wait_end(api, cid, second)
        final = (await api.get(f"/conversations/{cid}/messages/{second}")).json()
        assert (final["status"], final["content"]) == ("completed", "next")
        assert (await api.get(f"/conversations/{cid}")).json()["title"] is None  # not yet

    async def test_a_failing_title_costs_only_the_title(
        self, api: httpx.AsyncClient, llm: FakeLLM
    ) -> None:
        from testkit.fake_llm import Fail

        llm.script = [Reply(["ok"]), Fail(400), Reply(["ok again"]), Fail(400)]
        cid = await new_conversation(api)
        reply = await ask(api, cid, "hello")
        await wait_end(api, cid, reply)
        while len(llm.requests) < 2:  # (the title is asked for beside the next replies)
            await asyncio.sleep(0.01)
        second = await ask(api, cid, "hello again")
        await wait_end(api, cid, second)
        assert len(llm.requests) >= 3
        conversation = (await api.get(f"/conversations/{cid}")).json()
        assert conversation["title"] is None and conversation["title_source"] is None
        final = (await api.get(f"/conversations/{cid}/messages/{reply}")).json()
        assert final["status"] == "completed"
