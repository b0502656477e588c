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
from conversational_core.storage.models import Conversation, Message, MessageStatus, Role

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


def _as_chat(message: Message) -> ChatMessage | None:
    if not message.content:
        return None
    if message.role is Role.ASSISTANT:
        if message.status is not MessageStatus.COMPLETED:
            return None  # failed, cancelled or unfinished replies are not history
        return ChatMessage("assistant", message.content)
    if message.role is Role.TOOL:
        return ChatMessage("user", f"[tool output]\n{message.content}")
    return ChatMessage(message.role.value, message.content)


def build_prompt(
    settings: Settings,
    conversation: Conversation,
    history: list[Message],
    requested: dict[str, Any] | None = None,
) -> Prompt:
    """`history` is the reply's branch before it, newest first. `requested`: settings asked
    for this reply only (a regenerate's model, temperature, max_tokens)."""
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
    for message in history:
        chat = _as_chat(message)
        if chat is None:
            continue
        considered += 1
        cost = estimate_tokens(chat.content)
        if used + cost > budget:
            break
        chosen.append(chat)
        used += cost
    if not chosen and considered:
        raise PromptTooLong
    chosen.reverse()
    messages = ([ChatMessage("system", system)] if system else []) + chosen
    request = CompletionRequest(
        model=model, messages=messages, temperature=temperature, max_tokens=max_output
    )
    info = {
        "model": model,
        "messages_sent": len(messages),
        "history_messages": len(chosen),
        "history_truncated": len(chosen) < considered,
        "estimated_prompt_tokens": used + (estimate_tokens(system) if system else 0),
    }
    return Prompt(request, info)
