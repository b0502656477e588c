"""Rules of the message resource: roles, limits, ownership, cursors."""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass
from typing import Any, Literal, cast

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
from conversational_core.messages.parts import ToolResults, check_parts, check_tools, invalid
from conversational_core.messages.schemas import (
    MessageCreate,
    MessageUpdate,
    RegenerateRequest,
)
from conversational_core.observability import metrics
from conversational_core.ratelimit import Limits, RateLimited
from conversational_core.settings import Settings
from conversational_core.storage.base import (
    ACTIVE_LEAF,
    ActiveLeaf,
    Deleted,
    Idempotency,
    MessageQuery,
    MessageSlice,
    Store,
)
from conversational_core.storage.errors import Changed, NotFound
from conversational_core.storage.models import (
    TOOL_RESULT,
    Message,
    MessageStatus,
    Part,
    Role,
    content_of,
    new_id,
    text_parts,
    tool_calls_of,
    utcnow,
)


@dataclass(slots=True)
class MessagePage:
    items: MessageSlice
    next_cursor: str | None


_STREAMING = b'"status":"streaming"'
# The counter's child per role, made once: labels() takes a lock and checks its values.
_MESSAGES_BY_ROLE = {role: metrics.MESSAGES.labels(role.value) for role in Role}


def _may_stream(page: MessageSlice) -> bool:
    """Whether `page` may hold a streaming reply (True when it holds decoded messages)."""
    if page.queued is False:
        return False  # the conversation has no reply queued or being written
    if page.raw is not None:
        return any(_STREAMING in doc for doc in page.raw)
    if page.array is not None:
        # (a memoryview piece is a slice of a stored document: the whole document is looked
        # at, in place, rather than copied)
        return any(
            _STREAMING in (cast(bytes, piece.obj) if isinstance(piece, memoryview) else piece)
            for piece in page.array
        )
    return True


def _encode_cursor(*values: int) -> str:
    raw = orjson.dumps(list(values))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_tag(*names: str) -> int:
    """What a cursor is bound to (its conversation; a siblings cursor, its message too), as the
    cursor's last number: a cursor passed to another list is a clear 400 rather than a page of
    that list from the position it held (CRC-32: a check against mistakes, not a secret; the
    list's owner is checked as for any request)."""
    return zlib.crc32("/".join(names).encode())


# A position or index a cursor may hold: what this service writes (positions and indexes count
# up from 0), and exact in a Lua number (a double): past 2**53, `i + 1` is `i` again, and a
# script walking from there never ends - a loop that would hold the Redis server for everyone.
_CURSOR_MAX = 2**53 - 1


