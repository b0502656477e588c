"""The service on a Redis Cluster through a manual failover, without a restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from testkit.redis import RedisCluster, redis_cluster

from conversational_core.app import create_app
from conversational_core.settings import Settings
from tests.conftest import make_settings
from tests.fixtures.app import auth
from tests.fixtures.live import collect_until_end, serve
from tests.fixtures.load import Load

# How long requests may fail (503) once the replica has taken over, and how many must then
# succeed in a row.
_SWITCH_WINDOW_SECONDS = 3.0
_IN_A_ROW = 20


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A cluster of this test's own: a failover changes who serves what."""
    with redis_cluster(tmp_path) as running:
        yield running


@dataclass
class _Load:
    """A loop of appends and page reads, recording every outcome; once `switched` is set, it
    stops after _IN_A_ROW successes in a row."""

    api: httpx.AsyncClient
    cid: str
    switched: float | None = None
    outcomes: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    acknowledged: list[str] = field(default_factory=list)

    async def run(self) -> None:
        n = 0
        while not self._settled():
            n += 1
            posted = await self.api.post(
                f"/conversations/{self.cid}/messages", json={"content": f"m{n}", "respond": False}
            )
            self.outcomes.append((time.monotonic(), posted.status_code))
            if posted.status_code == 201:
                self.acknowledged.append(posted.json()["id"])
            page = await self.api.get(f"/conversations/{self.cid}/messages?limit=5&order=desc")
            self.outcomes.append((time.monotonic(), page.status_code))

    def _settled(self) -> bool:
        if self.switched is None or len(self.outcomes) < _IN_A_ROW:
            return False
        last = self.outcomes[-_IN_A_ROW:]
        return last[0][0] > self.switched and all(status < 400 for _, status in last)


async def _all_message_ids(api: httpx.AsyncClient, cid: str) -> list[str]:
    ids: list[str] = []
    url: str | None = f"/conversations/{cid}/messages?limit=100"
    while url is not None:
        page = await api.get(url)
        assert page.status_code == 200, page.text
        body = page.json()
        ids.extend(m["id"] for m in body["items"])
        cursor = body.get("next_cursor")
        url = f"/conversations/{cid}/messages?limit=100&cursor={cursor}" if cursor else None
    return ids


def _settings(cluster: RedisCluster, prefix: str) -> Settings:
    return make_settings(
        REDIS_URL=cluster.url,
        REDIS_CLUSTER=True,
        REDIS_KEY_PREFIX=prefix,
        LLM_PROVIDER="dev",
        DEV_PROVIDER_DELAY_MS=40,
        JOB_LEASE_SECONDS=2,
        # The load loop sends more than a user's default budget: this test is about failover.
        RATE_LIMIT="off",
        AI_RATE_LIMIT="off",
    )


@pytest.mark.redis_restart
async def test_manual_failover_under_load_without_restart(own_cluster: RedisCluster) -> None:
    prefix = "failover"
    settings = _settings(own_cluster, prefix)
    async with (
        serve(create_app(settings)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(settings, "alice"), timeout=20) as api,
    ):
        created = await api.post("/conversations", json={"title": "failover"})
        assert created.status_code == 201
        cid = created.json()["id"]

        load = _Load(api, cid)
        load_task = asyncio.create_task(load.run())
        asked = await api.post(
            f"/conversations/{cid}/messages", json={"content": "tell me a long story " * 6}
        )
        assert asked.status_code == 201, asked.text
        reply_id = asked.json()["reply_message_id"]
        events_url = f"/conversations/{cid}/events"
        # The reply has started streaming (to a client that stays connected throughout).
        stream = asyncio.create_task(collect_until_end(api, events_url, {}, reply_id, after="0"))
        await collect_until_end(api, events_url, {}, reply_id, after="0", until_chars=3)

        await asyncio.to_thread(own_cluster.failover, f"{prefix}:{{{cid}}}:c")
        switched = load.switched = time.monotonic()
        # A reply asked after the switch is queued, taken and written too.
        asked_after = await api.post(f"/conversations/{cid}/messages", json={"content": "again"})
        assert asked_after.status_code in (201, 503), asked_after.text
        async with asyncio.timeout(30):
            live = await stream
            await load_task
        if asked_after.status_code == 503:  # during the switch: ask again
            asked_after = await api.post(
                f"/conversations/{cid}/messages", json={"content": "again"}
            )
        later_id = asked_after.json()["reply_message_id"]
        later = await collect_until_end(api, events_url, {}, later_id, after="0")
        assert later[-1].event == "message.completed"

        # A few 503s while the replica took over, then every request succeeded, no restart.
        failures = [(at - switched, status) for at, status in load.outcomes if status >= 400]
        assert all(status == 503 for _, status in failures), failures
        assert all(at < _SWITCH_WINDOW_SECONDS for at, _ in failures), failures
        assert (await api.get("/health")).status_code == 200

        # The reply completed, once, as stored; the client that stayed connected through the
        # failover got exactly the events of the stream, without gap or duplicate.
        ends = [e for e in live if e.event == "message.completed"]
        assert [e.data["message_id"] for e in ends] == [reply_id]
        # Both replies were written in their first attempt: the worker kept its lease through
        # the switch (a restart shows as a second `message.updated` resetting the reply).
        starts = Counter(e.data["message_id"] for e in later if e.event == "message.updated")
        assert {reply_id, later_id} <= starts.keys() and set(starts.values()) == {1}, starts
        reply = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
        assert reply["status"] == "completed"
        assert reply["content"] == ends[0].data["message"]["content"]
        replayed = await collect_until_end(api, events_url, {}, reply_id, after="0")
        assert [e.id for e in live] == [e.id for e in replayed]

        # Every acknowledged write survived (a manual failover loses none).
        assert set(load.acknowledged) <= set(await _all_message_ids(api, cid))


@pytest.mark.redis_restart
async def test_primary_killed_under_load(own_cluster: RedisCluster) -> None:
    """A primary killed outright (SIGKILL): the cluster promotes its replica by itself; only
    503s meanwhile, every request succeeds within moments of the promotion, no restart."""
    prefix = "killed"
    settings = _settings(own_cluster, prefix)
    async with (
        serve(create_app(settings)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(settings, "alice"), timeout=30) as api,
    ):
        cid = (await api.post("/conversations", json={"title": "kill"})).json()["id"]
        asked = await api.post(f"/conversations/{cid}/messages", json={"content": "story " * 20})
        assert asked.status_code == 201, asked.text
        reply_id = asked.json()["reply_message_id"]
        load = Load(api, cid)
        async with load.running():

            def crash() -> None:
                own_cluster.kill_primary_of(f"{prefix}:{{{cid}}}:c")
                load.back = time.monotonic()

            await asyncio.to_thread(crash)
        load.check()
        # The reply that was being written completes (restarted by the worker if need be).
        events_url = f"/conversations/{cid}/events"
        ended = await asyncio.wait_for(
            collect_until_end(api, events_url, {}, reply_id, after="0"), 60
        )
        assert ended[-1].event == "message.completed"
        assert load.acknowledged <= await load.stored_ids()
        assert (await api.get("/health")).status_code == 200
