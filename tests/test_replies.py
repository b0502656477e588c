"""AI replies end to end: a real server speaking the OpenAI protocol, the real SDK, real SSE."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from testkit.fake_llm import Fail, FakeLLM, Reply

from conversational_core.app import create_app
from conversational_core.settings import Settings
from conversational_core.storage.base import Store
from conversational_core.storage.factory import Backend
from tests.fixtures.app import auth
from tests.fixtures.live import collect_until_end, serve
from tests.fixtures.replies import ask, deltas, llm_settings, new_conversation, wait_end


@pytest.fixture
def settings(llm: FakeLLM) -> Settings:
    return llm_settings(llm)


async def test_reply_streams_and_completes(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    cid = await new_conversation(api, system_prompt="You are terse.", temperature=0.2)
    reply_id = await ask(api, cid, "Say hello")
    pending = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert pending["role"] == "assistant"
    assert pending["status"] in ("pending", "streaming", "completed")

    events = await wait_end(api, cid, reply_id)
    final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert final["status"] == "completed"
    assert final["content"] == llm.text() == deltas(events, reply_id)
    assert final["usage"] == {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18}
    assert final["context"]["messages_sent"] == 2
    completed = [e for e in events if e.event == "message.completed"]
    assert len(completed) == 1 and completed[0].data["message"]["content"] == llm.text()
    created = [e.data["message_id"] for e in events if e.event == "message.created"]
    assert reply_id in created

    sent = llm.requests[0]
    assert sent["model"] == "fake-model" and sent["stream"] is True
    assert sent["temperature"] == 0.2
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello"},
    ]


async def test_history_is_sent_and_replies_are_queued_in_order(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    llm.script = [Reply(["first ", "answer"], delay=0.02), Reply(["second"])]
    cid = await new_conversation(api)
    first = await ask(api, cid, "one")
    second = await ask(api, cid, "two")  # while the first reply is being written
    await wait_end(api, cid, second)
    items = (await api.get(f"/conversations/{cid}/messages")).json()["items"]
    assert [(m["role"], m["content"], m["status"]) for m in items] == [
        ("user", "one", "completed"),
        ("assistant", "first answer", "completed"),
        ("user", "two", "completed"),
        ("assistant", "second", "completed"),
    ]
    assert items[1]["id"] == first
    # The second reply was written after the first, with it in its history.
    assert llm.requests[1]["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "two"},
    ]


async def test_resume_with_last_event_id_has_no_gap_and_no_duplicate(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    tokens = [f"t{i} " for i in range(12)]
    llm.script = [Reply(tokens, hold_after=4)]
    cid = await new_conversation(api)
    url = f"/conversations/{cid}/events"
    reply_id = await ask(api, cid, "count")
    before = await collect_until_end(api, url, {}, reply_id, after="0", until_chars=9)
    last_id = before[-1].id
    assert last_id is not None
    llm.release.set()
    after = await collect_until_end(api, url, {}, reply_id, after=last_id)
    ids = [e.id for e in before + after]
    assert len(ids) == len(set(ids))
    final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert final["content"] == "".join(tokens)
    assert deltas(before, reply_id) + deltas(after, reply_id) == final["content"]


async def test_cancel_mid_stream_stops_the_provider(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    tokens = [f"w{i} " for i in range(200)]
    llm.script = [Reply(tokens, hold_after=3, delay=0.002)]
    cid = await new_conversation(api)
    reply_id = await ask(api, cid, "talk")
    events = await collect_until_end(
        api, f"/conversations/{cid}/events", {}, reply_id, after="0", until_chars=9
    )
    await llm.holding.wait()
    cancel = await api.post(f"/conversations/{cid}/messages/{reply_id}/cancel")
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
    again = await api.post(f"/conversations/{cid}/messages/{reply_id}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    llm.release.set()
    await llm.aborted.wait()  # the worker closed the provider's stream
    assert llm.streams_finished == 0
    rest = await collect_until_end(
        api, f"/conversations/{cid}/events", {}, reply_id, after=events[-1].id
    )
    final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert final["status"] == "cancelled"
    assert final["content"] == deltas(events + rest, reply_id)
    assert [e.event for e in rest if e.data.get("message_id") == reply_id][-1] == (
        "message.cancelled"
    )
    assert len(final["content"]) < len("".join(tokens))


@pytest.mark.parametrize(
    "first",
    [Reply(["never"], first_delay=60), Fail(503, retry_after=60), Fail(503, retry_after=0.5)],
    ids=["silent", "backoff", "short-backoff"],
)
async def test_a_cancel_stops_a_reply_whose_provider_says_nothing(
    api: httpx.AsyncClient, llm: FakeLLM, first: Reply | Fail
) -> None:
    """Cancelled while the provider has not sent a token (the request is open and silent, or
    the worker waits to retry it): the provider's connection is closed within a second or so,
    not at its timeout (60 s here), no further call is made for the reply, and the
    conversation's next reply is written at once."""
    llm.script = [first, Reply(["next"])]
    cid = await new_conversation(api)
    reply_id = await ask(api, cid, "talk")
    while not llm.requests:  # (the worker has asked the model)
        await asyncio.sleep(0.01)
    cancel = await api.post(f"/conversations/{cid}/messages/{reply_id}/cancel")
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"
    if isinstance(first, Reply):
        await asyncio.wait_for(llm.aborted.wait(), 5)
    after = await ask(api, cid, "and now?")
    async with asyncio.timeout(10):
        await wait_end(api, cid, after)
    final = (await api.get(f"/conversations/{cid}/messages/{after}")).json()
    assert (final["status"], final["content"]) == ("completed", "next")
    assert len(llm.requests) == 2  # the cancelled reply's one call, and the next reply's


