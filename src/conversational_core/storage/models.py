"""The records the stores keep, shared by every backend and serialised with orjson.

They are plain dataclasses rather than pydantic models on purpose: they are built and serialised
on every request and orjson encodes dataclasses natively, which keeps the hot path cheap. Input is
validated by the pydantic schemas of the HTTP layer before a record is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

import orjson
import uuid_utils


def new_id() -> str:
    """An opaque, time-sortable id (UUIDv7)."""
    return str(uuid_utils.uuid7())


def utcnow() -> str:
    """Now as an RFC 3339 UTC timestamp with microseconds, e.g. `2026-11-24T13:29:52.123456Z`."""
    # isoformat is C code; strftime is several times slower and this runs on every write.
    return datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def rfc3339_to_ms(value: str) -> int:
    """Milliseconds since the epoch of a timestamp made by :func:`utcnow`."""
    return int(datetime.fromisoformat(value).timestamp() * 1000)


class Role(StrEnum):
    USER = "user"
    SYSTEM = "system"
    ASSISTANT = "assistant"
    TOOL = "tool"


class MessageStatus(StrEnum):
    PENDING = "pending"
    STREAMING = "streaming"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (MessageStatus.COMPLETED, MessageStatus.FAILED, MessageStatus.CANCELLED)


@dataclass(slots=True)
class Conversation:
    id: str
    user_id: str
    title: str | None
    metadata: dict[str, Any]
    system_prompt: str | None
    model: str | None
    temperature: float | None
    max_tokens: int | None
    created_at: str
    updated_at: str
    message_count: int = 0
    version: int = 1
    # Who wrote the title: "user" (also when a user cleared it), "auto" (written after the
    # first reply), or None (no title yet: one will be written).
    title_source: str | None = None
    on_busy: str = "queue"  # what a user message does while a reply is being written (OnBusy)
    forked_from: dict[str, str | None] | None = None  # {"conversation_id", "message_id"}
    # The last message of the branch the user sees (None while the conversation is empty). Last
    # of the fields: a store that computes it appends it to the JSON it was given.
    active_leaf_id: str | None = None

    @property
    def etag(self) -> str:
        return f'"c{self.version}"'

    def to_json(self) -> bytes:
        return orjson.dumps(self)


# The fields of a conversation's settings (changed by update_conversation); `active_leaf_id`
# changes by set_active_leaf and by new messages.
CONVERSATION_MUTABLE = (
    "title",
    "metadata",
    "system_prompt",
    "model",
    "temperature",
    "max_tokens",
    "title_source",
    "on_busy",
)
ON_BUSY = ("queue", "reject", "interrupt")

_ROLE_FIELD = b',"role":'
_PARENT_FIELD = b'"parent_id":'
_SIBLINGS_FIELD = b',"sibling_count":'


@dataclass(slots=True)
class Message:
    """A message of a conversation's tree. `parent_id` is the message it follows (None: a root);
    `sibling_count`/`sibling_index` say where it stands among its parent's children (in
    creation order) when it was read: a store computes them, never stores them."""

    id: str
    conversation_id: str
    # Third field: the stores find it at a fixed place in the JSON (see `stored_parts`).
    parent_id: str | None = field(default=None, kw_only=True)
    role: Role
    content: str
    status: MessageStatus
    metadata: dict[str, Any]
    created_at: str
    updated_at: str
    reply_message_id: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    version: int = 1
    # Extra fields the AI side records on a reply (e.g. how many messages were sent).
    context: dict[str, Any] | None = field(default=None)
    # Computed by the store on every read (last: see `stored_parts`).
    sibling_count: int = field(default=1, kw_only=True)
    sibling_index: int = field(default=0, kw_only=True)

    @property
    def etag(self) -> str:
        return f'"m{self.version}"'

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    def stored_parts(self) -> tuple[bytes, bytes]:
        """(`parent_id` as JSON, the body): the body is the JSON of the fields from `role` to
        `context`, without braces. A store keeps `{"parent_id":…,<body>}` and rebuilds the
        whole message by concatenation: ids, parent and sibling fields around the body."""
        doc = orjson.dumps(self)
        # Before `role` come only ids (no quotes to escape), and `,"sibling_count":` cannot
        # occur inside a JSON string (its quotes would be escaped): both finds are exact.
        role = doc.index(_ROLE_FIELD)
        parent = doc.index(_PARENT_FIELD) + len(_PARENT_FIELD)
        return doc[parent:role], doc[role + 1 : doc.rindex(_SIBLINGS_FIELD)]

    def stored_json(self) -> bytes:
        """What a store keeps: the message without its ids and sibling fields."""
        parent, body = self.stored_parts()
        return b'{"parent_id":' + parent + b"," + body + b"}"

    @classmethod
    def from_json(cls, raw: bytes | str) -> Message:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        data["role"] = Role(data["role"])
        data["status"] = MessageStatus(data["status"])
        return cls(**data)

    def replace(self, **changes: Any) -> Message:
        return dataclasses.replace(self, **changes)


T = TypeVar("T")


@dataclass(slots=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None
