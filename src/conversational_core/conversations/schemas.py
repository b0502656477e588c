"""Request and response bodies of the conversation resource."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from conversational_core.schemas import Metadata, MetadataOut, StrictModel

# Generous hard caps; MAX_SYSTEM_PROMPT_CHARS (a setting) is checked by the service.
TITLE_MAX = 200
MODEL_MAX = 200
SYSTEM_PROMPT_HARD_MAX = 1_000_000


class ConversationSettings(StrictModel):
    system_prompt: str | None = Field(None, max_length=SYSTEM_PROMPT_HARD_MAX)
    model: str | None = Field(None, min_length=1, max_length=MODEL_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)


class ConversationCreate(ConversationSettings):
    title: str | None = Field(None, max_length=TITLE_MAX)
    metadata: Metadata = Field(default_factory=dict)


class ConversationUpdate(ConversationSettings):
    """Only the fields present are changed; `null` clears an optional field."""

    title: str | None = Field(None, max_length=TITLE_MAX)
    metadata: Metadata | None = None


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
    message_count: int
    version: int


class ConversationList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ConversationOut]
    next_cursor: str | None = Field(description="Pass back as `cursor` for the next page.")


class ConversationListQuery(BaseModel):
    """Query parameters of a page of conversations (unknown ones are ignored)."""

    model_config = ConfigDict(extra="ignore")

    limit: int = Field(20, ge=1, le=100)
    cursor: str | None = Field(None, max_length=512, description="A page's `next_cursor`.")
