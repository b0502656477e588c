"""The events of `GET /conversations/{id}/events`, for the OpenAPI document: what each event's
`data` (a JSON object) holds. The payloads themselves are written by storage/events.py."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from conversational_core.conversations.schemas import ConversationOut
from conversational_core.messages.schemas import MessageOut


class MessageEvent(BaseModel):
    """`message.created`, `.updated`, `.completed`, `.failed`, `.cancelled`: the whole message."""

    model_config = ConfigDict(extra="forbid")

    message_id: str
    message: MessageOut


class DeltaEvent(BaseModel):
    """`message.delta`: new text of a reply being written (one token or several)."""

    model_config = ConfigDict(extra="forbid")

    message_id: str
    delta: str


class MessageDeletedEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_id: str


class ConversationEvent(BaseModel):
    """`conversation.updated`: the whole conversation."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str
    conversation: ConversationOut


class ConversationDeletedEvent(BaseModel):
    """`conversation.deleted`: the last event of the stream."""

    model_config = ConfigDict(extra="forbid")

    conversation_id: str


EventType = Literal[
    "message.created",
    "message.delta",
    "message.updated",
    "message.completed",
    "message.failed",
    "message.cancelled",
    "message.deleted",
    "conversation.updated",
    "conversation.deleted",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
EVENT_DATA = (
    MessageEvent,
    DeltaEvent,
    MessageDeletedEvent,
    ConversationEvent,
    ConversationDeletedEvent,
)
