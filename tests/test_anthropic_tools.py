"""Tools, thinking and images with a model that speaks Anthropic's real Messages streaming
protocol (testkit/fake_anthropic.py, through the official SDK): a tool round trip whose second
request carries the thinking block with its signature, the tool_use and the tool_result paired by
id; images by URL; the per-part delta invariant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from testkit.fake_anthropic import Block, FakeAnthropic, FakeAnthropicServer

from conversational_core.app import create_app
from conversational_core.settings import Settings
from conversational_core.storage.factory import Backend
from tests.conftest import make_settings
from tests.fixtures.app import auth
from tests.fixtures.live import collect_until, serve
from tests.fixtures.replies import ask, new_conversation, wait_end
from tests.test_api_tools import WEATHER, assert_deltas_make_the_parts


@pytest.fixture
async def claude() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropicServer(FakeAnthropic()) as fake:
        yield fake


@pytest.fixture
def settings(claude: FakeAnthropic) -> Settings:
    return make_settings(
        LLM_PROVIDER="anthropic",
        LLM_BASE_URL=claude.url,
        LLM_API_KEY="test-key",
        LLM_MODEL="claude-fake",
        LLM_REASONING_BUDGET_TOKENS=2048,
        LLM_MAX_OUTPUT_TOKENS=4096,
        JOB_LEASE_SECONDS=2,
    )


async def test_a_tool_round_trip_sends_thinking_back_with_its_signature(
    api: httpx.AsyncClient, claude: FakeAnthropic
) -> None:
    claude.script = [
        [
            Block("thinking", ["The user wants ", "the weather."], signature="sig-123"),
            Block("text", ["Checking", "."]),
            Block("tool_use", ['{"city": ', '"Lisbon"}'], id="toolu_01", name="get_weather"),
        ],
        [Block("text", ["It is ", "18 C."])],
        [Block("tool_use", ["{}"], id="toolu_02", name="get_weather")],
    ]
    cid = await new_conversation(api, tools=[WEATHER], tool_choice="auto")
    image = "https://example.com/sky.jpg"
    posted = await api.post(
        f"/conversations/{cid}/messages",
        json={
            "parts": [
                {"type": "text", "text": "Weather in Lisbon?"},
                {"type": "file", "url": image},
            ]
        },
    )
    assert posted.status_code == 201, posted.text
    reply_id = posted.json()["reply_message_id"]
    events = await wait_end(api, cid, reply_id)
    assert events[-1].event == "message.requires_action"
    waiting = events[-1].data["message"]
    assert waiting["content"] == "Checking."
    assert waiting["parts"] == [
        {"type": "reasoning", "text": "The user wants the weather.",
         "provider_data": {"provider": "anthropic", "signature": "sig-123"}},
        {"type": "text", "text": "Checking."},
        {"type": "tool_call", "id": "toolu_01", "name": "get_weather",
         "arguments": '{"city": "Lisbon"}'},
    ]  # fmt: skip
    assert_deltas_make_the_parts(events, waiting)
    first = claude.requests[0]
    assert first["tools"] == [{"name": "get_weather", "description": WEATHER["description"],
                               "input_schema": WEATHER["parameters"]}]  # fmt: skip
    assert first["tool_choice"] == {"type": "auto"}
    assert first["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert first["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Lisbon?"},
                                     {"type": "image", "source": {"type": "url", "url": image}}]},
    ]  # fmt: skip

    answered = await api.post(
        f"/conversations/{cid}/messages/{reply_id}/tool_results",
        json={"results": [{"tool_call_id": "toolu_01", "output": "18 C", "is_error": False}]},
    )
    assert answered.status_code == 201, answered.text
    final = await wait_end(api, cid, answered.json()["reply_message_id"])
    assert final[-1].data["message"]["content"] == "It is 18 C."
    second: list[dict[str, Any]] = claude.requests[1]["messages"]
    assert second[1:] == [
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "The user wants the weather.",
             "signature": "sig-123"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
             "input": {"city": "Lisbon"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C",
             "is_error": False},
        ]},
    ]  # fmt: skip
    # A turn that forces a tool is asked without thinking (Anthropic refuses the pair).
    forced = await api.post(
        f"/conversations/{cid}/messages", json={"content": "Again?", "tool_choice": "required"}
    )
    assert forced.status_code == 201, forced.text
    await wait_end(api, cid, forced.json()["reply_message_id"])
    assert claude.requests[2]["tool_choice"] == {"type": "any"}
    assert "thinking" not in claude.requests[2]


async def test_redacted_thinking_is_kept_and_sent_back(
    api: httpx.AsyncClient, claude: FakeAnthropic
) -> None:
    """Thinking the provider sends encrypted (`redacted_thinking`) has no text to show, but
    must go back with its turn after tool use (Anthropic refuses the turn without it)."""
    claude.script = [
        [
            Block("redacted_thinking", [], signature="EncryptedBlob=="),
            Block("tool_use", ['{"city": "Lisbon"}'], id="toolu_09", name="get_weather"),
        ],
        [Block("text", ["Sunny."])],
    ]
    cid = await new_conversation(api, tools=[WEATHER])
    reply_id = await ask(api, cid, "Weather?")
    events = await wait_end(api, cid, reply_id)
    assert events[-1].data["message"]["parts"][0] == {
        "type": "reasoning",
        "text": "",
        "provider_data": {"provider": "anthropic", "redacted": "EncryptedBlob=="},
    }
    answered = await api.post(
        f"/conversations/{cid}/messages/{reply_id}/tool_results",
        json={"results": [{"tool_call_id": "toolu_09", "output": "sunny"}]},
    )
    await wait_end(api, cid, answered.json()["reply_message_id"])
    assistant = claude.requests[1]["messages"][1]
    assert assistant["content"][0] == {"type": "redacted_thinking", "data": "EncryptedBlob=="}
    assert assistant["content"][1]["type"] == "tool_use"


async def test_titles_are_written_from_anthropic_text(
    backend: Backend, claude: FakeAnthropic, settings: Settings
) -> None:
    titled = settings.model_copy(update={"AUTO_TITLE": True})
    claude.script = [[Block("text", ["Sure."])], [Block("text", ["Lisbon ", "weather"])]]
    async with serve(create_app(titled, backend=backend)) as base:
        headers = auth(titled, "alice")
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=20) as api:
            cid = await new_conversation(api)
            posted = await api.post(f"/conversations/{cid}/messages", json={"content": "Hi"})
            assert posted.status_code == 201

            def named(event: Any) -> bool:
                conv = event.data.get("conversation") or {}
                return event.event == "conversation.updated" and conv.get("title") is not None

            events = await collect_until(api, f"/conversations/{cid}/events", named)
            assert events[-1].data["conversation"]["title"] == "Lisbon weather"
            assert events[-1].data["conversation"]["title_source"] == "auto"
