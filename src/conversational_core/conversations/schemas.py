"""Request and response bodies of the conversation resource."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from conversational_core.messages.parts import ToolChoice, ToolSpec
from conversational_core.schemas import (
    ID_PATTERN,
    MODEL_PATTERN,
    Metadata,
    MetadataOut,
    StrictModel,
    json_integer,
)

# Generous hard caps; MAX_SYSTEM_PROMPT_CHARS (a setting) is checked by the service.
TITLE_MAX = 200
MODEL_MAX = 200
SYSTEM_PROMPT_HARD_MAX = 1_000_000


class ConversationSettings(StrictModel):
    system_prompt: str | None = Field(None, max_length=SYSTEM_PROMPT_HARD_MAX)
    model: str | None = Field(None, min_length=1, max_length=MODEL_MAX, pattern=MODEL_PATTERN)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    # (The bounds on the int itself, before the JSON-integer reading: set on JsonInt, they
    # would reach the schema as pydantic's names, `ge`/`le`, which no JSON Schema tool reads.)
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(json_integer)] | None = (
        None
    )
    tools: list[ToolSpec] | None = Field(
        None, max_length=10_000, description="Client-side tools the model may call."
    )
    tool_choice: ToolChoice | None = None


OnBusy = Literal["queue", "reject", "interrupt"]
_ON_BUSY = Field(
    description="What a user message does while a reply is pending or being written: `queue` "
    "(answered after it), `reject` (409, nothing stored) or `interrupt` (the reply is "
    "cancelled, then the new message answered)."
)


class ConversationCreate(ConversationSettings):
    title: str | None = Field(
        None,
        max_length=TITLE_MAX,
        description="Without one, a title is written after the "
        "first reply (unless AUTO_TITLE is false).",
    )
    metadata: Metadata = Field(default_factory=dict)
    on_busy: OnBusy = Field("queue", description=_ON_BUSY.description)


class ConversationUpdate(ConversationSettings):
    """Only the fields present are changed; `null` clears an optional field."""

    title: str | None = Field(
        None,
        max_length=TITLE_MAX,
        description="A title set here is never replaced by one "
        "written automatically (nor is a title cleared here).",
    )
    metadata: Metadata | None = None
    on_busy: OnBusy = Field(None, description=_ON_BUSY.description)  # type: ignore[arg-type]
    active_leaf_id: str = Field(
        None,  # type: ignore[assignment]
        pattern=ID_PATTERN,
        description="Switch branch: the active branch becomes the one reached from this message "
        "by following its newest child at each step.",
    )


class ForkRequest(StrictModel):
    message_id: str = Field(
        None,  # type: ignore[assignment]
        pattern=ID_PATTERN,
        description="The last message to copy (default: the active leaf).",
    )
    title: str | None = Field(
        None, max_length=TITLE_MAX, description="Default: the original's title."
    )


class ForkedFrom(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversation_id: str
    message_id: str | None


class ConversationOut(BaseModel):
    """A conversation as every answer carries it (all fields always present)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    user_id: str
    title: str | None
    metadata: MetadataOut
    system_prompt: str | None
    model: str | None
    temperature: float | None
    max_tokens: int | None
    created_at: str
    updated_at: str
    message_count: int = Field(description="Messages of every branch.")
    version: int
    title_source: Literal["user", "auto"] | None = Field(
        description="Who wrote the title: `user` (a title a user set or cleared is never "
        "replaced), `auto` (written after the first reply), or null (none yet)."
    )
    on_busy: OnBusy
    forked_from: ForkedFrom | None = Field(description="What this conversation was forked from.")
    tools: list[ToolSpec] | None = Field(description="Client-side tools the model may call.")
    tool_choice: str | None = Field(description="auto, none, required or a tool's name.")
    active_leaf_id: str | None = Field(
        description="The last message of the branch shown (null while there are no messages)."
    )


class ConversationList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ConversationOut]
    next_cursor: str | None = Field(description="Pass back as `cursor` for the next page.")


class ConversationListQuery(BaseModel):
    """Query parameters of a page of conversations (unknown ones are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=512, description="A page's `next_cursor`.")
