"""Prompt building with parts: a tool call is never sent without its result (nor a result
without its call) when history is cut by the token budget or a call was never answered, and
files count in the budget."""

from __future__ import annotations

from typing import Any

from conversational_core.replies.context import FILE_TOKENS, build_prompt
from conversational_core.storage.models import Message, MessageStatus, Part, Role
from tests.conftest import make_settings
from tests.test_store_contract import conversation, message

CALL: Part = {
    "type": "tool_call",
    "id": "c1",
    "name": "f",
    "arguments": '{"q": "' + "y" * 80 + '"}',
}
RESULT: Part = {"type": "tool_result", "tool_call_id": "c1", "output": "x" * 700, "is_error": False}


def _history() -> list[Message]:
    """user, assistant calling f, its result (long), the assistant's answer, a new question:
    newest first, as the worker reads it."""
    cid = "c"
    ask = message(cid, "What does f say?")
    call = message(cid, "", Role.ASSISTANT).with_parts([CALL])
    result = message(cid, "", Role.TOOL).with_parts([RESULT])
    answer = message(cid, "f says x.", Role.ASSISTANT)
    again = message(cid, "Thanks, and now?")
    return [again, answer, result, call, ask]


def _roles(prompt: Any) -> list[str]:
    return [m.role for m in prompt.request.messages]


def test_a_call_and_its_result_are_kept_or_dropped_together() -> None:
    conv = conversation()
    roomy = make_settings(LLM_CONTEXT_TOKENS=4096, LLM_MAX_OUTPUT_TOKENS=1024)
    assert _roles(build_prompt(roomy, conv, _history())) == [
        "user", "assistant", "tool", "assistant", "user"
    ]  # fmt: skip
    # Room for the newest three (~220 tokens, the result ~204 of it) but not for the call
    # before them (~30 more): the result goes too.
    tight = make_settings(LLM_CONTEXT_TOKENS=256 + 230, LLM_MAX_OUTPUT_TOKENS=256)
    prompt = build_prompt(tight, conv, _history())
    assert _roles(prompt) == ["assistant", "user"]
    assert prompt.info["history_truncated"] is True


def test_unanswered_calls_are_left_out() -> None:
    cid = "c"
    waiting = message(cid, "", Role.ASSISTANT).with_parts(
        [{"type": "text", "text": "Let me see."}, CALL], status=MessageStatus.COMPLETED
    )
    history = [message(cid, "Never mind"), waiting, message(cid, "Run f")]
    sent = build_prompt(make_settings(), conversation(), history).request.messages
    assert [(m.role, m.parts) for m in sent] == [
        ("user", [{"type": "text", "text": "Run f"}]),
        ("assistant", [{"type": "text", "text": "Let me see."}]),
        ("user", [{"type": "text", "text": "Never mind"}]),
    ]


def test_files_count_in_the_budget() -> None:
    cid = "c"
    picture = message(cid, "See").with_parts(
        [{"type": "text", "text": "See"}, {"type": "file", "url": "https://x/a.png"}]
    )
    prompt = build_prompt(make_settings(), conversation(), [picture])
    assert prompt.info["estimated_prompt_tokens"] >= FILE_TOKENS