def _decode_cursor(value: str, size: int, tag: int, other: str) -> list[int]:
    """The integers of a cursor this service wrote: [flags…, position, tag], each flag 0 or 1,
    the position 0 to 2**53-1, the tag `tag` (`_cursor_tag` of the list read: else a 400 that
    says the cursor belongs to `other`). Without the tag (a cursor written before cursors were
    bound, still valid during an upgrade), the `size` integers alone. A 400 for anything else."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        values = orjson.loads(raw)
    except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError):
        raise BadRequest("Invalid cursor.") from None
    if (
        not isinstance(values, list)
        or len(values) not in (size, size + 1)
        # (not a bool: JSON's true is a Python int too)
        or not all(type(v) is int for v in values)
        or not all(v in (0, 1) for v in values[: size - 1])
        or not 0 <= values[size - 1] <= _CURSOR_MAX
    ):
        raise BadRequest("Invalid cursor.")
    if len(values) > size and values[size] != tag:
        raise BadRequest(f"The cursor was made for {other}.")
    return values[:size]


def _assistant_reply(conversation_id: str, now: str) -> Message:
    """The assistant message that will hold a reply: it exists from the start, pending."""
    return Message(
        id=new_id(),
        conversation_id=conversation_id,
        role=Role.ASSISTANT,
        content="",
        status=MessageStatus.PENDING,
        metadata={},
        created_at=now,
        updated_at=now,
    )


def _not_waiting(message: Message) -> Conflict:
    return Conflict(f"The message is not waiting for tool results (it is {message.status.value}).")


def _check_results(message: Message, results: list[dict[str, Any]]) -> None:
    """Every call of the message answered, once, and nothing else (422 otherwise)."""
    calls = {p["id"] for p in tool_calls_of(message.parts or [])}
    seen: set[str] = set()
    for i, result in enumerate(results):
        call_id = result["tool_call_id"]
        if call_id not in calls:
            raise invalid(["body", "results", i, "tool_call_id"], "not a call of this message")
        if call_id in seen:
            raise invalid(["body", "results", i, "tool_call_id"], "answered twice")
        seen.add(call_id)
    missing = sorted(calls - seen)
    if missing:
        raise invalid(["body", "results"], f"calls not answered: {', '.join(missing)}", "missing")


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
        """Append a message under `parent_id` (default: the active leaf). A plain user may only
        write `user` messages: the assistant's side of the history (and system/tool messages)
        need the `service` or `admin` role. A user message follows the conversation's
        `on_busy` while a reply is pending or being written."""
        if body.role is not Role.USER and not principal.may_write_any_role:
            raise Forbidden(
                f"Adding a '{body.role.value}' message needs the service or admin role."
            )
        self._check_content(body.content)
        parts: list[Part]
        if body.parts is None:  # (the hot path: no model_dump, nothing more to check)
            parts = text_parts(body.content)
        else:
            parts = [p.model_dump(exclude_none=True) for p in body.parts]
            check_parts(self._settings, body.role, parts)
        turn: dict[str, Any] | None = None
        if body.tools is not None or body.tool_choice is not None:
            if body.role is not Role.USER:
                raise invalid(["body", "tools"], "only a user message declares tools")
            if body.tools is not None:
                tools = [t.model_dump() for t in body.tools]
            else:  # a choice for this turn among the conversation's tools
                owner = write_owner(principal)
                tools = (await self._store.get_conversation(conversation_id, owner)).tools
            check_tools(self._settings, tools, body.tool_choice)
            # The tools of this turn (its replies and tool rounds), kept on the user message.
            turn = {"tools": tools} if body.tools is not None else {}
            if body.tool_choice is not None:
                turn["tool_choice"] = body.tool_choice
        now = utcnow()
        message = Message(
            id=new_id(),
            conversation_id=conversation_id,
            role=body.role,
            content=content_of(parts),
            parts=parts,
            status=MessageStatus.COMPLETED,
            metadata=body.metadata,
            created_at=now,
            updated_at=now,
            context=turn,
        )
        parent: str | ActiveLeaf | None = ACTIVE_LEAF
        if "parent_id" in body.model_fields_set:
            parent = body.parent_id
        messages = [message]
        reply = None
        if body.role is Role.USER and body.respond:
            # The assistant message is queued with the user message in one atomic step.
            reply = _assistant_reply(conversation_id, now)
            message.reply_message_id = reply.id
            messages.append(reply)
        stored, replayed = await self._append(
            principal,
            conversation_id,
            messages,
            now,
            idempotency,
            reply,
            parent,
            user_turn=body.role is Role.USER,
        )
        return stored[0], replayed

    async def regenerate(
        self,
        principal: Principal,
        conversation_id: str,
        message_id: str,
        body: RegenerateRequest,
        idempotency: Idempotency | None,
    ) -> tuple[Message, bool]:
        """A new reply beside an assistant message (same parent), written from the branch up
        to that parent; it becomes the active leaf. Like a user message, it follows the
        conversation's `on_busy`."""
        owner = write_owner(principal)
        current = await self._store.get_message(conversation_id, owner, message_id)
        if current.role is not Role.ASSISTANT:
            raise Conflict("Only an assistant message can be regenerated.")
        now = utcnow()
        reply = _assistant_reply(conversation_id, now)
        requested = body.model_dump(exclude_unset=True)
        if requested:
            reply.context = {"requested": requested}
        stored, replayed = await self._append(
            principal,
            conversation_id,
            [reply],
            now,
            idempotency,
            reply,
            current.parent_id,
            user_turn=True,
        )
        return stored[0], replayed

    async def answer_tools(
        self,
        principal: Principal,
        conversation_id: str,
        message_id: str,
        body: ToolResults,
        idempotency: Idempotency | None,
    ) -> tuple[Message, bool]:
        """Answer every tool call of an assistant message waiting for them, in one atomic step:
        a `tool` message holding the results (child of the assistant message), the assistant
        message `completed`, and the next reply queued under the tool message. The owner (or
        a service acting for them) may answer, and admins."""
        owner = None if principal.is_admin else principal.user_id
        current = await self._store.get_message(conversation_id, owner, message_id)
        results = [r.model_dump() for r in body.results]
        parts = [{"type": TOOL_RESULT, **r} for r in results]
        check_parts(self._settings, Role.TOOL, parts, "results")  # count and sizes
        while True:
            waiting = current.status is MessageStatus.REQUIRES_ACTION
            if waiting:
                _check_results(current, results)
            elif idempotency is None:
                raise _not_waiting(current)
            # (Not waiting, with a key: only a replay of the request that answered it may
            # succeed; the store raises Changed otherwise, and the answer is the 409.)
            now = utcnow()
            reply = _assistant_reply(conversation_id, now)
            tool = Message(
                id=new_id(),
                conversation_id=conversation_id,
                role=Role.TOOL,
                content="",
                parts=parts,
                status=MessageStatus.COMPLETED,
                metadata={},
                created_at=now,
                updated_at=now,
                reply_message_id=reply.id,
            )
            answered = current.replace(
                status=MessageStatus.COMPLETED, updated_at=now, version=current.version + 1
            )
            try:
                stored, replayed = await self._append(
                    principal,
                    conversation_id,
                    [tool, reply],
                    now,
                    idempotency,
                    reply,
                    current.id,
                    user_turn=False,
                    answering=(answered, current if waiting else None),
                    any_owner=principal.is_admin,
                )
            except Changed:
                current = await self._store.get_message(conversation_id, owner, message_id)
                if current.status is not MessageStatus.REQUIRES_ACTION:
                    raise _not_waiting(current) from None
                continue  # only its metadata changed: again
            return stored[0], replayed

    async def _append(
        self,
        principal: Principal,
        conversation_id: str,
        messages: list[Message],
        now: str,
        idempotency: Idempotency | None,
        reply: Message | None,
        parent: str | ActiveLeaf | None,
        *,
        user_turn: bool,
        answering: tuple[Message, Message | None] | None = None,
        any_owner: bool = False,
    ) -> tuple[list[Message], bool]:
        charged = False
        if reply is not None:
            charged = await self._charge_ai_budget(principal)
        try:
            appended = await self._store.append_messages(
                conversation_id,
                None if any_owner else write_owner(principal),
                messages,
                now,
                idempotency,
                reply.id if reply is not None else None,
                parent=parent,
                on_busy=None if user_turn else "queue",
                answering=answering,
            )
        except Exception:  # no reply was queued (not found, busy, idempotency mismatch, …)
            if charged:
                await self._refund_ai_budget(principal)
            raise
        if appended.replayed and charged:  # a retry: its reply was counted the first time
            await self._refund_ai_budget(principal)
        if not appended.replayed:
            for created in messages:
                metrics.COUNTS.add(_MESSAGES_BY_ROLE[created.role])
        for running in appended.interrupted:  # on_busy=interrupt
            await self._stop(conversation_id, None, running)
        return appended.messages, appended.replayed

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
        message = await self._store.get_message(conversation_id, read_owner(principal), message_id)
        if message.status is not MessageStatus.STREAMING:
            return message
        return (await self._live(conversation_id, [message]))[0]

    async def _live(self, conversation_id: str, messages: list[Message]) -> list[Message]:
        """Replies being written with the parts their deltas published so far (the stored
        document of a streaming reply is not rewritten as it goes: Store.published_parts)."""
        streaming = [m.id for m in messages if m.status is MessageStatus.STREAMING]
        if not streaming:
            return messages
        published = await self._store.published_parts(conversation_id, streaming)
        return [m.with_parts(published[m.id]) if m.id in published else m for m in messages]

    async def _live_slice(self, conversation_id: str, page: MessageSlice) -> MessageSlice:
        """`page`, its streaming replies with their text so far. A page of stored JSON is only
        decoded when it may hold one: in a document, `"status":"streaming"` is the status (a
        string value's quotes are escaped)."""
        if not _may_stream(page):
            return page
        items = page.items
        live = await self._live(conversation_id, items)
        if live is items:
            return page
        return MessageSlice(live, page.seqs, page.has_more)

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
        leaf: str | None = None,
        everything: bool = False,
    ) -> MessagePage:
        if sum(x is not None for x in (cursor, after, before)) > 1:
            raise BadRequest("Use only one of cursor, after and before.")
        if leaf is not None and everything:
            raise BadRequest("leaf names a branch; view=all lists every branch: use one.")
        descending = order == "desc"
        anchor_seq, anchor_id, backward = None, None, False
        if cursor is not None:
            cursor_desc, backward_flag, anchor_seq = _decode_cursor(
                cursor, 3, _cursor_tag(conversation_id), "another conversation"
            )
            if bool(cursor_desc) != descending:
                raise BadRequest("The cursor was made for the other order.")
            backward = bool(backward_flag)
        elif after is not None:
            anchor_id = after
        elif before is not None:
            anchor_id, backward = before, True
        query = MessageQuery(
            limit,
            descending,
            anchor_seq=anchor_seq,
            anchor_id=anchor_id,
            backward=backward,
            leaf=leaf,
            everything=everything,
        )
        page = await self._store.list_messages(conversation_id, read_owner(principal), query)
        page = await self._live_slice(conversation_id, page)
        next_cursor = None
        if page.has_more and page.seqs:
            # Continue in the direction of travel: forward after the last item, backward before
            # the first.
            edge = page.seqs[0] if query.backward else page.seqs[-1]
            next_cursor = _encode_cursor(
                int(descending), int(query.backward), edge, _cursor_tag(conversation_id)
            )
        return MessagePage(page, next_cursor)

    async def siblings(
        self,
        principal: Principal,
        conversation_id: str,
        message_id: str,
        *,
        limit: int,
        cursor: str | None,
    ) -> MessagePage:
        tag = _cursor_tag(conversation_id, message_id)
        after = (
            -1
            if cursor is None
            else _decode_cursor(cursor, 1, tag, "the siblings of another message")[0]
        )
        page = await self._store.list_siblings(
            conversation_id, read_owner(principal), message_id, limit, after
        )
        page = await self._live_slice(conversation_id, page)
        next_cursor = None
        if page.has_more and page.seqs:
            next_cursor = _encode_cursor(page.seqs[-1], tag)
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
                    f"Changing a message of role '{current.role.value}' needs the service or "
                    "admin role."
                )
            if not changes:  # (`{}`: nothing to change, its version kept)
                if current.status is MessageStatus.STREAMING:
                    (current,) = await self._live(conversation_id, [current])
                return current
            if "content" in changes and current.status in (
                MessageStatus.PENDING,
                MessageStatus.STREAMING,
            ):
                raise Conflict("A reply that is still being written cannot be edited.")
            updated = current.replace(**changes, updated_at=utcnow(), version=current.version + 1)
            if current.status is MessageStatus.STREAMING:
                # Its document does not hold the text streamed so far (Store.published_parts):
                # stored with it, the `message.updated` clients get does not drop their text.
                (updated,) = await self._live(conversation_id, [updated])
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
        cancelled = await self._stop(conversation_id, owner, message_id)
        if cancelled is None:
            current = await self._store.get_message(conversation_id, owner, message_id)
            raise Conflict(f"The reply has already ended ({current.status.value}).")
        return cancelled

    async def _stop(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message | None:
        """Stop a reply and record it cancelled with exactly the parts its clients received;
        None when it had ended (or went) meanwhile. Should this process die between the two
        steps, the reply's writer finishes the cancellation (it finds the reply stopped)."""
        published = await self._store.stop_reply(conversation_id, message_id)
        while True:
            try:
                current = await self._store.get_message(conversation_id, owner, message_id)
            except NotFound:
                return None
            if current.status.is_final:
                return None
            cancelled = (current if published is None else current.with_parts(published)).replace(
                status=MessageStatus.CANCELLED, updated_at=utcnow(), version=current.version + 1
            )
            stored = await self._store.cancel_reply(conversation_id, owner, cancelled, current)
            if stored is not None:
                metrics.REPLIES.labels("cancelled").inc()
                return stored

    async def delete(self, principal: Principal, conversation_id: str, message_id: str) -> Deleted:
        """Delete a message and everything below it (their replies stop). An edit of the
        conversation: an admin, who may delete a whole conversation, does not edit others'."""
        return await self._store.delete_message(conversation_id, write_owner(principal), message_id)
