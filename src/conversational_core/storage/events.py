"""The payloads of conversation events (`data` of each SSE event), shared by every backend."""

from __future__ import annotations

from typing import Any

import orjson

from conversational_core.storage.models import (
    TEXT,
    TOOL_CALL,
    Conversation,
    Message,
    Part,
    text_parts,
)

MESSAGE_CREATED = "message.created"
MESSAGE_DELTA = "message.delta"
MESSAGE_UPDATED = "message.updated"
MESSAGE_COMPLETED = "message.completed"
MESSAGE_FAILED = "message.failed"
MESSAGE_CANCELLED = "message.cancelled"
MESSAGE_REQUIRES_ACTION = "message.requires_action"
MESSAGE_DELETED = "message.deleted"
CONVERSATION_UPDATED = "conversation.updated"
CONVERSATION_DELETED = "conversation.deleted"
# Not stored: what a subscription says when events after a client's Last-Event-ID are no longer
# retained (EventHub.subscribe).
CONVERSATION_RESYNC = "conversation.resync"


def message_data(message: Message) -> bytes:
    return orjson.dumps({"message_id": message.id, "message": message})


def delta_data(
    message_id: str,
    delta: str,
    part_index: int = 0,
    part_type: str = TEXT,
    start: dict[str, Any] | None = None,
) -> bytes:
    """A piece of part `part_index` (its `text`; a tool call's `arguments`). The first delta of
    a tool call names it (`tool_call_id`, `name`): `start`."""
    data: dict[str, Any] = {
        "message_id": message_id,
        "delta": delta,
        "part_index": part_index,
        "part_type": part_type,
    }
    if start:
        data.update(start)
    return orjson.dumps(data)


def parts_from_deltas(log: bytes | list[bytes]) -> list[Part]:
    """The parts that deltas published (their `delta_data`, one per line, or a list), as a
    message holds them: what a cancelled reply keeps."""
    lines = log.split(b"\n") if isinstance(log, bytes) else log
    parts: dict[int, Part] = {}
    for line in lines:
        if not line:
            continue
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError:
            # Text kept by a version before parts (a reply streaming across the upgrade).
            raw = log if isinstance(log, bytes) else b"".join(log)
            return text_parts(raw.decode())
        index, kind = data["part_index"], data["part_type"]
        part = parts.get(index)
        if part is None:
            if kind == TOOL_CALL:
                part = {"type": kind, "id": data.get("tool_call_id", ""),
                        "name": data.get("name", ""), "arguments": ""}  # fmt: skip
            else:
                part = {"type": kind, "text": ""}
            parts[index] = part
        part["arguments" if kind == TOOL_CALL else "text"] += data["delta"]
    return [parts[k] for k in sorted(parts)]


def message_deleted_data(message_id: str, deleted_ids: list[str]) -> bytes:
    """A message and its subtree went: `deleted_message_ids` names them all (itself first)."""
    return orjson.dumps({"message_id": message_id, "deleted_message_ids": deleted_ids})


def conversation_data(conversation: Conversation) -> bytes:
    return orjson.dumps({"conversation_id": conversation.id, "conversation": conversation})


def conversation_deleted_data(conversation_id: str) -> bytes:
    return orjson.dumps({"conversation_id": conversation_id})


def resync_data(conversation_id: str, last_event_id: str) -> bytes:
    return orjson.dumps({"conversation_id": conversation_id, "last_event_id": last_event_id})
