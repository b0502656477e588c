"""The development provider's tool round trip (the README's walk-through): with no model
configured, a message that names a declared tool gets a call of it, and the results an answer."""

from __future__ import annotations

import httpx
import pytest

from conversational_core.settings import Settings
from tests.conftest import make_settings
from tests.fixtures.replies import ask, new_conversation, wait_end
from tests.test_api_tools import WEATHER, assert_deltas_make_the_parts


@pytest.fixture
def settings() -> Settings:
    return make_settings(LLM_PROVIDER="dev", DEV_PROVIDER_DELAY_MS=0)


async def test_the_dev_provider_calls_the_tool_a_message_names(api: httpx.AsyncClient) -> None:
    cid = await new_conversation(api, tools=[WEATHER])
    reply_id = await ask(api, cid, "What does get_weather say for Lisbon?")
    events = await wait_end(api, cid, reply_id)
    assert events[-1].event == "message.requires_action"
    waiting = events[-1].data["message"]
    assert_deltas_make_the_parts(events, waiting)
    [call] = [p for p in waiting["parts"] if p["type"] == "tool_call"]
    assert call["name"] == "get_weather"
    assert call["arguments"] == '{"city":"What does get_weather say for Lisbon?"}'
    answered = await api.post(
        f"/conversations/{cid}/messages/{reply_id}/tool_results",
        json={"results": [{"tool_call_id": call["id"], "output": "18 C, sunny"}]},
    )
    assert answered.status_code == 201, answered.text
    final = (await wait_end(api, cid, answered.json()["reply_message_id"]))[-1].data["message"]
    assert final["status"] == "completed"
    assert f"The tools answered: {call['id']}: 18 C, sunny." in final["content"]
    # A message naming no tool gets a plain answer.
    plain = (await wait_end(api, cid, await ask(api, cid, "Thanks!")))[-1]
    assert plain.event == "message.completed"
