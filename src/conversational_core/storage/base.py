"""The storage interface. Only `storage/` knows key layouts or SQL; everything above uses this.

Ownership is a rule of the service layer, but the check itself happens inside the store's atomic
operation (the `owner` argument) so that a request costs one round trip and nothing can change
between the check and the write. `owner=None` skips the check (the service decides who may).

Every method raises :class:`~conversational_core.errors.StoreUnavailable` when the backend cannot
be reached, :class:`~conversational_core.errors.NotFound` for a missing (or not owned) object and
:class:`~conversational_core.errors.PreconditionFailed` when `expected_version` does not match.
"""

from __future__ import annotations

import base64
import binascii
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import orjson

from conversational_core.errors import Unprocessable
from conversational_core.storage.models import Conversation, Message, Page


class IdempotencyMismatch(Unprocessable):
    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was already used with a different request body.")


@dataclass(frozen=True, slots=True)
class Idempotency:
    """A client's Idempotency-Key, scoped to the caller, with a fingerprint of the request body."""

    key: str
    fingerprint: str
    ttl_seconds: int


@dataclass(frozen=True, slots=True)
class ConversationCursor:
    """Position in a user's conversation list: (activity in ms, id), exclusive."""

    activity_ms: int
    conversation_id: str


def encode_conversation_cursor(cursor: ConversationCursor) -> str:
    raw = orjson.dumps([cursor.activity_ms, cursor.conversation_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_conversation_cursor(value: str) -> ConversationCursor:
    """Raises ValueError for anything that is not a cursor this service made."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        activity_ms, conversation_id = orjson.loads(raw)
    except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError("invalid cursor") from exc
    if not isinstance(activity_ms, int) or not isinstance(conversation_id, str):
        raise ValueError("invalid cursor")
    return ConversationCursor(activity_ms, conversation_id)


@dataclass(frozen=True, slots=True)
class MessageQuery:
    """A page of a conversation's messages.

    The list is in conversation order (`descending=False`) or newest first. Without an anchor the
    page starts at the list's beginning. With an anchor (a position `anchor_seq`, or a message id
    `anchor_id`), `backward=False` returns the messages that follow the anchor in list order and
    `backward=True` the `limit` messages closest before it (still in list order).
    """

    limit: int
    descending: bool = False
    anchor_seq: int | None = None
    anchor_id: str | None = None
    backward: bool = False


@dataclass(slots=True)
class MessageSlice:
    items: list[Message]
    seqs: list[int]
    has_more: bool


class UnknownAnchor(Exception):
    """The message id given as `after`/`before` is not in the conversation."""


class Store(ABC):
    """Persistent storage of conversations and their messages."""

    backend: str

    @abstractmethod
    async def ping(self) -> None:
        """Check the backend answers; raise StoreUnavailable if not."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    # Conversations -----------------------------------------------------------------------------

    @abstractmethod
    async def create_conversation(
        self, conversation: Conversation, idempotency: Idempotency | None = None
    ) -> tuple[Conversation, bool]:
        """Store a new conversation. Returns it and whether this was a replay of an earlier
        request with the same idempotency key (then the first result is returned, nothing is
        created)."""

    @abstractmethod
    async def get_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        """The conversation, if it exists and belongs to `owner` (any owner when None)."""

    @abstractmethod
    async def list_conversations(
        self, user_id: str, limit: int, after: ConversationCursor | None
    ) -> Page[Conversation]:
        """The user's conversations, most recent activity first, `limit` at a time; the page's
        `next_cursor` is an encoded :class:`ConversationCursor`
        (see :func:`encode_conversation_cursor`)."""

    @abstractmethod
    async def update_conversation(
        self,
        conversation_id: str,
        owner: str | None,
        changes: dict[str, Any],
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        """Apply `changes` (fields of CONVERSATION_MUTABLE) atomically, bumping the version."""

    @abstractmethod
    async def delete_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        """Delete a conversation and all its messages; returns what was deleted."""

    # Messages ------------------------------------------------------------------------------------

    @abstractmethod
    async def append_messages(
        self,
        conversation_id: str,
        owner: str | None,
        messages: list[Message],
        now: str,
        idempotency: Idempotency | None = None,
    ) -> tuple[list[Message], bool]:
        """Append messages at the end of the conversation in one atomic step (a user message and
        the assistant message that will hold its reply go together), bump `message_count` and the
        conversation's activity. Returns the messages and whether this was an idempotent replay
        (then the messages stored by the first request are returned and nothing is written)."""

    @abstractmethod
    async def get_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        """One message of a conversation that `owner` may see."""

    @abstractmethod
    async def list_messages(
        self, conversation_id: str, owner: str | None, query: MessageQuery
    ) -> MessageSlice:
        """A page of messages (see :class:`MessageQuery`); raises UnknownAnchor."""

    @abstractmethod
    async def replace_message(
        self,
        conversation_id: str,
        owner: str | None,
        message: Message,
        expected: Message,
    ) -> Message | None:
        """Compare-and-set: store `message` if the stored one still equals `expected`; returns
        the stored message, or None when it changed meanwhile (the caller re-reads and retries,
        or answers 412 when the client asked for a specific version)."""

    @abstractmethod
    async def delete_message(
        self, conversation_id: str, owner: str | None, message_id: str
    ) -> Message:
        """Delete one message; returns it as it was."""
