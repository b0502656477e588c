"""Rules of the conversation resource: who may see and change what, and the limits."""

from __future__ import annotations

import dataclasses
from typing import Any

from conversational_core.auth.dependencies import Principal
from conversational_core.conversations.schemas import (
    ConversationCreate,
    ConversationUpdate,
    ForkRequest,
)
from conversational_core.errors import BadRequest, PreconditionFailed, Unprocessable
from conversational_core.messages.parts import check_tools
from conversational_core.observability import metrics
from conversational_core.settings import Settings
from conversational_core.storage.base import (
    Idempotency,
    Store,
    decode_conversation_cursor,
)
from conversational_core.storage.errors import BranchChanged, UnknownMessage
from conversational_core.storage.models import Conversation, Page, new_id, utcnow

_FORK_TRIES = 3


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
        tools = body.model_dump(include={"tools"})["tools"]
        check_tools(self._settings, tools, body.tool_choice)
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
            title_source="user" if body.title is not None else None,
            on_busy=body.on_busy,
            tools=tools,
            tool_choice=body.tool_choice,
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
        leaf = changes.pop("active_leaf_id", None)  # (null is refused by the schema)
        if "metadata" in changes and changes["metadata"] is None:
            changes["metadata"] = {}
        if "title" in changes:
            changes["title_source"] = "user"  # never replaced by an automatic title
        self._check_system_prompt(changes.get("system_prompt"))
        owner = write_owner(principal)
        if changes.get("tools") is not None:
            # Whole (exclude_unset above would drop a tool's defaulted `parameters`).
            changes["tools"] = [t.model_dump() for t in body.tools or ()]
        if "tools" in changes or "tool_choice" in changes:
            tools, choice = changes.get("tools"), changes.get("tool_choice")
            if "tools" not in changes and choice not in (None, "auto", "none"):
                tools = (await self._store.get_conversation(conversation_id, owner)).tools
            elif "tool_choice" not in changes:
                # New tools, the choice kept: it must not name a tool they no longer have.
                choice = (await self._store.get_conversation(conversation_id, owner)).tool_choice
            check_tools(self._settings, tools, choice)
        if leaf is None and not changes:
            # Nothing to change (`{}`): the conversation as it is, its version kept (a change
            # would make every other client's If-Match fail for nothing).
            current = await self._store.get_conversation(conversation_id, owner)
            if expected_version is not None and current.version != expected_version:
                raise PreconditionFailed()
            return current
        if leaf is None:
            return await self._store.update_conversation(
                conversation_id, owner, changes, expected_version, utcnow()
            )
        # The switch first: it is what can fail on the request's own account (a leaf that is
        # not a message of the conversation: 422), and then nothing has changed. The settings
        # change is based on the version the switch produced (the settings were checked above).
        switched = await self._store.set_active_leaf(
            conversation_id, owner, leaf, expected_version, utcnow()
        )
        if not changes:
            return switched
        return await self._store.update_conversation(
            conversation_id,
            owner,
            changes,
            switched.version if expected_version is not None else None,
            utcnow(),
        )

    async def fork(
        self, principal: Principal, conversation_id: str, body: ForkRequest
    ) -> Conversation:
        """A new conversation of the caller's holding a copy of a branch. Only the
        conversation's owner (or a service acting for them) may fork it: a copy is a write."""
        owner = write_owner(principal)
        # The conversation may move on under writers of its own while it is copied: a message
        # of the branch goes (BranchChanged), or the active leaf, asked for by leaving
        # message_id out, goes before the copy begins. Tried again (the leaf read anew); a 409
        # if it keeps moving.
        for _ in range(_FORK_TRIES):
            try:
                return await self._fork(principal, owner, conversation_id, body)
            except UnknownMessage:
                if body.message_id is not None:
                    raise  # the client's message_id: not a message of the conversation
            except BranchChanged:
                pass
        raise BranchChanged()

    async def _fork(
        self, principal: Principal, owner: str | None, conversation_id: str, body: ForkRequest
    ) -> Conversation:
        source = await self._store.get_conversation(conversation_id, owner)
        # Absent: the active leaf (null is refused by the schema).
        message_id = body.message_id if body.message_id is not None else source.active_leaf_id
        title = body.title if "title" in body.model_fields_set else source.title
        now = utcnow()
        new = dataclasses.replace(
            source,
            id=new_id(),
            user_id=principal.user_id,
            title=title,
            title_source=source.title_source
            if "title" not in body.model_fields_set
            else ("user" if title is not None else None),
            created_at=now,
            updated_at=now,
            message_count=0,
            version=1,
            forked_from={"conversation_id": conversation_id, "message_id": message_id},
            active_leaf_id=None,
        )
        forked = await self._store.fork(conversation_id, owner, message_id, new)
        metrics.CONVERSATIONS.inc()
        return forked

    async def delete(self, principal: Principal, conversation_id: str) -> Conversation:
        return await self._store.delete_conversation(conversation_id, read_owner(principal))
