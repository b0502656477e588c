"""The records the stores keep, shared by every backend and serialised with orjson.

They are plain dataclasses rather than pydantic models on purpose: they are built and serialised
on every request and orjson encodes dataclasses natively, which keeps the hot path cheap. Input is
validated by the pydantic schemas of the HTTP layer before a record is built.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, TypeVar

import orjson
import uuid_utils


def new_id() -> str:
    """An opaque, time-sortable id (UUIDv7)."""
    return str(uuid_utils.uuid7())


_second: tuple[int, str] = (-1, "")  # the last second rendered, and its `YYYY-MM-DDTHH:MM:SS.`


def utcnow() -> str:
    """Now as an RFC 3339 UTC timestamp with microseconds, e.g. `2026-11-24T13:29:52.123456Z`."""
    # Runs several times on every write: the date and time are rendered once a second (one
    # tuple, replaced whole: threads never pair a second with another's text), the
    # microseconds each time: a quarter of datetime.now().isoformat()'s cost.
    global _second
    second, nanos = divmod(time.time_ns(), 1_000_000_000)
    rendered = _second
    if rendered[0] != second:
        rendered = _second = (
            second,
            datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."),
        )
    return f"{rendered[1]}{nanos // 1000:06d}Z"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def rfc3339_to_ms(value: str) -> int:
    """Milliseconds since the epoch of a timestamp made by :func:`utcnow` (truncated; without
    a zone, UTC). In integers: `timestamp() * 1000` is a millisecond short for some times
    (…:47.001000 gave …:47.000)."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MS


class Role(StrEnum):
    USER = "user"
    SYSTEM = "system"
    ASSISTANT = "assistant"
    TOOL = "tool"


class MessageStatus(StrEnum):
    PENDING = "pending"
    STREAMING = "streaming"
    # The reply called tools and waits for their results (tool_results); not written any more.
    REQUIRES_ACTION = "requires_action"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (MessageStatus.COMPLETED, MessageStatus.FAILED, MessageStatus.CANCELLED)

    @property
    def is_written(self) -> bool:
        """No longer written by a worker: ended, or waiting for tool results."""
        return self not in (MessageStatus.PENDING, MessageStatus.STREAMING)


# --- Parts ---------------------------------------------------------------------------------------
# A message's content is a list of typed parts (plain dicts: they are stored and sent as they
# are, and validated at the HTTP edge by messages/schemas.py):
#   {"type": "text", "text"}                    {"type": "reasoning", "text"[, "provider_data"]}
#   {"type": "tool_call", "id", "name", "arguments"}   (arguments: JSON text)
#   {"type": "tool_result", "tool_call_id", "output", "is_error"}
#   {"type": "file", "url", "mime_type", "name"}
# `content` is the concatenation of the text parts.
Part = dict[str, Any]
TEXT, REASONING, TOOL_CALL, TOOL_RESULT, FILE = (
    "text",
    "reasoning",
    "tool_call",
    "tool_result",
    "file",
)


def text_parts(content: str) -> list[Part]:
    """The parts of a message that is only text (none for no text)."""
    return [{"type": TEXT, "text": content}] if content else []


def content_of(parts: list[Part]) -> str:
    return "".join(p["text"] for p in parts if p["type"] == TEXT)


def with_text(parts: list[Part], content: str) -> list[Part]:
    """`parts` with their text parts replaced by one holding `content`."""
    out: list[Part] = []
    placed = False
    for part in parts:
        if part["type"] != TEXT:
            out.append(part)
        elif not placed:
            placed = True
            if content:
                out.append({"type": TEXT, "text": content})
    if not placed and content:
        out.insert(0, {"type": TEXT, "text": content})
    return out


def tool_calls_of(parts: list[Part]) -> list[Part]:
    return [p for p in parts if p["type"] == TOOL_CALL]


def is_json_object(arguments: str) -> bool:
    """Whether a tool call's arguments are what every provider takes: a JSON object, as text."""
    try:
        return isinstance(orjson.loads(arguments), dict)
    except orjson.JSONDecodeError:
        return False


# Conversation and Message keep their fields in a __dict__ (no `slots`): orjson serializes a
# dataclass with one as that dict, a slotted one field by field (a message: 8,500 instructions
# against 18,000, callgrind; a message append serializes its message twice).
@dataclass
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
    # Client-side tools the model may call: [{"name", "description", "parameters"}], and
    # tool_choice: "auto" | "none" | "required" | a tool's name (None: auto when tools).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None
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
    "tools",
    "tool_choice",
)
ON_BUSY = ("queue", "reject", "interrupt")

_ROLE_FIELD = b',"role":'
_PARENT_FIELD = b'"parent_id":'
_SIBLINGS_FIELD = b',"sibling_count":'


@dataclass  # (not slotted: see Conversation)
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
    # The typed parts (see Part); None when built from `content` alone: the text part is made
    # from it (documents written before parts existed have none either).
    parts: list[Part] | None = field(default=None, kw_only=True)
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

    def __post_init__(self) -> None:
        if self.parts is None:
            self.parts = text_parts(self.content)

    @property
    def etag(self) -> str:
        return f'"m{self.version}"'

    def with_parts(self, parts: list[Part], **changes: Any) -> Message:
        """A copy holding `parts` (and `content` made from them)."""
        return dataclasses.replace(self, parts=parts, content=content_of(parts), **changes)

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
        """A copy with `changes`. A new `content` without `parts` takes the place of the text
        parts (the first one's place; the other parts stay)."""
        if "content" in changes and "parts" not in changes:
            changes["parts"] = with_text(self.parts or [], changes["content"])
        return dataclasses.replace(self, **changes)


T = TypeVar("T")


@dataclass(slots=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None
