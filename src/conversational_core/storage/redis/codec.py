"""How the Redis store's records are encoded: messages as stored documents, conversations as
their hash. Shared by the store's parts (store.py, messages.py, replies.py).

A message is stored as `{"parent_id":…,<body>}`, the body being its JSON from `role` to
`context` (Message.stored_parts): ids are the hash field and the key, sibling positions are
computed on every read. Documents written before trees existed are `{<body>}`; their parent is
the message before them (they are all on the first chain), which the reader supplies, and their
text part is made from `content` (legacy_body). A whole
message is rebuilt by concatenation, never by decoding and encoding JSON.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import orjson

from conversational_core.storage import events
from conversational_core.storage.models import Conversation, Message, Part, text_parts
from conversational_core.storage.redis.client import Connection
from conversational_core.storage.redis.keys import Keys
from conversational_core.storage.redis.pages import PageCopies

PARENT_HEAD = b'{"parent_id":'


class RedisParts:
    """What every part of the Redis store holds."""

    redis: Connection
    keys: Keys
    pages: PageCopies | None  # pages served lately (pages.py); None: none kept
    _max_len: int
    _events_ttl: int

    async def published_parts(
        self, conversation_id: str, message_ids: list[str]
    ) -> dict[str, list[Part]]:
        """Store.published_parts: the delta logs the DELTA script appends to."""
        if not message_ids:
            return {}
        # One slot: every key of a conversation shares its hash tag.
        logs = await self.redis.call(
            "MGET", *(self.keys.published(conversation_id, mid) for mid in message_ids)
        )
        return {
            mid: events.parts_from_deltas(log)
            for mid, log in zip(message_ids, logs, strict=True)
            if log
        }


def has_parent(stored: bytes) -> bool:
    return stored.startswith(PARENT_HEAD)


def legacy_body(stored: bytes) -> bytes:
    """The body of a document written before trees (and parts): `{<body>}` as the store keeps
    it, with the text part it implies added after `content` (an old document is text only)."""
    doc = orjson.loads(stored)
    out: dict[str, Any] = {}
    for key, value in doc.items():
        out[key] = value
        if key == "content":
            out["parts"] = text_parts(value)
    return orjson.dumps(out)[1:-1]


def id_head(message_id: str | bytes, conversation_id: str) -> bytes:
    # Ids are ours ([A-Za-z0-9_-], checked at the HTTP edge): no JSON escaping is needed.
    mid = message_id if isinstance(message_id, bytes) else message_id.encode()
    return b'{"id":"' + mid + b'","conversation_id":"' + conversation_id.encode() + b'",'


def parent_json(parent_id: str | bytes | None) -> bytes:
    if not parent_id:
        return b"null"
    pid = parent_id if isinstance(parent_id, bytes) else parent_id.encode()
    return b'"' + pid + b'"'


@functools.lru_cache(maxsize=4096)  # a branched page asks for the same few pairs again and again
def sibling_tail(count: int, index: int) -> bytes:
    return (
        b',"sibling_count":'
        + str(count).encode()
        + b',"sibling_index":'
        + str(index).encode()
        + b"}"
    )


ONLY_CHILD = sibling_tail(1, 0)


def full_json(
    stored: bytes,
    message_id: str | bytes,
    conversation_id: str,
    parent_id: str | bytes | None = None,
    count: int = 1,
    index: int = 0,
) -> bytes:
    """The message as clients see it. `parent_id` is used only for a document that has none."""
    head = id_head(message_id, conversation_id)
    if not has_parent(stored):
        head += b'"parent_id":' + parent_json(parent_id) + b","
        return head + legacy_body(stored) + sibling_tail(count, index)
    return head + stored[1:-1] + sibling_tail(count, index)


def message_from(
    stored: bytes,
    message_id: str | bytes,
    conversation_id: str,
    parent_id: str | bytes | None = None,
    count: int = 1,
    index: int = 0,
) -> Message:
    return Message.from_json(
        full_json(stored, message_id, conversation_id, parent_id, count, index)
    )


def script_parts(message: Message) -> tuple[bytes, bytes]:
    """(parent JSON, body) of a message, as the scripts take them."""
    return message.stored_parts()


def conversation_data(conversation: Conversation) -> bytes:
    """The conversation's settings, as its hash keeps them (`data`). The fields that change
    on their own (activity, counts, version, active leaf) are fields of the hash."""
    return orjson.dumps(
        {
            "id": conversation.id,
            "user_id": conversation.user_id,
            "title": conversation.title,
            "metadata": conversation.metadata,
            "system_prompt": conversation.system_prompt,
            "model": conversation.model,
            "temperature": conversation.temperature,
            "max_tokens": conversation.max_tokens,
            "created_at": conversation.created_at,
            "title_source": conversation.title_source,
            "on_busy": conversation.on_busy,
            "forked_from": conversation.forked_from,
            "tools": conversation.tools,
            "tool_choice": conversation.tool_choice,
        }
    )


def conversation_from(doc: dict[str, Any]) -> Conversation:
    """A conversation from its JSON. Conversations written before trees lack the newer settings:
    a title they have was given by a user (lua/tree.lua's conversation_json agrees)."""
    if "on_busy" not in doc:
        doc["title_source"] = "user" if doc.get("title") is not None else None
    return Conversation(**doc)


def conversation_from_fields(fields: Sequence[Any], leaf: str | None) -> Conversation | None:
    """From HMGET user, data, updated_at, count, version; `leaf` the active leaf."""
    user, data, updated_at, count, version = fields
    if user is None or data is None:
        return None
    doc = orjson.loads(data)
    doc["updated_at"] = updated_at.decode() if isinstance(updated_at, bytes) else updated_at
    doc["message_count"] = int(count)
    doc["version"] = int(version)
    doc["active_leaf_id"] = leaf
    return conversation_from(doc)
