"""The events of `GET /conversations/{id}/events`, for the OpenAPI document: what each event's
`data` (a JSON object) holds. The payloads themselves are written by storage/events.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from conversational_core.conversations.schemas import ConversationOut
from conversational_core.messages.schemas import MessageOut
from conversational_core.schemas import omitted_when_unset


class MessageEvent(BaseModel):
    """`message.created`, `.updated`, `.completed`, `.failed`, `.cancelled`,
    `.requires_action`: the whole message."""

    model_config = ConfigDict(extra="forbid")

    message_id: str
    message: MessageOut


class DeltaEvent(BaseModel):
    """`message.delta`: new text of a reply being written (one token or several), of its part
    `part_index` (the deltas of one part concatenate to its text; a tool call's, to its
    `arguments`)."""

    model_config = ConfigDict(extra="forbid")

    message_id: str
    delta: str
    part_index: int = Field(description="Which part of the message the text belongs to.")
    part_type: Literal["text", "reasoning", "tool_call"]
    tool_call_id: str | None = Field(
        None,
        description="On the first delta of a tool call: its id (`name` too); left out otherwise.",
        json_schema_extra=omitted_when_unset,
    )
    name: str | None = Field(
        None,
        description="On the first delta of a tool call: the tool; left out otherwise.",
        json_schema_extra=omitted_when_unset,
    )


class MessageDeletedEvent(BaseModel):
    """`message.deleted`: a message went, and its whole subtree with it."""

    model_config = ConfigDict(extra="forbid")

    message_id: str
    deleted_message_ids: list[str] = Field(
        description="Every message that went: the message first, then its subtree."
    )


class ConversationEvent(BaseModel):
    """`conversation.updated`: the whole conversation."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str
    conversation: ConversationOut


class ConversationDeletedEvent(BaseModel):
    """`conversation.deleted`: the last event of the stream."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str


class ConversationResyncEvent(BaseModel):
    """`conversation.resync`: events after the last one the client had (`last_event_id`: its
    Last-Event-ID, or the last this stream sent it) are no longer retained (trimmed, or
    expired): read the conversation again; the events that follow are those after this one."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str
    last_event_id: str


EventType = Literal[
    "message.created",
    "message.delta",
    "message.updated",
    "message.completed",
    "message.failed",
    "message.cancelled",
    "message.requires_action",
    "message.deleted",
    "conversation.updated",
    "conversation.deleted",
    "conversation.resync",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
EVENT_DATA = (
    MessageEvent,
    DeltaEvent,
    MessageDeletedEvent,
    ConversationEvent,
    ConversationDeletedEvent,
    ConversationResyncEvent,
)
