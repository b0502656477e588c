"""Automatic titles: a conversation created without one is named after its first reply, in a
few words written by the model. A title a user set (or cleared) is never replaced: the title is
written only while `title_source` is still null, by a compare-and-set on the version."""

from __future__ import annotations

from loguru import logger

from conversational_core.replies.providers.base import Provider, ProviderError
from conversational_core.settings import Settings
from conversational_core.storage.base import Store
from conversational_core.storage.errors import NotFound, StaleVersion
from conversational_core.storage.models import Conversation, Message, Role, utcnow

TITLE_MAX_CHARS = 80
_FIRST_MESSAGE_CHARS = 2000  # what the model is shown of the first message
_QUOTES = "\"'“”‘’«»`*#"


def clean_title(text: str) -> str | None:
    """The title in a model's answer: its first line, without quotes, markdown or a final
    period, at most TITLE_MAX_CHARS; None when nothing is left."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if line.lower().startswith("title:"):
        line = line[6:].strip()
    line = line.strip(_QUOTES).strip().rstrip(".").strip(_QUOTES).strip()
    if len(line) > TITLE_MAX_CHARS:
        line = line[: TITLE_MAX_CHARS - 1].rstrip() + "…"
    return line or None


class TitleWriter:
    def __init__(self, store: Store, provider: Provider, settings: Settings) -> None:
        self._store = store
        self._provider = provider
        self._settings = settings

    async def write(self, conversation: Conversation, history: list[Message]) -> None:
        """Name `conversation` from the first user message of `history` (the branch before
        the reply that just completed, newest first). Failures only cost the title."""
        first = next((m for m in reversed(history) if m.role is Role.USER and m.content), None)
        if first is None:
            return
        model = conversation.model or self._settings.llm_model
        try:
            answer = await self._provider.title(first.content[:_FIRST_MESSAGE_CHARS], model)
        except ProviderError as exc:
            logger.info("no title for {}: {} (status {})", conversation.id, exc.message, exc.status)
            return
        title = clean_title(answer)
        if title is None:
            return
        for _ in range(5):
            try:
                current = await self._store.get_conversation(conversation.id, None)
                if current.title_source is not None:
                    return  # a user set (or cleared) one meanwhile
                await self._store.update_conversation(
                    conversation.id,
                    None,
                    {"title": title, "title_source": "auto"},
                    current.version,
                    utcnow(),
                )
                return
            except StaleVersion:
                continue  # changed meanwhile: look again
            except NotFound:
                return
