"""Request and response bodies of the conversation resource."""

from __future__ import annotations

from pydantic import BaseModel, Field

from conversational_core.schemas import Metadata, StrictModel

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
    id: str
    user_id: str
    title: str | None
    metadata: dict[str, str | int | float | bool | None]
    system_prompt: str | None
    model: str | None
    temperature: float | None
    max_tokens: int | None
    created_at: str
    updated_at: str
    message_count: int
    version: int


class ConversationList(BaseModel):
    items: list[ConversationOut]
    next_cursor: str | None
