"""The Redis store: conversations here, messages and their tree in messages.py, changes to a
message and replies' deltas in replies.py; the key layout in keys.py, the scripts in scripts.py
and lua/, all through the Connection of client.py.

Every write emits its event (XADD on the conversation's stream) inside the same script, so an
event is never lost nor emitted for a write that did not happen.

Appending a message is O(log N) and reading a page is O(log N + page) (ZRANGE BYSCORE LIMIT +
HMGET), so both cost the same at 10 and at 100,000 messages, on one branch or on a thousand
(keys.py says how the tree is kept). Deleting a conversation UNLINKs its keys: Redis frees them
in a background thread, never blocking.

The per-user index lives in the user's slot, so it is updated beside the conversation's script
(`ZADD XX GT`, so that it can only move an existing entry forward). It is an index: a
conversation id found there whose hash is gone is skipped and pruned.

Redis Cluster (REDIS_CLUSTER): no command or script names keys of two slots. What goes to
another slot (the user's index, the job signal) is sent beside the script or after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import orjson

from conversational_core.storage import events
from conversational_core.storage.base import (
    ConversationCursor,
    Idempotency,
    PageCopyStats,
    Store,
    encode_conversation_cursor,
)
from conversational_core.storage.errors import IdempotencyMismatch, NotFound, StaleVersion
from conversational_core.storage.models import Conversation, Page, rfc3339_to_ms
from conversational_core.storage.redis import scripts
from conversational_core.storage.redis.client import Connection
from conversational_core.storage.redis.codec import (
    conversation_data,
    conversation_from,
    conversation_from_fields,
)
from conversational_core.storage.redis.keys import Keys
from conversational_core.storage.redis.messages import RedisMessages
from conversational_core.storage.redis.pages import PageCopies
from conversational_core.storage.redis.replies import RedisReplies, stream_event

_CONV_FIELDS = ("user", "data", "updated_at", "count", "version", "leaf")
# How long a deleted conversation's event stream stays, so connected clients see the deletion.
_DELETED_LINGER_SECONDS = 300

__all__ = ["RedisStore", "open_redis_store", "stream_event"]


class RedisStore(RedisMessages, RedisReplies, Store):
    backend = "redis"

    def __init__(
        self,
        redis: Connection,
        keys: Keys,
        *,
        events_max_len: int = 10_000,
        events_ttl_seconds: int = 86_400,
        page_cache_bytes: int = 0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.pages = PageCopies(page_cache_bytes) if page_cache_bytes > 0 else None
        self._max_len = events_max_len
        self._events_ttl = events_ttl_seconds

    def page_copy_stats(self) -> PageCopyStats | None:
        pages = self.pages
        if pages is None:
            return None
        return PageCopyStats(pages.served, pages.read, pages.size)

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.close()

    # Conversations -------------------------------------------------------------------------------

    async def create_conversation(
        self, conversation: Conversation, idempotency: Idempotency | None = None
    ) -> tuple[Conversation, bool]:
        # With an Idempotency-Key the record (in the user's slot) is claimed first, marked
        # pending ("0"), and marked done ("1") once the conversation exists. A retry that finds
        # a pending record finishes the first attempt's work with the same id: the conversation
        # is created only if absent, so a retry can never reset or duplicate it.
        replayed = False
        record, tail = None, b""
        if idempotency is not None:
            record = self.keys.create_idempotency(conversation.user_id, idempotency.key)
            tail = idempotency.fingerprint.encode() + b"\n" + conversation.to_json()
            claimed = await self.redis.call(
                "SET", record, b"0" + tail, "NX", "EX", idempotency.ttl_seconds
            )
            if claimed is None:
                previous: bytes | None = await self.redis.call("GET", record)
                if previous is None:  # expired in between: a new request after all
                    return await self.create_conversation(conversation, idempotency)
                state, rest = previous[:1], previous[1:]
                fingerprint, _, body = rest.partition(b"\n")
                if fingerprint.decode() != idempotency.fingerprint:
                    raise IdempotencyMismatch()
                conversation, replayed = conversation_from(orjson.loads(body)), True
                if state == b"1":
                    return conversation, True
        score = rfc3339_to_ms(conversation.updated_at)
        await self.redis.script(
            scripts.CREATE,
            [self.keys.conversation(conversation.id)],
            [
                conversation.user_id,
                conversation_data(conversation),
                conversation.updated_at,
                conversation.version,
                conversation.on_busy,
            ],
        )
        # Indexed once it exists (a listing prunes index entries whose conversation is gone).
        follow_up = [
            self.redis.call(
                "ZADD",
                self.keys.user_conversations(conversation.user_id),
                "NX",
                score,
                conversation.id,
            )
        ]
        if record is not None:
            follow_up.append(self.redis.call("SET", record, b"1" + tail, "XX", "KEEPTTL"))
        await asyncio.gather(*follow_up)
        return conversation, replayed

    async def get_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        fields = await self.redis.call(
            "HMGET", self.keys.conversation(conversation_id), *_CONV_FIELDS
        )
        conv = await self._conversation(conversation_id, fields)
        if conv is None or (owner is not None and conv.user_id != owner):
            raise NotFound("Conversation not found.")
        return conv

    async def _conversation(self, conversation_id: str, fields: list[Any]) -> Conversation | None:
        """From HMGET of _CONV_FIELDS. A conversation written before trees has no `leaf`: its
        active leaf is its last message (one more read)."""
        leaf = fields[5]
        if leaf is None and fields[0] is not None and fields[3] not in (None, b"0"):
            last = await self.redis.call("ZRANGE", self.keys.index(conversation_id), -1, -1)
            leaf = last[0] if last else None
        return conversation_from_fields(fields[:5], leaf.decode() if leaf else None)

    async def list_conversations(
        self, user_id: str, limit: int, after: ConversationCursor | None
    ) -> Page[Conversation]:
        index = self.keys.user_conversations(user_id)
        newest = ("ZRANGE", index, "+inf", "-inf", "BYSCORE", "REV", "LIMIT", 0, limit + 1)
        rows: list[tuple[str, int]]
        if after is None:
            rows = _scored(await self.redis.call(*newest, "WITHSCORES"))
        else:
            # Equal scores are ordered by member; REV gives ids descending, as the cursor.
            same, older = await asyncio.gather(
                self.redis.call(
                    "ZRANGE",
                    index,
                    after.activity_ms,
                    after.activity_ms,
                    "BYSCORE",
                    "REV",
                    "WITHSCORES",
                ),
                self.redis.call(
                    "ZRANGE",
                    index,
                    f"({after.activity_ms}",
                    "-inf",
                    "BYSCORE",
                    "REV",
                    "LIMIT",
                    0,
                    limit + 1,
                    "WITHSCORES",
                ),
            )
            rows = [row for row in _scored(same) if row[0] < after.conversation_id]
            rows.extend(_scored(older))
        rows = rows[: limit + 1]
        if not rows:
            return Page([], None)
        docs = await asyncio.gather(
            *(
                self.redis.call("HMGET", self.keys.conversation(cid), *_CONV_FIELDS)
                for cid, _ in rows
            )
        )
        items: list[tuple[Conversation, int]] = []
        stale: list[str] = []
        for (cid, score), fields in zip(rows, docs, strict=True):
            conv = await self._conversation(cid, fields)
            if conv is None or conv.user_id != user_id:
                stale.append(cid)
                continue
            items.append((conv, score))
        if stale:
            await self.redis.call("ZREM", index, *stale)
        page = items[:limit]
        next_cursor = None
        if len(rows) > limit and page:
            last, score = page[-1]
            next_cursor = encode_conversation_cursor(ConversationCursor(score, last.id))
        return Page([c for c, _ in page], next_cursor)

    async def update_conversation(
        self,
        conversation_id: str,
        owner: str | None,
        changes: dict[str, Any],
        expected_version: int | None,
        now: str,
    ) -> Conversation:
        score = rfc3339_to_ms(now)
        while True:
            current = await self.get_conversation(conversation_id, owner)
            if expected_version is not None and current.version != expected_version:
                raise StaleVersion()
            updated = dataclasses.replace(
                current, **changes, updated_at=now, version=current.version + 1
            )
            # The event's JSON up to the active leaf's value, which the script adds.
            event = events.conversation_data(updated)
            event = event[: event.rindex(b'"active_leaf_id":') + len(b'"active_leaf_id":')]
            result, _ = await asyncio.gather(
                self.redis.script(
                    scripts.UPDATE_CONVERSATION,
                    [
                        self.keys.conversation(conversation_id),
                        self.keys.events(conversation_id),
                        self.keys.index(conversation_id),
                    ],
                    [
                        owner or "",
                        str(current.version),
                        conversation_data(updated),
                        now,
                        event,
                        self._max_len,
                        self._events_ttl,
                        updated.on_busy,
                    ],
                ),
                self.redis.call(
                    "ZADD",
                    self.keys.user_conversations(current.user_id),
                    "XX",
                    "GT",
                    score,
                    conversation_id,
                ),
            )
            status = result[0]
            if status == b"ok":
                updated.active_leaf_id = result[1].decode() or None
                return updated
            if status == b"missing":
                raise NotFound("Conversation not found.")
            if expected_version is not None:
                raise StaleVersion()
            # Changed by someone else between read and write: apply on the new state.

    async def delete_conversation(self, conversation_id: str, owner: str | None) -> Conversation:
        keys = self.keys
        result = await self.redis.script(
            scripts.DELETE_CONVERSATION,
            [
                keys.conversation(conversation_id),
                keys.messages(conversation_id),
                keys.index(conversation_id),
                keys.events(conversation_id),
                keys.replies(conversation_id),
                keys.branch(conversation_id),
                keys.tree(conversation_id),
                keys.forks(conversation_id),
                keys.records(conversation_id),
            ],
            [
                owner or "",
                events.conversation_deleted_data(conversation_id),
                self._max_len,
                _DELETED_LINGER_SECONDS,
                keys.of(conversation_id),  # (a reply's keys: named in the script, same slot)
            ],
        )
        if result[0] == b"missing":
            raise NotFound("Conversation not found.")
        conv = await self._conversation(conversation_id, [b"-", *result[1:]])
        assert conv is not None
        await self.redis.call("ZREM", keys.user_conversations(conv.user_id), conversation_id)
        return conv


def _scored(flat: list[bytes]) -> list[tuple[str, int]]:
    """(member, score) pairs of a raw ZRANGE … WITHSCORES reply."""
    return [(m.decode(), int(float(s))) for m, s in zip(flat[::2], flat[1::2], strict=True)]


@contextlib.asynccontextmanager
async def open_redis_store(
    url: str,
    *,
    prefix: str,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int,
    events_max_len: int = 10_000,
    events_ttl_seconds: int = 86_400,
    cluster: bool = False,
    page_cache_bytes: int = 0,
    fast_connections: int = 2,
) -> AsyncIterator[RedisStore]:
    connection = Connection.open(
        url,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        max_connections=max_connections,
        cluster=cluster,
        fast_connections=fast_connections,
    )
    store = RedisStore(
        connection,
        Keys(prefix),
        events_max_len=events_max_len,
        events_ttl_seconds=events_ttl_seconds,
        page_cache_bytes=page_cache_bytes,
    )
    try:
        yield store
    finally:
        await store.close()