async def test_a_reply_that_streams_too_long_fails_with_its_text_so_far(
    backend: Backend, llm: FakeLLM
) -> None:
    """A provider that trickles tokens forever (never silent long enough for a timeout): the
    reply ends `failed` at LLM_REPLY_MAX_SECONDS, with what was written, and its stream closes."""
    settings = llm_settings(llm, LLM_REPLY_MAX_SECONDS=1)
    llm.script = [Reply([f"t{i} " for i in range(1000)], delay=0.05)]
    async with (
        serve(create_app(settings, backend=backend)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(settings, "alice"), timeout=20) as api,
    ):
        cid = await new_conversation(api)
        reply_id = await ask(api, cid, "talk forever")
        events = await wait_end(api, cid, reply_id)
        await asyncio.wait_for(llm.aborted.wait(), 5)
        final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert final["status"] == "failed"
    assert final["error"] == "The AI provider's answer took longer than 1 seconds."
    assert final["content"] and final["content"] == deltas(events, reply_id)
    assert events[-1].event == "message.failed"


async def test_a_reply_cut_at_the_output_limit_or_filtered_says_so(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    """The model stopped at the output limit: the reply is complete as far as it goes, and its
    context says why it ends there; withheld entirely by the provider's content filter: a
    failed reply with a readable error, not an empty completed one."""
    llm.script = [Reply(["Cut ", "here"], finish="length"), Reply([], finish="content_filter")]
    cid = await new_conversation(api)
    cut = await ask(api, cid, "long answer please")
    await wait_end(api, cid, cut)
    final = (await api.get(f"/conversations/{cid}/messages/{cut}")).json()
    assert (final["status"], final["content"]) == ("completed", "Cut here")
    assert final["context"]["finish_reason"] == "length"
    withheld = await ask(api, cid, "something filtered")
    events = await wait_end(api, cid, withheld)
    final = (await api.get(f"/conversations/{cid}/messages/{withheld}")).json()
    assert (final["status"], final["content"]) == ("failed", "")
    assert final["error"] == "The AI provider declined to answer (its content filter)."
    assert events[-1].event == "message.failed"
    plain = await ask(api, cid, "hi")
    await wait_end(api, cid, plain)
    final = (await api.get(f"/conversations/{cid}/messages/{plain}")).json()
    assert final["status"] == "completed" and "finish_reason" not in final["context"]


async def test_retries_server_errors_then_completes(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    llm.script = [Fail(503), Fail(503, retry_after=0.05), Reply(["ok"])]
    cid = await new_conversation(api)
    reply_id = await ask(api, cid, "hi")
    await wait_end(api, cid, reply_id)
    final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert final["status"] == "completed" and final["content"] == "ok"
    assert len(llm.requests) == 3


async def test_client_error_fails_at_once_with_a_readable_error(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    llm.script = [Fail(400)]
    cid = await new_conversation(api)
    reply_id = await ask(api, cid, "hi")
    events = await wait_end(api, cid, reply_id)
    final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert final["status"] == "failed"
    assert final["error"] == "The AI provider rejected the request. (HTTP 400)"
    assert "internal details" not in str(final) and "Traceback" not in str(final)
    assert len(llm.requests) == 1
    assert events[-1].event == "message.failed"


async def test_deleting_the_conversation_stops_the_reply(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    llm.script = [Reply([f"x{i}" for i in range(200)], hold_after=2, delay=0.002)]
    cid = await new_conversation(api)
    await ask(api, cid, "go")
    await llm.holding.wait()
    assert (await api.delete(f"/conversations/{cid}")).status_code == 204
    llm.release.set()
    await llm.aborted.wait()
    assert llm.streams_finished == 0


async def _held_at_abc(api: httpx.AsyncClient, llm: FakeLLM) -> tuple[str, str]:
    """A reply that streamed "abc" of "abcde" (its clients have it) and is held there until
    `llm.release` is set: (conversation id, reply id)."""
    llm.script = [Reply(["a", "b", "c", "d", "e"], hold_after=3)]
    cid = await new_conversation(api)
    reply_id = await ask(api, cid, "go")
    await collect_until_end(
        api, f"/conversations/{cid}/events", {}, reply_id, after="0", until_chars=3
    )
    await llm.holding.wait()
    return cid, reply_id


async def test_partial_text_is_readable_while_streaming(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    cid, reply_id = await _held_at_abc(api, llm)
    # A GET shows what the deltas published so far: exactly what the stream's clients have.
    message = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert message["status"] == "streaming"
    assert message["content"] == "abc"
    assert message["parts"] == [{"type": "text", "text": "abc"}]
    page = (await api.get(f"/conversations/{cid}/messages")).json()["items"]
    assert [(m["status"], m["content"]) for m in page] == [
        ("completed", "go"),
        ("streaming", "abc"),
    ]
    llm.release.set()
    await wait_end(api, cid, reply_id)
    message = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert (message["status"], message["content"]) == ("completed", "abcde")


async def test_a_fork_while_a_reply_streams_copies_its_text_so_far(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    cid, reply_id = await _held_at_abc(api, llm)
    forked = await api.post(f"/conversations/{cid}/fork", json={"message_id": reply_id})
    assert forked.status_code == 201, forked.text
    items = (await api.get(f"/conversations/{forked.json()['id']}/messages")).json()["items"]
    # Nothing will write the copy: it is cancelled, with exactly what the deltas published.
    assert [(m["role"], m["status"], m["content"]) for m in items] == [
        ("user", "completed", "go"),
        ("assistant", "cancelled", "abc"),
    ]
    assert items[1]["parts"] == [{"type": "text", "text": "abc"}]
    llm.release.set()
    await wait_end(api, cid, reply_id)


async def test_metadata_set_while_a_reply_streams_keeps_its_text(
    api: httpx.AsyncClient, llm: FakeLLM, settings: Settings
) -> None:
    cid, reply_id = await _held_at_abc(api, llm)
    service = {**auth(settings, "svc", ["service"]), "X-On-Behalf-Of": "alice"}
    edited = await api.put(
        f"/conversations/{cid}/messages/{reply_id}", json={"metadata": {"k": 1}}, headers=service
    )
    assert edited.status_code == 200, edited.text
    assert (edited.json()["status"], edited.json()["content"]) == ("streaming", "abc")
    llm.release.set()
    events = await wait_end(api, cid, reply_id)
    updated = [e for e in events if e.event == "message.updated"]
    # The update tells clients the text they have (the first one is the reply's start):
    # following the events (an update replaces the text so far, deltas append) gives it all.
    assert [e.data["message"]["content"] for e in updated] == ["", "abc"]
    text = ""
    for e in events:
        if e.data.get("message_id") != reply_id:
            continue
        if e.event == "message.updated":
            text = e.data["message"]["content"]
        elif e.event == "message.delta":
            text += e.data["delta"]
    assert text == "abcde" == events[-1].data["message"]["content"]
    assert events[-1].data["message"]["metadata"] == {"k": 1}


async def test_deleting_the_reply_stops_it(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    llm.script = [Reply([f"y{i}" for i in range(200)], hold_after=2, delay=0.002)]
    cid = await new_conversation(api)
    reply_id = await ask(api, cid, "go")
    await llm.holding.wait()
    deleted = await api.delete(f"/conversations/{cid}/messages/{reply_id}")
    assert deleted.status_code == 204
    llm.release.set()
    await llm.aborted.wait()
    assert llm.streams_finished == 0
    items = (await api.get(f"/conversations/{cid}/messages")).json()["items"]
    assert [m["role"] for m in items] == ["user"]


def test_events_are_written_as_the_sse_format_has_them() -> None:
    """Events are encoded by hand (replies/sse.py): `id`, `event` and `data` lines, CRLF; data
    that is not one line is split into data lines, which a client joins with line feeds."""
    from conversational_core.replies.sse import comment, event

    assert (
        event("1732459940361-0", "message.delta", b'{"delta":"a\\nb \xc3\xa9"}')
        == b"id: 1732459940361-0\r\nevent: message.delta\r\n"
        b'data: {"delta":"a\\nb \xc3\xa9"}\r\n\r\n'
    )
    assert (
        event("7", "message.updated", b'{"a":1}\n{"b":2}\r\n{"c":3}')
        == b"id: 7\r\nevent: message.updated\r\n"
        b'data: {"a":1}\r\ndata: {"b":2}\r\ndata: {"c":3}\r\n\r\n'
    )
    assert comment("too far\nbehind", 2000) == b": too far behind\r\nretry: 2000\r\n\r\n"


async def test_a_stream_ends_at_its_time_limit_with_the_hint_to_reconnect(
    sqlite_store: Store,
) -> None:
    from conversational_core.app import create_app
    from tests.conftest import backend_for, make_settings
    from tests.fixtures.app import app_client

    limited = make_settings(SSE_MAX_CONNECTION_SECONDS=1)
    backend = backend_for(sqlite_store, limited)
    headers = auth(limited, "alice")
    async with app_client(create_app(limited, backend=backend)) as api:
        cid = (await api.post("/conversations", json={}, headers=headers)).json()["id"]
        stream = await api.get(f"/conversations/{cid}/events", headers=headers)  # (1 s)
    await backend.events.close()
    assert stream.status_code == 200
    lines = stream.text.splitlines()
    assert ": connection time limit; reconnect with Last-Event-ID" in lines
    assert lines.count(f"retry: {limited.SSE_RETRY_MS}") == 2  # on connecting and on ending
