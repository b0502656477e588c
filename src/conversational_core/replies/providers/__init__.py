"""LLM providers behind one interface; :func:`build_provider` picks one from the settings."""

from __future__ import annotations

from conversational_core.replies.providers.base import Provider
from conversational_core.settings import Settings


def build_provider(settings: Settings) -> Provider:
    kind = settings.LLM_PROVIDER or "dev"
    if kind == "openai":
        from conversational_core.replies.providers.openai import OpenAIProvider

        return OpenAIProvider(
            api_key=settings.LLM_API_KEY,
            base_url=settings.LLM_BASE_URL,
            timeout=settings.LLM_TIMEOUT_SECONDS,
            max_tokens_param=settings.LLM_MAX_TOKENS_PARAM,
            # every reply of the worker, and its titles, on a connection kept open
            max_connections=settings.WORKER_CONCURRENCY + 16,
        )
    if kind == "anthropic":
        from conversational_core.replies.providers.anthropic import AnthropicProvider

        return AnthropicProvider(
            api_key=settings.LLM_API_KEY,
            base_url=settings.LLM_BASE_URL,
            timeout=settings.LLM_TIMEOUT_SECONDS,
            reasoning_budget=settings.LLM_REASONING_BUDGET_TOKENS,
            max_connections=settings.WORKER_CONCURRENCY + 16,
        )
    from conversational_core.replies.providers.dev import DevProvider

    return DevProvider(settings.DEV_PROVIDER_DELAY_MS / 1000)
