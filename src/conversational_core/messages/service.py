"""Rules of the message resource: roles, limits, ownership, cursors."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

import orjson

from conversational_core.auth.dependencies import Principal
from conversational_core.conversations.service import read_owner, write_owner
from conversational_core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    PreconditionFailed,
    Unprocessable,
)
from conversational_core.messages.schemas import MessageCreate, MessageUpdate
from conversational_core.observability import metrics
from conversational_core.ratelimit import Limits, RateLimited
from conversational_core.settings import Settings
from conversational_core.storage.base import (
    Idempotency,
    MessageQuery,
    MessageSlice,
    Store,
)
from conversational_core.storage.models import Message, MessageStatus, Role, new_id, utcnow


@dataclass(slots=True)
class MessagePage:
    items: MessageSlice
    next_cursor: str | None


def _encode_cursor(descending: bool, backward: bool, seq: int) -> str:
    raw = orjson.dumps([int(descending), int(backward), seq])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[bool, bool, int]:
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        descending, backward, seq = orjson.loads(raw)
    except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError):
        raise BadRequest("Invalid cursor.") from None
    if not all(isinstance(v, int) for v in (descending, backward, seq)):
        raise BadRequest("Invalid cursor.")
    return bool(descending), bool(backward), seq


class MessageService:
    def __init__(self, store: Store, settings: Settings, limits: Limits | None = None) -> None:
        self._store = store
        self._settings = settings
        self._limits = limits

    def _check_content(self, content: str | None) -> None:
        if content is not None and len(content) > self._settings.MAX_MESSAGE_CHARS:
            raise Unprocessable(
                "The request has invalid fields.",
                errors=[
                    {
                        "loc": ["body", "content"],
                        "type": "string_too_long",
                        "msg": f"at most {self._settings.MAX_MESSAGE_CHARS} characters",
                    }
                ],
            )

    async def create(
        self,
        principal: Principal,
        conversation_id: str,
        body: MessageCreate,
        idempotency: Idempotency | None,
    ) -> tuple[Message, bool]:
        """Append a message. A plain user may only write `user` messages: the assistant's side
        of the history (and system/tool messages) need the `service` or `admin` role."""
        if body.role is not Role.USER and not principal.may_write_any_role:
            raise Forbidden(
                f"Adding a '{body.role.value}' message needs the service or admin role."
            )
        self._check_content(body.content)
        now = utcnow()
        message = Message(
            id=new_id(),
            conversation_id=conversation_id,
            role=body.role,
            content=body.content,
            status=MessageStatus.COMPLETED,
            metadata=body.metadata,
            created_at=now,
            updated_at=now,
        )
        messages = [message]
        reply_id = None
        charged = False
        if body.role is Role.USER and body.respond:
            charged = await self._charge_ai_budget(principal)
            # The assistant message exists from the start (pending) and is queued with the user
            # message in one atomic step.
            reply = Message(
                id=new_id(),
                conversation_id=conversation_id,
                role=Role.ASSISTANT,
                content="",
                status=MessageStatus.PENDING,
                metadata={},
                created_at=now,
                updated_at=now,
            )
            message.reply_message_id = reply_id = reply.id
            messages.append(reply)
        try:
            stored, replayed = await self._store.append_messages(
                conversation_id, write_owner(principal), messages, now, idempotency, reply_id
            )
        except Exception:  # no reply was queued (not found, idempotency mismatch, …)
            if charged:
                await self._refund_ai_budget(principal)
            raise
        if replayed and charged:  # a retry: its reply was counted the first time
            await self._refund_ai_budget(principal)
        if not replayed:
            for created in messages:
                metrics.MESSAGES.labels(created.role.value).inc()
        return stored[0], replayed

    async def _charge_ai_budget(self, principal: Principal) -> bool:
        """AI_RATE_LIMIT: AI replies per user (a reply costs far more than a request). Charged
        before the reply is queued; True when a charge was made (to refund it if no reply is)."""
        limits = self._limits
        if limits is None or limits.ai is None:
            return False
        decision = await limits.limiter.hit("ai", principal.user_id, limits.ai)
        if not decision.allowed:
            raise RateLimited(decision, "AI replies")
        return True

    async def _refund_ai_budget(self, principal: Principal) -> None:
        limits = self._limits
        if limits is not None and limits.ai is not None:
            await limits.limiter.refund("ai", principal.user_id, limits.ai)

    async def get(self, principal: Principal, conversation_id: str, message_id: str) -> Message:
        return await self._store.get_message(conversation_id, read_owner(principal), message_id)

    async def list(
        self,
        principal: Principal,
        conversation_id: str,
        *,
        limit: int,
        order: Literal["asc", "desc"],
        cursor: str | None,
        after: str | None,
        before: str | None,
    ) -> MessagePage:
        if sum(x is not None for x in (cursor, after, before)) > 1:
            raise BadRequest("Use only one of cursor, after and before.")
        descending = order == "desc"
        if cursor is not None:
            cursor_desc, backward, seq = _decode_cursor(cursor)
            if cursor_desc != descending:
                raise BadRequest("The cursor was made for the other order.")
            query = MessageQuery(limit, descending, anchor_seq=seq, backward=backward)
        elif after is not None:
            query = MessageQuery(limit, descending, anchor_id=after)
        elif before is not None:
            query = MessageQuery(limit, descending, anchor_id=before, backward=True)
        else:
            query = MessageQuery(limit, descending)
        page = await self._store.list_messages(conversation_id, read_owner(principal), query)
        next_cursor = None
        if page.has_more and page.seqs:
            # Continue in the direction of travel: forward after the last item, backward before
            # the first.
            edge = page.seqs[0] if query.backward else page.seqs[-1]
            next_cursor = _encode_cursor(descending, query.backward, edge)
        return MessagePage(page, next_cursor)

    async def update(
        self,
        principal: Principal,
        conversation_id: str,
        message_id: str,
        body: MessageUpdate,
        expected_version: int | None,
    ) -> Message:
        self._check_content(body.content)
        owner = write_owner(principal)
        changes = body.model_dump(exclude_unset=True)
        if changes.get("content", "") is None:
            raise Unprocessable(
                "content cannot be null.",
                errors=[
                    {"loc": ["body", "content"], "type": "none_forbidden", "msg": "may not be null"}
                ],
            )
        if "metadata" in changes and changes["metadata"] is None:
            changes["metadata"] = {}
        while True:
            current = await self._store.get_message(conversation_id, owner, message_id)
            if expected_version is not None and current.version != expected_version:
                raise PreconditionFailed()
            if current.role is not Role.USER and not principal.may_write_any_role:
                raise Forbidden(
                    f"Changing a '{current.role.value}' message needs the service or admin role."
                )
            if "content" in changes and current.status in (
                MessageStatus.PENDING,
                MessageStatus.STREAMING,
            ):
                raise Conflict("A reply that is still being written cannot be edited.")
            updated = current.replace(**changes, updated_at=utcnow(), version=current.version + 1)
            stored = await self._store.update_message(conversation_id, owner, updated, current)
            if stored is not None:
                return stored
            if expected_version is not None:
                raise PreconditionFailed()

    async def cancel(self, principal: Principal, conversation_id: str, message_id: str) -> Message:
        """Cancel a reply that is pending or being written: 409 once it has ended."""
        owner = write_owner(principal)
        current = await self._store.get_message(conversation_id, owner, message_id)
        if current.role is not Role.ASSISTANT:
            raise Conflict("Only an assistant reply can be cancelled.")
        if current.status.is_final:
            raise Conflict(f"The reply has already ended ({current.status.value}).")
        # First stop the writer (no delta passes after this), then record exactly the text
        # its clients received.
        published = await self._store.stop_reply(conversation_id, message_id)
        while True:
            if current.status.is_final:
                raise Conflict(f"The reply has already ended ({current.status.value}).")
            cancelled = current.replace(
                status=MessageStatus.CANCELLED,
                content=current.content if published is None else published,
                updated_at=utcnow(),
                version=current.version + 1,
            )
            stored = await self._store.cancel_reply(conversation_id, owner, cancelled, current)
            if stored is not None:
                metrics.REPLIES.labels("cancelled").inc()
                return stored
            current = await self._store.get_message(conversation_id, owner, message_id)

    async def delete(self, principal: Principal, conversation_id: str, message_id: str) -> Message:
        return await self._store.delete_message(conversation_id, read_owner(principal), message_id)
