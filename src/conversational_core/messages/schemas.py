"""Request and response bodies of the message resource."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from conversational_core.schemas import ID_PATTERN, Metadata, StrictModel
from conversational_core.storage.models import MessageStatus, Role

# A hard cap for the schema; MAX_MESSAGE_CHARS (a setting, lower) is checked by the service.
CONTENT_HARD_MAX = 10_000_000


class MessageCreate(StrictModel):
    role: Role = Role.USER
    content: str = Field(min_length=1, max_length=CONTENT_HARD_MAX)
    metadata: Metadata = Field(default_factory=dict)
    respond: bool = True


class MessageUpdate(StrictModel):
    content: str | None = Field(None, min_length=1, max_length=CONTENT_HARD_MAX)
    metadata: Metadata | None = None


class MessageOut(BaseModel):
    id: str
    conversation_id: str
    role: Role
    content: str
    status: MessageStatus
    metadata: dict[str, str | int | float | bool | None]
    created_at: str
    updated_at: str
    reply_message_id: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    version: int


class MessageList(BaseModel):
    items: list[MessageOut]
    next_cursor: str | None


class MessageListQuery(BaseModel):
    """Query parameters of a message page (one model: validated in one pass)."""

    model_config = ConfigDict(extra="ignore")  # like most APIs: unknown parameters are ignored

    limit: int = Field(50, ge=1, le=200)
    order: Literal["asc", "desc"] = "asc"
    cursor: str | None = Field(None, max_length=256)
    after: str | None = Field(None, pattern=ID_PATTERN)
    before: str | None = Field(None, pattern=ID_PATTERN)
