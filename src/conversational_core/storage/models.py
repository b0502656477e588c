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

    @property
    def etag(self) -> str:
        return f'"c{self.version}"'

    def to_json(self) -> bytes:
        return orjson.dumps(self)


# The fields a client may change on a conversation.
CONVERSATION_MUTABLE = ("title", "metadata", "system_prompt", "model", "temperature", "max_tokens")


@dataclass(slots=True)
class Message:
    id: str
    conversation_id: str
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

    @property
    def etag(self) -> str:
        return f'"m{self.version}"'

    def to_json(self) -> bytes:
        return orjson.dumps(self)

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
