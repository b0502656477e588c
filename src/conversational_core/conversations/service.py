"""Rules of the conversation resource: who may see and change what, and the limits."""

from __future__ import annotations

from typing import Any

from conversational_core.auth.dependencies import Principal
from conversational_core.conversations.schemas import ConversationCreate, ConversationUpdate
from conversational_core.errors import BadRequest, Unprocessable
from conversational_core.observability import metrics
from conversational_core.settings import Settings
from conversational_core.storage.base import (
    Idempotency,
    Store,
    decode_conversation_cursor,
)
from conversational_core.storage.models import Conversation, Page, new_id, utcnow


def read_owner(principal: Principal) -> str | None:
    """The owner a read must match: admins may read any conversation."""
    return None if principal.is_admin else principal.user_id


def write_owner(principal: Principal) -> str:
    """The owner a change must match: a conversation is changed only by its user (or a service
    acting for that user)."""
    return principal.user_id


class ConversationService:
    def __init__(self, store: Store, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    def _check_system_prompt(self, prompt: str | None) -> None:
        if prompt is not None and len(prompt) > self._settings.MAX_SYSTEM_PROMPT_CHARS:
            raise Unprocessable(
                "The request has invalid fields.",
                errors=[
                    {
                        "loc": ["body", "system_prompt"],
                        "type": "string_too_long",
                        "msg": f"at most {self._settings.MAX_SYSTEM_PROMPT_CHARS} characters",
                    }
                ],
            )

    async def create(
        self, principal: Principal, body: ConversationCreate, idempotency: Idempotency | None
    ) -> tuple[Conversation, bool]:
        self._check_system_prompt(body.system_prompt)
        now = utcnow()
        conversation = Conversation(
            id=new_id(),
            user_id=principal.user_id,
            title=body.title,
            metadata=dict(body.metadata),
            system_prompt=body.system_prompt,
            model=body.model,
            temperature=body.temperature,
            max_tokens=body.max_tokens,
            created_at=now,
            updated_at=now,
        )
        created, replayed = await self._store.create_conversation(conversation, idempotency)
        if not replayed:
            metrics.CONVERSATIONS.inc()
        return created, replayed

    async def get(self, principal: Principal, conversation_id: str) -> Conversation:
        return await self._store.get_conversation(conversation_id, read_owner(principal))

    async def list(
        self, principal: Principal, limit: int, cursor: str | None
    ) -> Page[Conversation]:
        after = None
        if cursor is not None:
            try:
                after = decode_conversation_cursor(cursor)
            except ValueError:
                raise BadRequest("Invalid cursor.") from None
        return await self._store.list_conversations(principal.user_id, limit, after)

    async def update(
        self,
        principal: Principal,
        conversation_id: str,
        body: ConversationUpdate,
        expected_version: int | None,
    ) -> Conversation:
        changes: dict[str, Any] = body.model_dump(exclude_unset=True)
        if "metadata" in changes and changes["metadata"] is None:
            changes["metadata"] = {}
        self._check_system_prompt(changes.get("system_prompt"))
        return await self._store.update_conversation(
            conversation_id, write_owner(principal), changes, expected_version, utcnow()
        )

    async def delete(self, principal: Principal, conversation_id: str) -> Conversation:
        return await self._store.delete_conversation(conversation_id, read_owner(principal))
