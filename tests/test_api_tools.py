"""Typed parts and client-side tools over HTTP, on every store, with a model that speaks the real
OpenAI streaming protocol (tool-call argument chunks, `reasoning_content`): a two-call round
trip, what the second request carries, reasoning kept apart from `content`, the per-part delta
invariant, every tool_results error, the timeout, cancel, MAX_TOOL_ROUNDS, files as image parts,
and what a plain user may not post. (Anthropic's protocol: test_anthropic_tools.py.)"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import httpx
import orjson
import pytest
from testkit.fake_llm import FakeLLM, Reply, tool_call_deltas

from conversational_core.app import create_app
from conversational_core.settings import Settings
from conversational_core.storage.factory import Backend
from tests.fixtures.app import auth
from tests.fixtures.live import SseEvent, collect_until, serve
from tests.fixtures.replies import ask, llm_settings, new_conversation, wait_end

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city now.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "description": "The time in a zone.", "parameters": {"type": "object"}}
CALLS = [("call_a", "get_weather", '{"city": "Lisbon"}'), ("call_b", "get_time", '{"tz": "WET"}')]


@pytest.fixture
def settings(llm: FakeLLM) -> Settings:
    return llm_settings(llm, MAX_TOOL_ROUNDS=3)


def calling(*calls: tuple[str, str, str], text: str = "Let me check.") -> Reply:
    return Reply([], deltas=tool_call_deltas(list(calls), text=text), finish="tool_calls")


async def _message(api: httpx.AsyncClient, cid: str, mid: str) -> dict[str, Any]:
    response = await api.get(f"/conversations/{cid}/messages/{mid}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _by_part(events: list[SseEvent], mid: str) -> dict[int, list[dict[str, Any]]]:
    parts: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e.event == "message.delta" and e.data["message_id"] == mid:
            parts[e.data["part_index"]].append(e.data)
    return parts


def assert_deltas_make_the_parts(events: list[SseEvent], message: dict[str, Any]) -> None:
    """The deltas of each part concatenate to exactly its text (a tool call's arguments), and
    say its type; the first delta of a tool call names it."""
    by_part = _by_part(events, message["id"])
    assert sorted(by_part) == list(range(len(message["parts"])))
    for index, part in enumerate(message["parts"]):
        deltas = by_part[index]
        assert {d["part_type"] for d in deltas} == {part["type"]}
        field = "arguments" if part["type"] == "tool_call" else "text"
        assert "".join(d["delta"] for d in deltas) == part[field]
        if part["type"] == "tool_call":
            assert (deltas[0]["tool_call_id"], deltas[0]["name"]) == (part["id"], part["name"])


async def _answer_both(
    api: httpx.AsyncClient, cid: str, reply_id: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """Answer the two CALLS of a reply."""
    results = [{"tool_call_id": i, "output": "x"} for i, _, _ in CALLS]
    return await api.post(
        f"/conversations/{cid}/messages/{reply_id}/tool_results",
        json={"results": results},
        headers=headers,
    )


async def _waiting_reply(api: httpx.AsyncClient, llm: FakeLLM, **conv: Any) -> tuple[str, str]:
    """A conversation with WEATHER and TIME whose reply called both and waits."""
    llm.script = [calling(*CALLS)]
    cid = await new_conversation(api, tools=[WEATHER, TIME], **conv)
    reply_id = await ask(api, cid, "Weather and time in Lisbon?")
    events = await wait_end(api, cid, reply_id)
    assert events[-1].event == "message.requires_action"
    return cid, reply_id


async def test_a_two_call_round_trip_completes(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    llm.script = [calling(*CALLS)]
    cid = await new_conversation(api, tools=[WEATHER, TIME])
    reply_id = await ask(api, cid, "Weather and time in Lisbon?")
    events = await wait_end(api, cid, reply_id)
    waiting = events[-1].data["message"]
    assert events[-1].event == "message.requires_action"
    assert waiting["status"] == "requires_action"
    assert waiting["content"] == "Let me check."
    assert waiting["parts"] == [
        {"type": "text", "text": "Let me check."},
        *({"type": "tool_call", "id": i, "name": n, "arguments": a} for i, n, a in CALLS),
    ]
    assert_deltas_make_the_parts(events, waiting)
    assert await _message(api, cid, reply_id) == waiting
    first = llm.requests[0]
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather", "get_time"]
    assert first["tools"][0]["function"]["parameters"] == WEATHER["parameters"]
    assert "tool_choice" not in first  # none set: the server's default (auto)

    answered = await api.post(
        f"/conversations/{cid}/messages/{reply_id}/tool_results",
        json={
            "results": [
                {"tool_call_id": "call_b", "output": "09:41"},
                {"tool_call_id": "call_a", "output": "18 C, sunny"},
            ]
        },
    )
    assert answered.status_code == 201, answered.text
    tool = answered.json()
    assert (tool["role"], tool["parent_id"], tool["content"]) == ("tool", reply_id, "")
    assert tool["parts"] == [
        {"type": "tool_result", "tool_call_id": "call_b", "output": "09:41", "is_error": False},
        {"type": "tool_result", "tool_call_id": "call_a", "output": "18 C, sunny",
         "is_error": False},
    ]  # fmt: skip
    assert answered.headers["location"].endswith(f"/messages/{tool['id']}")
    final_events = await wait_end(api, cid, tool["reply_message_id"])
    assert final_events[-1].event == "message.completed"
    final = final_events[-1].data["message"]
    assert (final["parent_id"], final["content"]) == (tool["id"], "Hello, world!")
    assert (await _message(api, cid, reply_id))["status"] == "completed"

    # The second request carries the calls and their results, paired by id.
    sent = llm.requests[1]["messages"]
    assert sent[0] == {"role": "user", "content": "Weather and time in Lisbon?"}
    assert sent[1] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in CALLS
        ],
    }
    assert sent[2:] == [
        {"role": "tool", "tool_call_id": "call_b", "content": "09:41"},
        {"role": "tool", "tool_call_id": "call_a", "content": "18 C, sunny"},
    ]
    listed = (await api.get(f"/conversations/{cid}/messages")).json()["items"]
    assert [m["role"] for m in listed] == ["user", "assistant", "tool", "assistant"]
    conv = (await api.get(f"/conversations/{cid}")).json()
    assert conv["active_leaf_id"] == final["id"]
    # The events of the answer: the assistant completed, then the tool message and the reply.
    waited = next(i for i, e in enumerate(final_events) if e.event == "message.requires_action")
    kinds = [
        (e.event, e.data["message_id"])
        for e in final_events[waited + 1 :]
        if e.event in ("message.completed", "message.created")
    ]
    assert kinds[:3] == [
        ("message.completed", reply_id),
        ("message.created", tool["id"]),
        ("message.created", final["id"]),
    ]
    # Regenerating the answer asks again with the same tool round (a sibling under the tool
    # message).
    again = await api.post(f"/conversations/{cid}/messages/{final['id']}/regenerate")
    assert again.status_code == 201, again.text
    assert (again.json()["parent_id"], again.json()["sibling_index"]) == (tool["id"], 1)
    await wait_end(api, cid, again.json()["id"])
    assert llm.requests[2]["messages"] == llm.requests[1]["messages"]


async def test_calls_a_client_cannot_run_fail_the_reply_and_no_arguments_are_braces(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    """A call whose arguments were cut at the output limit, or are not a JSON object, is not
    offered to the client to run: the reply fails with what it wrote. A call with no
    arguments has `{}` (JSON text, as every call's), its deltas making them too."""
    cut = Reply([], deltas=tool_call_deltas([("call_c", "get_weather", '{"city": "Lis')]))
    cut.finish = "length"
    not_object = calling(("call_n", "get_weather", "[1, 2]"))
    empty = calling(("call_e", "get_time", ""), text="")
    llm.script = [cut, not_object, empty]
    cid = await new_conversation(api, tools=[WEATHER, TIME])
    for error in (
        "The AI model's tool call was cut off at the output limit.",
        "The AI model called a tool with arguments that are not a JSON object.",
    ):
        reply_id = await ask(api, cid, "Weather?")
        events = await wait_end(api, cid, reply_id)
        final = events[-1].data["message"]
        assert (events[-1].event, final["error"]) == ("message.failed", error)
        assert final["parts"][-1]["type"] == "tool_call"  # what it wrote, kept
        assert_deltas_make_the_parts(events, final)
    reply_id = await ask(api, cid, "Time?")
    events = await wait_end(api, cid, reply_id)
    assert events[-1].event == "message.requires_action"
    waiting = events[-1].data["message"]
    assert waiting["parts"] == [
        {"type": "tool_call", "id": "call_e", "name": "get_time", "arguments": "{}"}
    ]
    assert_deltas_make_the_parts(events, waiting)


async def test_reasoning_is_kept_apart_from_content(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    llm.script = [
        Reply(
            [],
            deltas=[
                {"reasoning_content": "The user "},
                {"reasoning_content": "greets me."},
                {"content": "Hello"},
                {"content": " there"},
            ],
        )
    ]
    cid = await new_conversation(api)
    reply_id = await ask(api, cid, "Hi")
    events = await wait_end(api, cid, reply_id)
    reply = events[-1].data["message"]
    assert reply["content"] == "Hello there"
    assert reply["parts"] == [
        {"type": "reasoning", "text": "The user greets me."},
        {"type": "text", "text": "Hello there"},
    ]
    assert_deltas_make_the_parts(events, reply)
    await wait_end(api, cid, await ask(api, cid, "And now?"))
    # Reasoning is not sent back to an OpenAI-compatible server (DeepSeek refuses it).
    assert llm.requests[1]["messages"][1] == {"role": "assistant", "content": "Hello there"}


async def test_tool_results_errors(
    api: httpx.AsyncClient, llm: FakeLLM, settings: Settings
) -> None:
    cid, reply_id = await _waiting_reply(api, llm)
    url = f"/conversations/{cid}/messages/{reply_id}/tool_results"

    def results(*ids: str) -> dict[str, Any]:
        return {"results": [{"tool_call_id": i, "output": "x"} for i in ids]}

    for body, where in [
        (results("call_a"), ["body", "results"]),  # call_b not answered
        (results("call_a", "call_b", "call_c"), ["body", "results", "2", "tool_call_id"]),
        (results("call_a", "call_a", "call_b"), ["body", "results", "1", "tool_call_id"]),
    ]:
        refused = await api.post(url, json=body)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["errors"][0]["loc"] == where
    assert (await api.post(url, json={"results": []})).status_code == 422
    assert (await _message(api, cid, reply_id))["status"] == "requires_action"  # untouched

    bob = auth(settings, "bob")
    assert (await api.post(url, json=results("call_a", "call_b"), headers=bob)).status_code == 404
    key = {"Idempotency-Key": "answer-1"}
    first = await api.post(url, json=results("call_a", "call_b"), headers=key)
    assert first.status_code == 201
    again = await api.post(url, json=results("call_a", "call_b"), headers=key)
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    twice = await api.post(url, json=results("call_a", "call_b"))
    assert twice.status_code == 409, twice.text
    # A second answer under a new key (a client that sends a key with every request) is no
    # replay: 409 as well, and nothing written.
    for other in ("answer-2", "answer-3"):
        again = await api.post(
            url, json=results("call_a", "call_b"), headers={"Idempotency-Key": other}
        )
        assert again.status_code == 409, again.text
    # A message that never waited: a user message, the tool message; with a key or not.
    user_id = first.json()["parent_id"]
    for mid in ((await _message(api, cid, user_id))["parent_id"], first.json()["id"]):
        for headers in ({}, {"Idempotency-Key": f"not-waiting-{mid}"}):
            not_waiting = await api.post(
                f"/conversations/{cid}/messages/{mid}/tool_results",
                json=results("call_a"),
                headers=headers,
            )
            assert not_waiting.status_code == 409, not_waiting.text
    everything = (await api.get(f"/conversations/{cid}/messages?view=all")).json()["items"]
    assert [m["role"] for m in everything].count("tool") == 1
    await wait_end(api, cid, first.json()["reply_message_id"])


async def test_a_reply_left_waiting_fails_after_the_timeout(
    backend: Backend, llm: FakeLLM, settings: Settings
) -> None:
    quick = settings.model_copy(update={"TOOL_RESULT_TIMEOUT_SECONDS": 1})
    async with (
        serve(create_app(quick, backend=backend)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(quick, "alice"), timeout=20) as api,
    ):
        cid, reply_id = await _waiting_reply(api, llm)
        url = f"/conversations/{cid}/events"

        def failed(event: SseEvent) -> bool:
            return event.event == "message.failed" and event.data["message_id"] == reply_id

        events = await collect_until(api, url, failed)
        ended = events[-1].data["message"]
        assert ended["status"] == "failed"
        assert ended["error"] == "No tool results arrived within 1 seconds."
        assert [p["type"] for p in ended["parts"]] == ["text", "tool_call", "tool_call"]
        assert (await _answer_both(api, cid, reply_id)).status_code == 409


async def test_a_waiting_reply_can_be_cancelled(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    cid, reply_id = await _waiting_reply(api, llm)
    cancelled = await api.post(f"/conversations/{cid}/messages/{reply_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["status"] == "cancelled"
    assert [p["type"] for p in body["parts"]] == ["text", "tool_call", "tool_call"]
    assert (await _answer_both(api, cid, reply_id)).status_code == 409
    # The next turn's prompt leaves the unanswered calls out (no call without its result).
    await wait_end(api, cid, await ask(api, cid, "Never mind."))
    assert llm.requests[-1]["messages"] == [
        {"role": "user", "content": "Weather and time in Lisbon?"},
        {"role": "user", "content": "Never mind."},
    ]


async def test_after_max_tool_rounds_the_model_may_not_call_tools(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    # MAX_TOOL_ROUNDS is 3 here: three rounds, then the fourth reply is asked with tool_choice
    # "none" (tools still declared: the history holds calls).
    llm.script = [calling((f"call_{i}", "get_weather", "{}")) for i in range(3)]
    cid = await new_conversation(api, tools=[WEATHER], tool_choice="auto")
    reply_id = await ask(api, cid, "Keep checking the weather.")
    for i in range(3):
        events = await wait_end(api, cid, reply_id)
        assert events[-1].event == "message.requires_action", events[-1]
        answered = await api.post(
            f"/conversations/{cid}/messages/{reply_id}/tool_results",
            json={"results": [{"tool_call_id": f"call_{i}", "output": "rain", "is_error": i == 0}]},
        )
        assert answered.status_code == 201, answered.text
        reply_id = answered.json()["reply_message_id"]
    assert (await wait_end(api, cid, reply_id))[-1].event == "message.completed"
    choices = [r.get("tool_choice") for r in llm.requests]
    assert choices == ["auto", "auto", "auto", "none"]
    assert all(r["tools"][0]["function"]["name"] == "get_weather" for r in llm.requests)
    assert llm.requests[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_0",
        "content": "Error: rain",
    }
    assert (await _message(api, cid, reply_id))["context"]["tool_rounds"] == 3


async def test_tools_of_one_message_and_files_as_image_parts(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    cid = await new_conversation(api)
    image = "https://example.com/cat.png"
    posted = await api.post(
        f"/conversations/{cid}/messages",
        json={
            "parts": [
                {"type": "text", "text": "What is this?"},
                {"type": "file", "url": image, "mime_type": "image/png", "name": "cat.png"},
            ],
            "tools": [WEATHER],
            "tool_choice": "get_weather",
        },
    )
    assert posted.status_code == 201, posted.text
    assert posted.json()["content"] == "What is this?"
    await wait_end(api, cid, posted.json()["reply_message_id"])
    request = llm.requests[-1]
    assert request["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        }
    ]
    assert request["tools"][0]["function"]["name"] == "get_weather"
    assert request["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    # The next turn has no tools of its own, nor has the conversation: none are sent.
    await wait_end(api, cid, await ask(api, cid, "Thanks"))
    assert "tools" not in llm.requests[-1]

    # A file the provider cannot take fails the reply with a readable error.
    zipped = await api.post(
        f"/conversations/{cid}/messages",
        json={
            "parts": [
                {"type": "file", "url": "https://example.com/a.zip", "mime_type": "application/zip"}
            ]
        },
    )
    assert zipped.status_code == 201
    events = await wait_end(api, cid, zipped.json()["reply_message_id"])
    assert events[-1].event == "message.failed"
    assert events[-1].data["message"]["error"] == (
        "The AI provider (openai) cannot take files of type application/zip."
    )


async def test_a_plain_user_cannot_forge_tool_or_assistant_parts(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    cid = await new_conversation(api)
    url = f"/conversations/{cid}/messages"
    call = {"type": "tool_call", "id": "call_x", "name": "get_weather", "arguments": "{}"}
    result = {"type": "tool_result", "tool_call_id": "call_x", "output": "sunny"}
    cases: list[tuple[dict[str, Any], int]] = [
        ({"parts": [call]}, 422),
        ({"parts": [result]}, 422),
        ({"parts": [{"type": "reasoning", "text": "I think"}]}, 422),
        ({"role": "assistant", "parts": [call]}, 403),
        ({"role": "tool", "parts": [result]}, 403),
        ({"content": "x", "parts": [{"type": "text", "text": "y"}]}, 422),
        ({"parts": [{"type": "file", "url": "data:image/png;base64," + "A" * 20_000}]}, 422),
        ({"parts": [{"type": "file", "url": "file:///etc/passwd"}]}, 422),
        ({"parts": [{"type": "file", "url": "http://example.com/a.png"}]}, 422),  # https only
        # Hosts the provider would be led to fetch inside its own network, however written,
        # and credentials it would be handed.
        *(
            ({"parts": [{"type": "file", "url": f"https://{host}/a.png"}]}, 422)
            for host in (
                "localhost",
                "api.localhost.",
                "127.0.0.1",
                "2130706433",  # 127.0.0.1
                "0x7f.1",
                "169.254.169.254",  # cloud metadata
                "10.1.2.3",
                "[::1]",
                "[fe80::1%25eth0]",
                "[::ffff:10.0.0.1]",
                "\uff11\uff12\uff17.0.0.1",  # fullwidth digits
                "%31%32%37.0.0.1",
                "0x7f.0x.0x.0x1",  # (an empty hex part is 0 to WHATWG parsers: Node, browsers)
                "0x",  # 0.0.0.0
                "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
                "[2002:a00:1::]",  # 6to4 of 10.0.0.1
                "ip6-localhost",
                "metadata.google.internal",
                "example.123",  # (ends in a number that is no address: invalid)
                "user:secret@example.com",
                "example.com\\@10.0.0.1",
                "",
            )
        ),
        ({"parts": [{"type": "file", "url": "data:image/png;base64,not base64!"}]}, 422),
        ({"parts": [{"type": "file", "url": "data:no-comma"}]}, 422),
        (
            {
                "parts": [
                    {"type": "file", "url": "data:image/png;base64,AAAA", "mime_type": "text/x"}
                ]
            },
            422,
        ),
        ({"content": "x", "tool_choice": "required"}, 422),  # (no tools to call)
        ({"parts": [{"type": "text", "text": "x"}] * (settings.MAX_PARTS + 1)}, 422),
        ({"content": "x", "tools": [WEATHER, WEATHER]}, 422),
        ({"content": "x", "tools": [WEATHER], "tool_choice": "get_time"}, 422),
        ({"content": "x", "tools": [{"name": "bad name"}]}, 422),
    ]
    for body, status in cases:
        response = await api.post(url, json={**body, "respond": False})
        assert response.status_code == status, (body, response.text)
    assert (await api.get(url)).json()["items"] == []
    for conversation in (
        {"model": "gpt\n4"},
        {"model": "gpt-4\u0000"},
        {"tool_choice": "required"},
    ):
        assert (await api.post("/conversations", json=conversation)).status_code == 422
    inline = {"type": "file", "url": "data:image/png;base64,iVBORw0KGgo=", "mime_type": "image/png"}
    public = [
        {"type": "file", "url": f"https://{host}/a.png"}
        for host in (
            "example.com",
            "b\u00fccher.example:8443",
            "\u05d0\u05ea\u05e82.example",  # (right to left, ending in a digit: IDNA 2008)
            "1.1.1.1",
            "134744072",  # 8.8.8.8
            "[2606:4700::1111]",
        )
    ]
    posted = await api.post(url, json={"parts": [inline, *public], "respond": False})
    assert posted.status_code == 201, posted.text
    assert [p["url"] for p in posted.json()["parts"][1:]] == [p["url"] for p in public]
    assert (await api.delete(f"{url}/{posted.json()['id']}")).status_code == 204
    too_many = [{**WEATHER, "name": f"t{i}"} for i in range(settings.MAX_TOOLS + 1)]
    assert (await api.post("/conversations", json={"tools": too_many})).status_code == 422
    huge = {**WEATHER, "description": "x" * settings.MAX_TOOL_SCHEMA_BYTES}
    assert (await api.post("/conversations", json={"tools": [huge]})).status_code == 422
    big_int = {**WEATHER, "parameters": {"type": "object", "maximum": 2**70}}
    assert (await api.put(f"/conversations/{cid}", json={"tools": [big_int]})).status_code == 422
    # Parameters that are not a JSON Schema (a provider would refuse every reply), said where.
    for parameters, where in [
        ({"type": "object", "properties": {"city": 5}}, ["properties", "city"]),
        ({"type": "object", "properties": [1, 2]}, ["properties"]),
        ({"type": "object", "required": "city"}, ["required"]),
    ]:
        bad = await api.post(
            "/conversations", json={"tools": [{**WEATHER, "parameters": parameters}]}
        )
        assert bad.status_code == 422, bad.text
        assert bad.json()["errors"][0]["loc"] == ["body", "tools", "0", "parameters", *where]
    # A service may write the assistant's and tools' side (an import).
    service = {**auth(settings, "svc", ["service"]), "X-On-Behalf-Of": "alice"}
    imported = await api.post(
        url, json={"role": "assistant", "parts": [{"type": "reasoning", "text": "hm"}, call]},
        headers=service,
    )  # fmt: skip
    assert imported.status_code == 201, imported.text
    assert imported.json()["content"] == ""
    for arguments in ("[1, 2]", '"text"', "not json"):  # a call's arguments: a JSON object
        forged_call = {**call, "id": "call_y", "arguments": arguments}
        refused = await api.post(
            url, json={"role": "assistant", "parts": [forged_call]}, headers=service
        )
        assert refused.status_code == 422, (arguments, refused.text)


async def test_text_messages_look_as_before_plus_parts(api: httpx.AsyncClient) -> None:
    cid = await new_conversation(api)
    posted = await api.post(
        f"/conversations/{cid}/messages", json={"content": "plain", "respond": False}
    )
    body = posted.json()
    assert body["content"] == "plain"
    assert body["parts"] == [{"type": "text", "text": "plain"}]
    before = {
        "id", "conversation_id", "parent_id", "role", "content", "status", "metadata",
        "created_at", "updated_at", "reply_message_id", "usage", "error", "version", "context",
        "sibling_count", "sibling_index",
    }  # fmt: skip
    assert set(body) == before | {"parts"}
    edited = await api.put(f"/conversations/{cid}/messages/{body['id']}", json={"content": "new"})
    assert edited.json()["parts"] == [{"type": "text", "text": "new"}]
    conv = (await api.get(f"/conversations/{cid}")).json()
    assert (conv["tools"], conv["tool_choice"]) == (None, None)


def test_tool_call_deltas_split_arguments() -> None:
    deltas = tool_call_deltas([("c", "f", orjson.dumps({"a": 1}).decode())], pieces=3)
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"a":1}'


async def test_tools_changed_later_keep_their_defaults(api: httpx.AsyncClient) -> None:
    cid = await new_conversation(api)
    changed = await api.put(
        f"/conversations/{cid}", json={"tools": [{"name": "ping"}], "tool_choice": "ping"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["tools"] == [
        {"name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}}
    ]
    # Tools taken away while tool_choice still names one of them: refused, as at creation.
    dangling = await api.put(f"/conversations/{cid}", json={"tools": None})
    assert dangling.status_code == 422, dangling.text
    other = await api.put(f"/conversations/{cid}", json={"tools": [{"name": "pong"}]})
    assert other.status_code == 422, other.text
    cleared = await api.put(f"/conversations/{cid}", json={"tools": None, "tool_choice": None})
    assert (cleared.json()["tools"], cleared.json()["tool_choice"]) == (None, None)


async def test_a_messages_tool_choice_picks_among_the_conversations_tools(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    """A user message that sets only `tool_choice` keeps the conversation's tools for its turn
    (it chooses among them); `required` and a tool's name are checked against them."""
    created = await api.post("/conversations", json={"tools": [WEATHER, TIME]})
    cid = created.json()["id"]
    for choice, sent in [
        ("get_time", {"type": "function", "function": {"name": "get_time"}}),
        ("required", "required"),
        ("auto", "auto"),
    ]:
        posted = await api.post(
            f"/conversations/{cid}/messages", json={"content": "now?", "tool_choice": choice}
        )
        assert posted.status_code == 201, posted.text
        await wait_end(api, cid, posted.json()["reply_message_id"])
        request = llm.requests[-1]
        assert [t["function"]["name"] for t in request["tools"]] == ["get_weather", "get_time"]
        assert request["tool_choice"] == sent
    unknown = await api.post(
        f"/conversations/{cid}/messages", json={"content": "now?", "tool_choice": "get_mood"}
    )
    assert unknown.status_code == 422, unknown.text
    # Set on the conversation: `required` with the tools it has.
    required = await api.put(f"/conversations/{cid}", json={"tool_choice": "required"})
    assert required.status_code == 200, required.text
    assert required.json()["tool_choice"] == "required"
    bare = (await api.post("/conversations", json={})).json()["id"]
    for choice in ("required", "get_time"):
        refused = await api.post(
            f"/conversations/{bare}/messages", json={"content": "now?", "tool_choice": choice}
        )
        assert refused.status_code == 422, refused.text
        assert (
            await api.put(f"/conversations/{bare}", json={"tool_choice": choice})
        ).status_code == 422


async def test_an_admin_may_answer_a_users_tool_calls(
    api: httpx.AsyncClient, llm: FakeLLM, settings: Settings
) -> None:
    cid, reply_id = await _waiting_reply(api, llm)
    answered = await _answer_both(api, cid, reply_id, auth(settings, "root", ["admin"]))
    assert answered.status_code == 201, answered.text
    final = await wait_end(api, cid, answered.json()["reply_message_id"])
    assert final[-1].event == "message.completed"
    conv = (await api.get(f"/conversations/{cid}")).json()
    assert (conv["user_id"], conv["active_leaf_id"]) == ("alice", final[-1].data["message_id"])


async def test_tokens_that_pile_up_go_out_as_one_delta_per_part(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    """A model faster than the store (no delay between 600 chunks): the tokens that arrive while
    a delta is written go out together, as one delta per part, and every part's deltas still
    add up to exactly its text."""
    thinking = [{"reasoning_content": f"r{i} "} for i in range(200)]
    text = [{"content": f"t{i} "} for i in range(200)]
    arguments = '{"city": "' + "L" * 400 + '"}'
    call = tool_call_deltas([("call_z", "get_weather", arguments)], pieces=200)
    llm.script = [Reply([], deltas=thinking + text + call, finish="tool_calls")]
    cid = await new_conversation(api, tools=[WEATHER])
    reply_id = await ask(api, cid, "Think, write, then call.")
    events = await wait_end(api, cid, reply_id)
    reply = events[-1].data["message"]
    assert [p["type"] for p in reply["parts"]] == ["reasoning", "text", "tool_call"]
    assert reply["parts"][2]["arguments"] == arguments
    assert_deltas_make_the_parts(events, reply)
    sent = sum(1 for e in events if e.event == "message.delta" and e.data["message_id"] == reply_id)
    assert sent < len(thinking) + len(text) + len(call)
