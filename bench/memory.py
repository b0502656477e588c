"""Benchmark 3: how much Redis memory does one stored message take, against its JSON?

What it measures: a fresh conversation is filled with 10,000 messages of 200 characters through
the store. Redis memory per message is the sum of `MEMORY USAGE … SAMPLES 0` (exact: every
element counted) over the conversation's message keys (P:{cid}:c, P:{cid}:m, P:{cid}:i, the
layout of storage/redis/keys.py) divided by the count. Every other key of the conversation found by
SCAN (e.g. a bounded event stream) is measured and shown beside it, and the growth of
`used_memory` (what the allocator holds, all keys included) divided by the count is the
cross-check. It is compared with the mean size of a message's JSON as the API returns it
(`GET …/messages/{id}`, sampled). Goal: at most 1.5x.

Why: a message is stored as its JSON in a hash plus an entry in a sorted set; what the layout adds
over the payload (hash table entries, the sorted set's skiplist and dict, key strings, allocator
size classes) is the cost per message that decides how many conversations fit in a given Redis.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from bench.client import RawClient
from bench.fixtures import KEYS, fill
from conversational_core.storage.redis.store import RedisStore

MESSAGES = 10_000
JSON_SAMPLES = 100
GOAL_MAX_RATIO = 1.5
MESSAGE_KEYS = ("c", "m", "i")  # conversation hash, message hash, position index


@dataclass(frozen=True, slots=True)
class KeyUsage:
    suffix: str  # what follows P:{cid}:
    kind: str
    encoding: str
    bytes: int


@dataclass(frozen=True, slots=True)
class MemoryResult:
    messages: int
    keys: list[KeyUsage]
    used_memory_delta: int
    json_mean_bytes: float

    def _total(self, message_keys: bool) -> int:
        return sum(k.bytes for k in self.keys if (k.suffix in MESSAGE_KEYS) == message_keys)

    @property
    def per_message(self) -> float:
        """Bytes per message in the message keys (c, m, i)."""
        return self._total(True) / self.messages

    @property
    def per_message_other_keys(self) -> float:
        """Bytes per message in the conversation's other keys (0 when it has none)."""
        return self._total(False) / self.messages

    @property
    def other_key_names(self) -> list[str]:
        return [k.suffix for k in self.keys if k.suffix not in MESSAGE_KEYS]

    @property
    def per_message_used_memory(self) -> float:
        return self.used_memory_delta / self.messages

    @property
    def ratio(self) -> float:
        return self.per_message / self.json_mean_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "content_chars": 200,
            "keys": {
                k.suffix: {"type": k.kind, "encoding": k.encoding, "memory_usage_bytes": k.bytes}
                for k in self.keys
            },
            "bytes_per_message": self.per_message,
            "other_keys_bytes_per_message": self.per_message_other_keys,
            "used_memory_delta_bytes": self.used_memory_delta,
            "used_memory_bytes_per_message": self.per_message_used_memory,
            "json_mean_bytes": self.json_mean_bytes,
            "ratio": self.ratio,
            "ratio_all_keys": (self.per_message + self.per_message_other_keys)
            / self.json_mean_bytes,
            "ratio_used_memory": self.per_message_used_memory / self.json_mean_bytes,
            "goal_max_ratio": GOAL_MAX_RATIO,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _used_memory(redis: aioredis.Redis) -> int:
    info: dict[str, Any] = await redis.info("memory")
    return int(info["used_memory"])


async def _key_usage(redis: aioredis.Redis, conversation_id: str) -> list[KeyUsage]:
    prefix = KEYS.of(conversation_id)
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    found = sorted({_text(k) async for k in redis.scan_iter(match=pattern, count=1_000)})
    usages = []
    for key in found:
        usage = await redis.memory_usage(key, samples=0)
        usages.append(
            KeyUsage(
                suffix=key[len(prefix) :],
                kind=_text(await redis.type(key)),
                encoding=_text(await redis.object("encoding", key)),
                bytes=int(usage or 0),
            )
        )
    return usages


async def measure(
    store: RedisStore,
    redis: aioredis.Redis,
    http: RawClient,
    token: str,
    conversation_id: str,
    owner: str,
) -> MemoryResult:
    """`conversation_id` must be a fresh, empty conversation of `owner`; `redis` a client of the
    same server (its INFO and MEMORY USAGE, parsed)."""
    before = await _used_memory(redis)
    ids = await fill(store, conversation_id, owner, MESSAGES)
    after = await _used_memory(redis)
    keys = await _key_usage(redis, conversation_id)

    step = max(1, len(ids) // JSON_SAMPLES)
    sizes = [
        len(http.call("GET", f"/conversations/{conversation_id}/messages/{mid}", token=token))
        for mid in ids[::step][:JSON_SAMPLES]
    ]
    return MemoryResult(
        messages=MESSAGES,
        keys=keys,
        used_memory_delta=after - before,
        json_mean_bytes=statistics.fmean(sizes),
    )
