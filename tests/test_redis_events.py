"""The Redis event hub with many conversations watched at once: on a cluster their streams are in
different slots and nodes, read by one XREAD per slot."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson

from conversational_core.storage.base import Event
from conversational_core.storage.redis.events import RedisEventHub
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import url_of
from tests.test_store_contract import conversation, message

_CONVERSATIONS = 12


async def _contents(events: AsyncIterator[Event], n: int) -> list[str]:
    out: list[str] = []
    async for event in events:
        out.append(orjson.loads(event.data)["message"]["content"])
        if len(out) == n:
            break
    return out


async def test_each_subscriber_gets_its_own_conversation_live(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    hub = RedisEventHub(store, url_of(store))
    cids = [(await store.create_conversation(conversation()))[0].id for _ in range(_CONVERSATIONS)]
    if store.redis.cluster:
        assert len({store.redis.slot_of(store.keys.events(cid)) for cid in cids}) > 1
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(hub.subscribe(cid, None)) for cid in cids]
        # Every conversation's events reach its subscriber, and only them, although they are
        # read by different readers (one per slot on a cluster).
        readers = [asyncio.create_task(_contents(stream, 3)) for stream in streams]
        for cid in cids:
            for n in range(3):
                msg = message(cid, f"{cid}-{n}")
                await store.append_messages(cid, "alice", [msg], msg.created_at)
        got = await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert got == [[f"{cid}-{n}" for n in range(3)] for cid in cids]
    assert not hub._readers  # the last subscriber of a slot gone, its reader stops
    await hub.close()
