"""The payloads of conversation events (`data` of each SSE event), shared by every backend."""

from __future__ import annotations

import orjson

from conversational_core.storage.models import Conversation, Message

MESSAGE_CREATED = "message.created"
MESSAGE_DELTA = "message.delta"
MESSAGE_UPDATED = "message.updated"
MESSAGE_COMPLETED = "message.completed"
MESSAGE_FAILED = "message.failed"
MESSAGE_CANCELLED = "message.cancelled"
MESSAGE_DELETED = "message.deleted"
CONVERSATION_UPDATED = "conversation.updated"
CONVERSATION_DELETED = "conversation.deleted"


def message_data(message: Message) -> bytes:
    return orjson.dumps({"message_id": message.id, "message": message})


def delta_data(message_id: str, delta: str) -> bytes:
    return orjson.dumps({"message_id": message_id, "delta": delta})


def message_deleted_data(message_id: str, deleted_ids: list[str]) -> bytes:
    """A message and its subtree went: `deleted_message_ids` names them all (itself first)."""
    return orjson.dumps({"message_id": message_id, "deleted_message_ids": deleted_ids})


def conversation_data(conversation: Conversation) -> bytes:
    return orjson.dumps({"conversation_id": conversation.id, "conversation": conversation})


def conversation_deleted_data(conversation_id: str) -> bytes:
    return orjson.dumps({"conversation_id": conversation_id})
