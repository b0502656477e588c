"""Pages a process keeps (storage/redis/pages.py) are served again only while their conversation
is unchanged: every write, by whichever process, is seen by the next read, and a kept page is
served to nobody who may not read it."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import REGISTRY

from conversational_core import app
from conversational_core.auth.tokens import issue_token
from conversational_core.observability import metrics
from conversational_core.storage.base import MessageQuery, MessageSlice, PageCopyStats
from conversational_core.storage.errors import NotFound, UnknownMessage
from conversational_core.storage.models import MessageStatus, Role, utcnow
from conversational_core.storage.redis.client import Connection
from conversational_core.storage.redis.pages import PageCopies
from conversational_core.storage.redis.store import RedisStore
from tests.conftest import PAGE_CACHE_BYTES, REDIS_URL, STORE_TIMEOUT, make_settings, url_of
from tests.fixtures.metrics import value
from tests.fixtures.server import start_service
from tests.test_store_contract import conversation, message

PAGE = MessageQuery(50)


@contextlib.asynccontextmanager
async def _other_process(store: RedisStore, page_cache_bytes: int) -> AsyncIterator[RedisStore]:
    """A store on the same Redis and key prefix with its own connections and kept pages: what
    another API process or a worker holds."""
    connection = Connection.open(
        url_of(store),
        socket_timeout=STORE_TIMEOUT,
        connect_timeout=2,
        max_connections=8,
        cluster=store.redis.cluster,
    )
    other = RedisStore(connection, store.keys, page_cache_bytes=page_cache_bytes)
    try:
        yield other
    finally:
        await other.close()


def _texts(page: MessageSlice) -> list[str]:
    return [m.content for m in page.items]


async def _kept(store: RedisStore, cid: str, query: MessageQuery = PAGE) -> MessageSlice:
    """The page, read twice: the second read is the kept copy (the same object)."""
    first = await store.list_messages(cid, "alice", query)
    again = await store.list_messages(cid, "alice", query)
    assert again is first, "the second read of an unchanged page is the kept copy"
    return again


async def test_every_write_of_another_process_is_seen_by_the_next_read(
    any_redis_store: RedisStore,
) -> None:
    reader = any_redis_store
    async with _other_process(reader, PAGE_CACHE_BYTES) as writer:
        conv, _ = await writer.create_conversation(conversation())
        cid = conv.id
        first = [message(cid, f"m{n}") for n in range(3)]
        await writer.append_messages(cid, "alice", first, utcnow())
        assert _texts(await _kept(reader, cid)) == ["m0", "m1", "m2"]

        # A message appended.
        await writer.append_messages(cid, "alice", [message(cid, "m3")], utcnow())
        assert _texts(await _kept(reader, cid)) == ["m0", "m1", "m2", "m3"]

        # A message edited in place.
        stored = await writer.get_message(cid, "alice", first[1].id)
        edited = stored.replace(content="m1 edited", version=stored.version + 1)
        assert await writer.update_message(cid, "alice", edited, stored) is not None
        assert _texts(await _kept(reader, cid)) == ["m0", "m1 edited", "m2", "m3"]

        # A branch: another answer to m0 becomes the active branch, then the first one again.
        await writer.append_messages(
            cid, "alice", [message(cid, "b1")], utcnow(), parent=first[0].id
        )
        page = await _kept(reader, cid)
        assert _texts(page) == ["m0", "b1"]
        assert page.items[0].sibling_count == 1 and page.items[1].sibling_count == 2
        await writer.set_active_leaf(cid, "alice", first[2].id, None, utcnow())
        assert _texts(await _kept(reader, cid)) == ["m0", "m1 edited", "m2", "m3"]

        # A message and its subtree deleted.
        await writer.delete_message(cid, "alice", first[2].id)
        assert _texts(await _kept(reader, cid)) == ["m0", "m1 edited"]

        # A reply: while it is queued or being written its page is not kept (it carries live
        # text); once it ended, its page shows it ended.
        reply = message(cid, "", Role.ASSISTANT).replace(status=MessageStatus.PENDING)
        await writer.append_messages(
            cid, "alice", [message(cid, "ask"), reply], utcnow(), reply_id=reply.id
        )
        pending = await reader.list_messages(cid, "alice", PAGE)
        assert pending.items[-1].status is MessageStatus.PENDING
        assert await reader.list_messages(cid, "alice", PAGE) is not pending
        streaming = reply.replace(status=MessageStatus.STREAMING, version=2)
        assert await writer.start_attempt(cid, streaming, reply, 1) == streaming
        assert await writer.publish_delta(cid, reply.id, "Hi", 1)
        flushed = streaming.replace(content="Hi")
        assert await writer.flush_reply(cid, flushed, streaming) == flushed
        assert (await reader.list_messages(cid, "alice", PAGE)).items[-1].content == "Hi"
        done = flushed.replace(status=MessageStatus.COMPLETED, version=3)
        assert await writer.finish_reply(cid, done, flushed) == done
        last = (await _kept(reader, cid)).items[-1]
        assert (last.content, last.status) == ("Hi", MessageStatus.COMPLETED)

        # The conversation deleted: the kept page is not served.
        await writer.delete_conversation(cid, "alice")
        with pytest.raises(NotFound):
            await reader.list_messages(cid, "alice", PAGE)


async def test_a_kept_page_is_served_only_to_who_may_read_it(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    conv, _ = await store.create_conversation(conversation())
    await store.append_messages(conv.id, "alice", [message(conv.id, "private")], utcnow())
    await _kept(store, conv.id)
    with pytest.raises(NotFound):
        await store.list_messages(conv.id, "mallory", PAGE)
    # An admin reads every conversation (owner None): the same page.
    assert _texts(await store.list_messages(conv.id, None, PAGE)) == ["private"]


async def test_pages_of_every_kind_are_kept_apart(any_redis_store: RedisStore) -> None:
    """Each query has its copy: every page, read from copies, equals the page read afresh."""
    store = any_redis_store
    conv, _ = await store.create_conversation(conversation())
    cid = conv.id
    chain = [message(cid, f"m{n}") for n in range(6)]
    await store.append_messages(cid, "alice", chain, utcnow())
    await store.append_messages(cid, "alice", [message(cid, "alt")], utcnow(), parent=chain[2].id)
    queries = [
        PAGE,
        MessageQuery(2),
        MessageQuery(2, descending=True),
        MessageQuery(2, anchor_seq=1),
        MessageQuery(3, anchor_id=chain[2].id, backward=True),
        MessageQuery(50, leaf=chain[5].id),
        MessageQuery(50, everything=True),
    ]
    async with _other_process(store, 0) as fresh:
        assert fresh.pages is None  # (PAGE_CACHE_MB=0: nothing kept)
        for query in queries:
            kept = await _kept(store, cid, query)
            afresh = await fresh.list_messages(cid, "alice", query)
            assert kept.json_array() == afresh.json_array(), query
            assert (kept.seqs, kept.has_more) == (afresh.seqs, afresh.has_more), query
    assert len(store.pages or ()) == len(queries)


async def test_a_conversation_created_again_with_its_id_shows_none_of_before(
    any_redis_store: RedisStore,
) -> None:
    """An idempotent create retried after its conversation was deleted makes it again, same id:
    its page versions start past every version of before."""
    store = any_redis_store
    conv, _ = await store.create_conversation(conversation())
    await store.append_messages(conv.id, "alice", [message(conv.id, "before")], utcnow())
    await _kept(store, conv.id)
    await store.delete_conversation(conv.id, "alice")
    await store.create_conversation(conv)
    await store.append_messages(conv.id, "alice", [message(conv.id, "after")], utcnow())
    assert _texts(await store.list_messages(conv.id, "alice", PAGE)) == ["after"]


async def test_a_version_lost_by_redis_is_never_given_again(redis_store: RedisStore) -> None:
    """A failover to a replica that missed the last writes, or a restart from a snapshot, takes
    the conversation back to before a write, page version included: the next write must not
    give the version of the lost one again (a copy of that page would be served)."""
    store = redis_store
    conv, _ = await store.create_conversation(conversation())
    cid = conv.id
    await store.append_messages(cid, "alice", [message(cid, "m0")], utcnow())
    names = [name for name in store.keys.tree_keys(cid) if await store.redis.call("EXISTS", name)]
    snapshot = {name: await store.redis.call("DUMP", name) for name in names}
    await store.append_messages(cid, "alice", [message(cid, "lost")], utcnow())
    assert _texts(await _kept(store, cid)) == ["m0", "lost"]
    for name, dumped in snapshot.items():  # what the replica or the snapshot held
        await store.redis.call("RESTORE", name, 0, dumped, "REPLACE")
    await store.append_messages(cid, "alice", [message(cid, "new")], utcnow())
    assert _texts(await store.list_messages(cid, "alice", PAGE)) == ["m0", "new"]


async def _redis_micros(store: RedisStore) -> int:
    seconds, micros = await store.redis.call("TIME")
    return int(seconds) * 1_000_000 + int(micros)


async def test_a_page_version_is_the_servers_clock_or_one_past_the_last(
    redis_store: RedisStore,
) -> None:
    """The version a write gives is Redis's clock in microseconds (its digits joined as strings
    by the script, micros zero-padded), or one more than the last when the clock is not past it:
    never a version given before."""
    store = redis_store
    conv, _ = await store.create_conversation(conversation())
    key = store.keys.conversation(conv.id)
    padded = 0  # writes whose micros have fewer than 6 digits: written until some came by
    k = 0
    while padded < 3:  # (within the first tenth of a second: at most a second of writes)
        before = await _redis_micros(store)
        await store.append_messages(conv.id, "alice", [message(conv.id, f"m{k}")], utcnow())
        after = await _redis_micros(store)
        version = await store.redis.call("HGET", key, "pv")
        assert version.isdigit() and before <= int(version) <= after
        padded += after // 1_000_000 == before // 1_000_000 and after % 1_000_000 < 100_000
        k += 1
    ahead = await _redis_micros(store) + 10**9  # a version from a clock that ran ahead
    await store.redis.call("HSET", key, "pv", str(ahead))
    await store.append_messages(conv.id, "alice", [message(conv.id, "next")], utcnow())
    assert int(await store.redis.call("HGET", key, "pv")) == ahead + 1


async def test_a_refused_write_keeps_the_pages(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    conv, _ = await store.create_conversation(conversation())
    await store.append_messages(conv.id, "alice", [message(conv.id, "kept")], utcnow())
    page = await _kept(store, conv.id)
    with pytest.raises(UnknownMessage):
        await store.append_messages(
            conv.id, "alice", [message(conv.id, "x")], utcnow(), parent="no-such-message"
        )
    assert await store.list_messages(conv.id, "alice", PAGE) is page


def test_a_kept_pages_key_has_every_field_of_its_query() -> None:
    query = MessageQuery(7, True, 3, "a", True, "l", True)
    assert query.key() == tuple(getattr(query, f.name) for f in dataclasses.fields(query))


async def test_pages_of_conversations_not_written_since_versions_are_not_kept(
    redis_store: RedisStore,
) -> None:
    """A conversation last written by a version that did not count page versions (no `pv`)
    might be written by such a process again: its pages are read afresh every time."""
    store = redis_store
    conv, _ = await store.create_conversation(conversation())
    await store.append_messages(conv.id, "alice", [message(conv.id, "old")], utcnow())
    await store.redis.call("HDEL", store.keys.conversation(conv.id), "pv")
    first = await store.list_messages(conv.id, "alice", PAGE)
    assert await store.list_messages(conv.id, "alice", PAGE) is not first
    assert _texts(first) == ["old"]


def test_two_api_processes_show_every_write_at_once(prefix: str) -> None:
    """From the outside: the service in two processes, each page read on a new connection (the
    kernel spreads them over both, and each keeps the pages it served); after every write, every
    read shows it."""
    secret = "a-secret-of-more-than-32-bytes-for-this-test!"
    env = {
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        "WORKERS": "2",
        "JWT_SECRET": secret,
        "RATE_LIMIT": "off",
    }
    headers = {"Authorization": f"Bearer {issue_token(make_settings(JWT_SECRET=secret), 'alice')}"}
    with start_service(env) as service, httpx.Client(base_url=service.url, headers=headers) as http:
        cid = http.post("/conversations", json={}).json()["id"]

        def say(text: str) -> str:
            answer = http.post(
                f"/conversations/{cid}/messages", json={"content": text, "respond": False}
            )
            assert answer.status_code == 201
            return str(answer.json()["id"])

        def pages() -> list[list[str]]:
            texts = []
            for _ in range(12):
                with httpx.Client(base_url=service.url, headers=headers) as one:
                    page = one.get(f"/conversations/{cid}/messages")
                    assert page.status_code == 200
                    texts.append([m["content"] for m in page.json()["items"]])
            return texts

        first = say("one")
        assert pages() == [["one"]] * 12
        second = say("two")
        assert pages() == [["one", "two"]] * 12
        edited = http.put(f"/conversations/{cid}/messages/{first}", json={"content": "one!"})
        assert edited.status_code == 200
        assert pages() == [["one!", "two"]] * 12
        assert http.delete(f"/conversations/{cid}/messages/{second}").status_code == 204
        assert pages() == [["one!"]] * 12

        # The metrics count every one of those 48 page reads, whichever process served it: at
        # most one read from Redis per process and version of the page, the rest copies. (The
        # other process reports its counts every few seconds: awaited.)
        def counts() -> tuple[float, float]:
            text = http.get("/metrics").text
            return tuple(  # type: ignore[return-value]
                value(text, "conversational_core_page_reads_total", source=source)
                for source in ("copy", "store")
            )

        deadline = time.monotonic() + 10 * app.PAGE_METER_SECONDS
        while sum(counts()) < 48 and time.monotonic() < deadline:
            time.sleep(0.2)
        copy, store = counts()
        assert (copy + store, copy >= 40, 4 <= store <= 8) == (48, True, True), (copy, store)


def _page(size: int) -> MessageSlice:
    return MessageSlice(None, [1], False, array=[b"[", b"x" * size, b"]"])


def test_kept_pages_stay_within_their_budget() -> None:
    copies = PageCopies(max_bytes=64 * 1024)
    for n in range(100):
        copies.put(("c", n), b"1", _page(4096), 4096)
        assert copies.size <= 64 * 1024
    assert 0 < len(copies) < 100
    assert copies.get(("c", 0)) is None  # the least recently used went first
    assert copies.get(("c", 99)) is not None
    copies.put(("big", 0), b"1", _page(9000), 9000)  # more than an eighth of the budget
    assert copies.get(("big", 0)) is None
    # A page kept again replaces its copy, and its size is counted once.
    before = copies.size
    copies.put(("c", 99), b"2", _page(4096), 4096)
    copy = copies.get(("c", 99))
    assert copy is not None and copy.version == b"2" and copies.size == before


def test_a_copy_is_offered_only_while_young() -> None:
    copies = PageCopies(max_bytes=1024 * 1024, max_age=0.0)
    copies.put(("c", 0), b"1", _page(10), 10)
    assert copies.get(("c", 0)) is None and len(copies) == 0 and copies.size == 0


def test_the_metrics_count_each_read_once_from_when_an_app_starts() -> None:
    """PageCopyMeter moves the store's counts into Prometheus: only what was counted since the
    app started (a store that served an app before is not counted again), never twice; the
    memory gauge is the copies' size, and nothing once the app stops."""

    class Counted:
        stats = PageCopyStats(served=5, read=3, bytes=100)

        def page_copy_stats(self) -> PageCopyStats:
            return self.stats

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    reads = "conversational_core_page_reads_total"
    before = sample(reads, source="copy"), sample(reads, source="store")
    store = Counted()
    meter = metrics.PageCopyMeter(store)  # type: ignore[arg-type]
    meter.sync()
    assert (sample(reads, source="copy"), sample(reads, source="store")) == before
    store.stats = PageCopyStats(served=7, read=4, bytes=300)
    meter.sync()
    meter.sync()
    assert (sample(reads, source="copy"), sample(reads, source="store")) == (
        before[0] + 2,
        before[1] + 1,
    )
    assert sample("conversational_core_page_copies_bytes") == 300
    meter.close()
    assert sample("conversational_core_page_copies_bytes") == 0
