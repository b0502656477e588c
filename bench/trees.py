"""Benchmark 4: do conversation trees cost what a flat list costs?

What it measures, side by side in one run (p50 of sequential keep-alive requests, interleaved
request by request as in scaling.py):
- appending a message under the active leaf (`POST …/messages`),
- regenerating the last reply (`POST …/messages/{reply}/regenerate`; before each sample a new
  turn, a user message and its reply, is added untimed, so that every regenerate makes the
  second version of a reply, as a user pressing "regenerate" does),
- reading the active branch: its first page (`limit=10`) and a page in its middle
  (`after=<id>&limit=5`),
in a conversation of 100,000 messages spread over 1,000 branches and in conversations of 10, with
the ratio (goal <= 1.1x). Then, in the big conversation, a switch of branch
(`PUT /conversations/{id}` with `active_leaf_id`: a sibling, the "< 2/3 >" of a chat UI) between
two sibling subtrees of k messages each, for k = 10 and k = 10,000: the switch removes k messages
from the active branch and adds k, so its cost should grow with k (O(k)) and not with the
conversation. And the Redis memory the tree conversation takes per message.

How the tree is made: a trunk of 100 messages; under its 51st message two branches of 10,000
messages (A and B), under its 61st two of 10 (C and D); then branches of about 80 messages under
messages picked at random among those already made, until there are 100,000 messages. Messages
are written through the store (`RedisStore.append_messages` with a parent, the real scripts and
key layout); only the HTTP round trip per message is skipped.

The service runs with WORKER_IN_API=false and no worker: a regenerate queues its reply, which
nobody writes, so that no reply generation runs beside the measurements.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.client import RawClient, encode_request
from bench.fixtures import KEYS, content, create_conversation
from bench.memory import _key_usage
from bench.scaling import Pair, interleave
from conversational_core.storage.base import ACTIVE_LEAF, ActiveLeaf
from conversational_core.storage.models import Message, MessageStatus, Role, new_id, utcnow
from conversational_core.storage.redis.store import RedisStore

TOTAL = 100_000
BRANCHES = 1_000
TRUNK = 100
SMALL = 10
SAMPLES = 2_000
SMALL_POOL = 220
SWITCH_SIZES = (10, 10_000)
SWITCH_SAMPLES = {10: 1_000, 10_000: 40}
BATCH = 1_000
JSON_SAMPLES = 100
SEED = 20261130


@dataclass(frozen=True, slots=True)
class TreeSetup:
    big_id: str
    branch: list[str]  # the active branch of the big conversation, root to leaf
    switch: dict[int, tuple[str, str]]  # k -> the first messages of two sibling subtrees
    small: list[tuple[str, list[str]]]  # (conversation id, its message ids)
    leaves: int  # branches of the big conversation (messages without children)


def _message(cid: str, i: int, role: Role = Role.USER) -> Message:
    now = utcnow()
    return Message(
        id=new_id(),
        conversation_id=cid,
        role=role,
        content=content(i),
        status=MessageStatus.COMPLETED,
        metadata={},
        created_at=now,
        updated_at=now,
    )


async def _chain(
    store: RedisStore, cid: str, owner: str, parent: str | ActiveLeaf | None, count: int
) -> list[str]:
    """`count` messages in a row under `parent` (the first) and each other; the last becomes
    the active leaf. Batches go under the one before."""
    ids: list[str] = []
    for start in range(0, count, BATCH):
        batch = [
            _message(cid, start + i, Role.USER if (start + i) % 2 == 0 else Role.ASSISTANT)
            for i in range(min(BATCH, count - start))
        ]
        above = parent if start == 0 else ACTIVE_LEAF
        await store.append_messages(cid, owner, batch, utcnow(), parent=above)
        ids.extend(m.id for m in batch)
    return ids


async def build(store: RedisStore, port: int, token: str, owner: str) -> TreeSetup:
    """The big conversation and the small ones (HTTP connections are opened per step: the
    service closes one left idle while the store writes)."""
    rng = random.Random(SEED)
    with RawClient(port) as client:
        cid = create_conversation(client, token, "tree of 100k")
    trunk = await _chain(store, cid, owner, ACTIVE_LEAF, TRUNK)
    made = list(trunk)
    attachable = list(trunk)  # where other branches may start: not in the switched subtrees
    children: dict[str, int] = dict.fromkeys(trunk[:-1], 1)  # messages that have a child
    switch: dict[int, tuple[str, str]] = {}
    for k, at in ((10_000, trunk[50]), (10, trunk[60])):
        # Two chains of exactly k messages with nothing else below them: a switch between
        # them changes k messages of the active branch (removes k, adds k).
        first = await _chain(store, cid, owner, at, k)
        second = await _chain(store, cid, owner, at, k)
        switch[k] = (first[0], second[0])
        for part in (first, second):
            made += part
            children.update(dict.fromkeys(part[:-1], 1))
        children[at] = 1
    other = BRANCHES - 1 - 4  # besides the trunk and the four above
    left = TOTAL - len(made)
    for n in range(other):
        size = left // (other - n)
        parent = rng.choice(attachable)
        part = await _chain(store, cid, owner, parent, size)
        made += part
        attachable += part[:-1]  # not its leaf: every branch made here is a new leaf
        children.update(dict.fromkeys(part[:-1], 1))
        children[parent] = 1
        left -= size
    assert len(made) == TOTAL, len(made)
    leaves = sum(1 for m in made if m not in children)
    branch: list[str] = []
    with RawClient(port) as client:
        cursor = ""
        while True:  # the whole active branch, page by page
            page = orjson.loads(
                client.call("GET", f"/conversations/{cid}/messages?limit=200{cursor}", token=token)
            )
            branch += [m["id"] for m in page["items"]]
            if page["next_cursor"] is None:
                break
            cursor = f"&cursor={page['next_cursor']}"
        small_ids = [create_conversation(client, token, f"small {i}") for i in range(SMALL_POOL)]
    small = [(s, await _chain(store, s, owner, ACTIVE_LEAF, SMALL)) for s in small_ids]
    return TreeSetup(cid, branch, switch, small, leaves)


@dataclass
class SwitchResult:
    k: int
    ms: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.ms)

    def to_json(self) -> dict[str, float]:
        ordered = sorted(self.ms)
        return {
            "p50_ms": self.p50,
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "samples": len(ordered),
            "us_per_message_changed": self.p50 * 1000 / (2 * self.k),
        }


@dataclass
class TreeResult:
    pairs: dict[str, Pair]
    switches: dict[int, SwitchResult]
    memory: dict[str, Any]
    leaves: int
    active_branch_length: int

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": {
                "messages": TOTAL,
                "branches": self.leaves,
                "small_messages": SMALL,
                "small_conversations": SMALL_POOL,
                "samples": SAMPLES,
                "active_branch_messages": self.active_branch_length,
            },
            **{key: pair.to_json() for key, pair in self.pairs.items()},
            "switch": {f"k_{k}": s.to_json() for k, s in self.switches.items()},
            "switch_us_per_message": (self.switches[10_000].p50 - self.switches[10].p50)
            * 1000
            / (10_000 - 10),
            "memory": self.memory,
        }


def measure(client: RawClient, token: str, service_token: str, setup: TreeSetup) -> TreeResult:
    """Reads first (the small conversations hold exactly 10 messages then), then appends,
    regenerates, and the switches last (they move the big conversation's active branch)."""
    port = client.port

    def get(path: str) -> bytes:
        return encode_request("GET", path, port=port, token=token)

    def post(path: str, body: bytes | None) -> bytes:
        return encode_request("POST", path, port=port, token=token, body=body)

    def messages(cid: str) -> str:
        return f"/conversations/{cid}/messages"

    big = messages(setup.big_id)
    small = [messages(cid) for cid, _ in setup.small]
    middle = setup.branch[len(setup.branch) // 2]
    small_middle = [ids[SMALL // 2 - 1] for _, ids in setup.small]

    print("  GET first page of the active branch (limit=10)", flush=True)
    a, b = interleave(
        client,
        [get(f"{big}?limit=10")],
        [get(f"{p}?limit=10") for p in small],
        expected=200,
        samples=SAMPLES,
    )
    first = Pair("GET branch, first page (10)", "at_100k", "at_10", a, b)
    print("  GET middle page of the active branch (after=<id>, limit=5)", flush=True)
    a, b = interleave(
        client,
        [get(f"{big}?after={middle}&limit=5")],
        [get(f"{p}?after={m}&limit=5") for p, m in zip(small, small_middle, strict=True)],
        expected=200,
        samples=SAMPLES,
    )
    middle_page = Pair("GET branch, middle page (5)", "at_100k", "at_10", a, b)

    print("  POST message under the active leaf", flush=True)
    body = orjson.dumps({"content": content(), "respond": False})
    a, b = interleave(
        client, [post(big, body)], [post(p, body) for p in small], expected=201, samples=SAMPLES
    )
    append = Pair("POST message (tree)", "at_100k", "at_10", a, b)

    print("  POST regenerate of the last reply (a new turn before each, untimed)", flush=True)
    turn_user = orjson.dumps({"content": content(), "respond": False})
    turn_reply = orjson.dumps({"content": content(), "role": "assistant"})

    def new_turn(path: str) -> str:
        client.call("POST", path, token=service_token, json=orjson.loads(turn_user), expected=201)
        reply = client.call(
            "POST", path, token=service_token, json=orjson.loads(turn_reply), expected=201
        )
        reply_id: str = orjson.loads(reply)["id"]
        return reply_id

    big_ms: list[float] = []
    small_ms: list[float] = []
    for i in range(-200, SAMPLES):
        sides = [(big, big_ms), (small[i % len(small)], small_ms)]
        if i % 2:
            sides.reverse()
        for path, into in sides:
            target = new_turn(path)
            took = client.timed(post(f"{path}/{target}/regenerate", None), 201)
            if i >= 0:
                into.append(took)
    regenerate = Pair("POST regenerate", "at_100k", "at_10", big_ms, small_ms)

    switches: dict[int, SwitchResult] = {}
    for k in SWITCH_SIZES:
        print(f"  PUT active_leaf_id: a switch of {k:,} messages", flush=True)
        one, other = setup.switch[k]
        requests = [
            encode_request(
                "PUT",
                f"/conversations/{setup.big_id}",
                port=port,
                token=token,
                body=orjson.dumps({"active_leaf_id": target}),
            )
            for target in (one, other)
        ]
        client.timed(requests[0], 200)
        timings = [client.timed(requests[(i + 1) % 2], 200) for i in range(SWITCH_SAMPLES[k])]
        switches[k] = SwitchResult(k, timings)
    return TreeResult(
        {
            "post_message": append,
            "regenerate": regenerate,
            "get_branch_first_page_10": first,
            "get_branch_middle_page_5": middle_page,
        },
        switches,
        {},
        setup.leaves,
        len(setup.branch),
    )


async def memory(redis: aioredis.Redis, port: int, token: str, cid: str) -> dict[str, Any]:
    """Redis memory of the tree conversation per message (its durable keys), against the mean
    size of a message's JSON."""
    usage = await _key_usage(redis, cid)
    durable = {u.suffix: u.bytes for u in usage if u.suffix in ("c", "m", "i", "b", "t", "f")}
    count = TOTAL
    with RawClient(port) as client:
        page = client.call("GET", f"/conversations/{cid}/messages?view=all&limit=200", token=token)
    listed = orjson.loads(page)["items"]
    sizes = [len(orjson.dumps(m)) for m in listed[:JSON_SAMPLES]]
    per_message = sum(durable.values()) / count
    json_mean = statistics.fmean(sizes)
    return {
        "keys": durable,
        "bytes_per_message": per_message,
        "json_mean_bytes": json_mean,
        "ratio": per_message / json_mean,
    }


__all__ = ["KEYS", "TreeResult", "TreeSetup", "build", "measure", "memory"]
