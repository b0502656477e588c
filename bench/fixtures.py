"""The data the benchmarks run on: conversations made over HTTP as a client makes them, and
messages written in bulk through `RedisStore.append_messages`, so the key layout is the real one
(only the HTTP round trip per message is skipped, which is what makes 100,000 messages quick)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import orjson

from bench.client import RawClient
from conversational_core.storage.models import Message, MessageStatus, Role, new_id, utcnow
from conversational_core.storage.redis.keys import Keys
from conversational_core.storage.redis.store import RedisStore, open_redis_store

PREFIX = "cc"  # REDIS_KEY_PREFIX given to the service (bench/procs.py)
CONTENT_CHARS = 200
BATCH = 1_000  # messages per append script: big enough to be quick, small enough not to stall


def content(i: int = 0) -> str:
    """A message text of exactly CONTENT_CHARS characters (varied a little, like real text)."""
    words = "the quick brown fox jumps over the lazy dog while benchmarks count every byte "
    text = (f"message {i}: " + words * 4)[:CONTENT_CHARS]
    assert len(text) == CONTENT_CHARS
    return text


def message_body(i: int = 0) -> bytes:
    """The body the benchmarks POST: 200 characters of content, no AI reply."""
    return orjson.dumps({"content": content(i), "respond": False})


KEYS = Keys(PREFIX)  # the service's key space (storage/redis/keys.py)


def create_conversation(client: RawClient, token: str, title: str) -> str:
    reply = client.call("POST", "/conversations", token=token, json={"title": title}, expected=201)
    conversation_id: str = orjson.loads(reply)["id"]
    return conversation_id


@contextlib.asynccontextmanager
async def open_store(redis_url: str) -> AsyncIterator[RedisStore]:
    async with open_redis_store(
        redis_url, prefix=PREFIX, socket_timeout=60, connect_timeout=5, max_connections=8
    ) as store:
        yield store


async def fill(store: RedisStore, conversation_id: str, owner: str, count: int) -> list[str]:
    """Append `count` user messages of CONTENT_CHARS characters, in order; returns their ids."""
    ids: list[str] = []
    for start in range(0, count, BATCH):
        now = utcnow()
        batch = [
            Message(
                id=new_id(),
                conversation_id=conversation_id,
                role=Role.USER,
                content=content(start + i),
                status=MessageStatus.COMPLETED,
                metadata={},
                created_at=now,
                updated_at=now,
            )
            for i in range(min(BATCH, count - start))
        ]
        await store.append_messages(conversation_id, owner, batch, now)
        ids.extend(m.id for m in batch)
    return ids
