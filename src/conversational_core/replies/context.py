"""Prompt building: the conversation's system prompt plus the newest history that fits.

Tokens are estimated offline from the text (nothing is downloaded at run time, and the estimate
is the same for every provider): about four characters per token for English prose, counted
conservatively (3.5) so that the prompt stays inside the model's window, plus a few tokens of
framing per message. A provider's exact tokenizer would need its vocabulary files, which we
cannot fetch at run time; the budget leaves room for the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from conversational_core.replies.providers.base import ChatMessage, CompletionRequest
from conversational_core.settings import Settings
from conversational_core.storage.models import (
    FILE,
    TOOL_CALL,
    TOOL_RESULT,
    Conversation,
    Message,
    MessageStatus,
    Part,
    Role,
    content_of,
)

_CHARS_PER_TOKEN = 3.5
_TOKENS_PER_MESSAGE = 4


def estimate_text_tokens(text: str) -> int:
    return math.ceil(len(text) / _CHARS_PER_TOKEN)


def estimate_tokens(text: str) -> int:
    """A message's cost in a prompt: its text plus the framing of a message."""
    return estimate_text_tokens(text) + _TOKENS_PER_MESSAGE


class PromptTooLong(Exception):
    """Even the newest message does not fit the model's context window."""


@dataclass(frozen=True, slots=True)
class Prompt:
    request: CompletionRequest
    info: dict[str, Any]  # recorded on the reply: what was sent


# What a file (an image) costs in a prompt: providers count images by their size, which we do
# not know; this is about what a large image costs at OpenAI and Anthropic.
FILE_TOKENS = 1000


def part_tokens(part: Part) -> int:
    kind = part["type"]
    if kind == FILE:
        return FILE_TOKENS
    if kind == TOOL_CALL:
        return estimate_text_tokens(part["name"] + part["arguments"])
    if kind == TOOL_RESULT:
        return estimate_text_tokens(part["output"])
    return estimate_text_tokens(part["text"])


def _as_chat(message: Message) -> ChatMessage | None:
    if message.role is Role.ASSISTANT and message.status is not MessageStatus.COMPLETED:
        return None  # failed, cancelled, unfinished or unanswered replies are not history
    parts = message.parts or []
    if not parts:
        return None
    return ChatMessage(message.role.value, message.content, parts)


def _cost(chat: ChatMessage) -> int:
    return sum(part_tokens(p) for p in chat.all_parts()) + _TOKENS_PER_MESSAGE


def _paired(chosen: list[ChatMessage]) -> list[ChatMessage]:
    """The prompt with every tool call next to its result: an assistant message's calls are
    kept only when the tool message right after it answers them, and results only when they
    answer a call right before them (a reply that was never answered, or history cut between
    the two, loses them; a message left with no part at all goes)."""
    out: list[ChatMessage] = []
    for i, chat in enumerate(chosen):
        parts = chat.all_parts()
        if chat.role == "assistant":
            after = chosen[i + 1] if i + 1 < len(chosen) else None
            answered = (
                {p["tool_call_id"] for p in after.all_parts() if p["type"] == TOOL_RESULT}
                if after is not None and after.role == "tool"
                else set()
            )
            parts = [p for p in parts if p["type"] != TOOL_CALL or p["id"] in answered]
        elif chat.role == "tool":
            before = out[-1] if out and out[-1].role == "assistant" else None
            calls = (
                {p["id"] for p in before.all_parts() if p["type"] == TOOL_CALL} if before else set()
            )
            parts = [p for p in parts if p["type"] != TOOL_RESULT or p["tool_call_id"] in calls]
        if parts:
            out.append(ChatMessage(chat.role, content_of(parts), parts))
    return out


def _turn_tools(
    conversation: Conversation, history: list[Message]
) -> tuple[list[dict[str, Any]] | None, str | None, int]:
    """The tools of the reply's turn (its user message's, else the conversation's), their
    choice (the user message's, else - with the conversation's tools - the conversation's),
    and how many tool rounds in a row came before the reply."""
    rounds = 0
    tools, choice = conversation.tools or None, conversation.tool_choice
    for message in history:  # newest first
        if message.role is Role.TOOL:
            rounds += 1
        elif message.role is Role.USER:
            turn = message.context or {}
            if "tools" in turn:
                tools, choice = turn["tools"] or None, turn.get("tool_choice")
            elif "tool_choice" in turn:
                choice = turn["tool_choice"]
            break
    if choice not in (None, "auto", "none", "required") and not any(
        tool["name"] == choice for tool in tools or ()
    ):
        choice = None  # a tool the conversation no longer declares (changed since): auto
    return tools, choice, rounds


def build_prompt(
    settings: Settings,
    conversation: Conversation,
    history: list[Message],
    requested: dict[str, Any] | None = None,
) -> Prompt:
    """`history` is the reply's branch before it, newest first. `requested`: settings asked
    for this reply only (a regenerate's model, temperature, max_tokens). A tool message and the
    assistant message whose calls it answers are kept or dropped together."""
    requested = requested or {}
    model = requested.get("model") or conversation.model or settings.llm_model
    max_output = (
        requested.get("max_tokens") or conversation.max_tokens or settings.LLM_MAX_OUTPUT_TOKENS
    )
    temperature = requested.get("temperature", conversation.temperature)
    window = settings.context_tokens(model)
    system = conversation.system_prompt
    budget = window - max_output - (estimate_tokens(system) if system else 0)
    chosen: list[ChatMessage] = []
    used = 0
    considered = 0
    held: tuple[ChatMessage, int] | None = None  # a tool message, until its assistant fits
    for message in history:
        chat = _as_chat(message)
        if chat is None:
            continue
        considered += 1
        cost = _cost(chat)
        if chat.role == "tool":
            if held is not None:  # two tool messages in a row: the newer one has no call
                chosen.append(held[0])
                used += held[1]
            held = (chat, cost)
            if used + cost > budget:
                break
            continue
        if held is not None:
            if used + held[1] + cost > budget:
                break  # the results go with their calls, or not at all
            chosen.append(held[0])
            used += held[1]
            held = None
        elif used + cost > budget:
            break
        chosen.append(chat)
        used += cost
    if not chosen and considered:
        raise PromptTooLong
    chosen.reverse()
    chosen = _paired(chosen)
    tools, tool_choice, rounds = _turn_tools(conversation, history)
    if tools and rounds >= settings.MAX_TOOL_ROUNDS:
        # Tools stay declared (the history holds calls, which some providers want declared),
        # but may not be called: the model answers with what it has.
        tool_choice = "none"
    messages = ([ChatMessage("system", system)] if system else []) + chosen
    request = CompletionRequest(
        model=model,
        messages=messages,
        temperature=temperature,
        max_tokens=max_output,
        tools=tools,
        tool_choice=tool_choice if tools else None,
    )
    info: dict[str, Any] = {
        "model": model,
        "messages_sent": len(messages),
        "history_messages": len(chosen),
        "history_truncated": len(chosen) < considered,
        "estimated_prompt_tokens": used + (estimate_tokens(system) if system else 0),
    }
    if tools:
        info["tools_offered"] = len(tools)
        info["tool_rounds"] = rounds
    return Prompt(request, info)
