"""Request and response bodies of the message resource."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from conversational_core.messages.parts import PartIn, ToolChoice, ToolSpec
from conversational_core.schemas import (
    ID_PATTERN,
    MODEL_PATTERN,
    JsonInt,
    Metadata,
    MetadataOut,
    StrictModel,
)
from conversational_core.storage.models import MessageStatus, Role

# A hard cap for the schema; MAX_MESSAGE_CHARS (a setting, lower) is checked by the service.
CONTENT_HARD_MAX = 10_000_000


class MessageCreate(StrictModel):
    """Either `content` (one text part) or `parts`."""

    role: Role = Role.USER
    content: str = Field(None, min_length=1, max_length=CONTENT_HARD_MAX)  # type: ignore[assignment]
    parts: list[PartIn] = Field(None, min_length=1, max_length=10_000)  # type: ignore[arg-type]
    tools: list[ToolSpec] = Field(
        None,  # type: ignore[arg-type]
        max_length=10_000,
        description="Tools the model may call while answering this (user) message, in place "
        "of the conversation's (an empty list: none).",
    )
    tool_choice: ToolChoice = Field(None)  # type: ignore[assignment]
    metadata: Metadata = Field(default_factory=dict)
    respond: bool = True
    parent_id: str | None = Field(
        None,
        pattern=ID_PATTERN,
        description="The message this one follows (default: the active leaf). Another message "
        "starts a new branch (an edit: post the new text under the edited message's parent); "
        "null starts a new root.",
    )

    @model_validator(mode="after")
    def _content_or_parts(self) -> MessageCreate:
        if (self.content is None) == (self.parts is None):
            raise ValueError("give either content or parts")
        return self


class RegenerateRequest(StrictModel):
    """Settings for this reply only (the conversation's own are used otherwise)."""

    model: str = Field(None, min_length=1, max_length=200, pattern=MODEL_PATTERN)  # type: ignore[assignment]
    temperature: float = Field(None, ge=0.0, le=2.0)  # type: ignore[assignment]
    max_tokens: JsonInt = Field(None, ge=1, le=1_000_000)  # type: ignore[assignment]


class MessageUpdate(StrictModel):
    """Only the fields present are changed; `metadata: null` clears it. Content cannot be
    null (a message has text)."""

    content: str = Field(None, min_length=1, max_length=CONTENT_HARD_MAX)  # type: ignore[assignment]
    metadata: Metadata | None = None


class MessageOut(BaseModel):
    """A message as every answer and event carries it (all fields always present)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    conversation_id: str
    parent_id: str | None = Field(description="The message this one follows (null: a root).")
    role: Role
    content: str = Field(description="The concatenation of the text parts.")
    parts: list[PartIn] = Field(description="The message's typed parts, in order.")
    status: MessageStatus
    metadata: MetadataOut
    created_at: str
    updated_at: str
    reply_message_id: str | None = Field(
        description="On a user message: the assistant message that holds its reply."
    )
    usage: dict[str, int] | None = Field(
        description="Tokens of a completed reply: input_tokens, output_tokens, total_tokens."
    )
    error: str | None = Field(description="Why a reply failed, written for the user.")
    version: int = Field(description='Counts changes; the ETag is `"m<version>"`.')
    context: dict[str, Any] | None = Field(
        description="On a reply: what was sent to the model (model, provider, messages_sent, "
        "history_messages, history_truncated, estimated_prompt_tokens, attempts; `requested`: "
        "the settings a regenerate asked for)."
    )
    sibling_count: int = Field(
        description="Messages with the same parent (itself included): the versions of this turn."
    )
    sibling_index: int = Field(description="Its place among them, 0-based, in creation order.")


class MessageList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[MessageOut]
    next_cursor: str | None = Field(
        description="Pass back as `cursor` for the next page (of this list only: 400 elsewhere)."
    )


class MessageListQuery(BaseModel):
    """Query parameters of a message page (one model: validated in one pass)."""

    # Like most APIs: unknown parameters are ignored. Frozen: one validated query is shared by
    # the requests that send the same (routing.Operation).
    model_config = ConfigDict(extra="ignore", frozen=True)

    limit: int = Field(50, ge=1, le=200)
    order: Literal["asc", "desc"] = "asc"
    cursor: str | None = Field(None, max_length=256)
    after: str | None = Field(None, pattern=ID_PATTERN)
    before: str | None = Field(None, pattern=ID_PATTERN)
    leaf: str | None = Field(
        None,
        pattern=ID_PATTERN,
        description="List the branch that ends at this message instead of the active one.",
    )
    view: Literal["branch", "all"] = Field(
        "branch",
        description="`branch`: one branch, root to leaf; `all`: every message of every branch, "
        "in creation order.",
    )


class SiblingsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    limit: int = Field(50, ge=1, le=200)
    cursor: str | None = Field(None, max_length=256)
