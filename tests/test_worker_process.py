"""Reply workers as separate processes (`python run.py worker`), and restarts of the API.

A worker killed (SIGKILL) or stopped (SIGTERM) in the middle of a reply leaves its job to another
worker, which writes the reply again from the start, exactly once; replies queued while no
worker runs are written once the API starts with its embedded worker, on Redis and on the
embedded store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from testkit.fake_llm import FakeLLM, FakeLLMServer, Reply
from testkit.redis import RedisCluster

from conversational_core.app import create_app
from conversational_core.replies.generation import ReplyWriter
from conversational_core.replies.providers.base import CompletionRequest, Provider, Usage
from conversational_core.settings import Settings
from conversational_core.storage import events as event_types
from conversational_core.storage.factory import Backend
from conversational_core.storage.redis.store import open_redis_store
from tests.conftest import REDIS_URL, make_settings
from tests.fixtures.app import app_client, auth
from tests.fixtures.events import subscribed
from tests.fixtures.live import SseEvent, collect_until_end, serve
from tests.fixtures.server import ROOT

# Bounds on waits for events that must happen: a failure shows as a timeout, not a hang.
EVENT_TIMEOUT = 20.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


# --- Fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    fake = FakeLLM()
    async with FakeLLMServer(fake):
        try:
            yield fake
        finally:
            fake.release.set()  # a stream still held would keep the server from stopping


def _config(llm: FakeLLM, **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {
        "LLM_PROVIDER": "openai",
        "LLM_BASE_URL": llm.url,
        "LLM_MODEL": "fake-model",
        "JOB_LEASE_SECONDS": 1,
        "WORKER_IN_API": False,
        "LLM_RETRY_BASE_SECONDS": 0.01,
        "AUTO_TITLE": False,  # the model's requests are counted (see conftest)
    }
    config.update(overrides)
    return config


class WorkerProcess:
    """`python run.py worker` with the given settings in its environment. Its log (stderr) is
    read continuously, so that the pipe never fills up, and kept for failure messages."""

    def __init__(self, config: dict[str, object]) -> None:
        self.env = {
            **os.environ,
            **{name: _env_value(value) for name, value in config.items()},
            "ENVIRONMENT": "test",
            "LOG_LEVEL": "INFO",
            "WORKER_METRICS_PORT": "0",  # several workers at once
            "PYTHONUNBUFFERED": "1",
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.started = asyncio.Event()
        self._new_line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "run.py",
            "worker",
            cwd=ROOT,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        ready = asyncio.create_task(self.started.wait())
        try:
            await asyncio.wait(
                {ready, self._reader}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if not self.started.is_set():
            raise AssertionError(f"the worker did not start:\n{self.log}")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace")
            self.lines.append(text)
            if " worker " in text and " started " in text:
                self.started.set()
            self._new_line.set()

    async def line_seen(self, text: str) -> None:
        """Wait until the log has a line containing `text`."""
        while not any(text in line for line in self.lines):
            self._new_line.clear()
            await self._new_line.wait()

    async def signal(self, sig: signal.Signals) -> int:
        """Send `sig` and wait for the process to exit by itself; its exit code."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            raise AssertionError(
                f"the worker did not exit within {STOP_TIMEOUT}s of {sig.name}:\n{self.log}"
            ) from None
        await self._drain()
        return code

    async def _drain(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, STOP_TIMEOUT)

    async def close(self) -> None:
        """Make sure the process is gone (teardown)."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        await self._drain()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _env_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@contextlib.asynccontextmanager
async def workers() -> AsyncIterator[list[WorkerProcess]]:
    """Worker processes started by the test (appended to the list); all killed on exit."""
    started: list[WorkerProcess] = []
    try:
        yield started
    finally:
        for worker in started:
            await worker.close()


@contextlib.asynccontextmanager
async def api_and_workers(
    config: dict[str, object],
) -> AsyncIterator[tuple[list[WorkerProcess], httpx.AsyncClient]]:
    """A served API (WORKER_IN_API off: the replies are the worker processes' work) with a
    client of alice's, and the pool of worker processes the test starts."""
    settings: Settings = make_settings(**config)
    async with (
        workers() as pool,
        serve(create_app(settings)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(settings, "alice"), timeout=20) as api,
    ):
        yield pool, api


async def _start_worker(pool: list[WorkerProcess], config: dict[str, object]) -> WorkerProcess:
    worker = WorkerProcess(config)
    pool.append(worker)
    await worker.start()
    return worker


async def _conversation(api: httpx.AsyncClient) -> str:
    response = await api.post("/conversations", json={})
    assert response.status_code == 201, response.text
    cid: str = response.json()["id"]
    return cid


async def _ask(api: httpx.AsyncClient, cid: str, content: str) -> str:
    response = await api.post(f"/conversations/{cid}/messages", json={"content": content})
    assert response.status_code == 201, response.text
    reply_id: str = response.json()["reply_message_id"]
    assert reply_id
    return reply_id


async def _wait_end(api: httpx.AsyncClient, cid: str, reply_id: str) -> list[SseEvent]:
    return await asyncio.wait_for(
        collect_until_end(api, f"/conversations/{cid}/events", {}, reply_id, after="0"),
        EVENT_TIMEOUT,
    )


def _of(events: list[tuple[str, dict[str, Any]]], reply_id: str) -> list[tuple[str, Any]]:
    return [(t, d) for t, d in events if d.get("message_id") == reply_id]


async def _all_events(
    prefix: str, cid: str, url: str = REDIS_URL, cluster: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the conversation as retained in Redis (type, data), oldest first."""
    async with open_redis_store(
        url,
        prefix=prefix,
        socket_timeout=5,
        connect_timeout=2,
        max_connections=4,
        cluster=cluster,
    ) as store:
        stored = await store.read_events(cid, None, 100_000)
    return [(e.type, orjson.loads(e.data)) for e in stored]


def _check_restarted_reply(
    events: list[tuple[str, dict[str, Any]]],
    reply_id: str,
    first_text_prefix: str,
    second_text: str,
) -> None:
    """The reply's events tell a client to drop the first attempt's text: a `message.updated`
    with empty content (attempt 2) comes after the first attempt's deltas and before the
    second's; the reply completes exactly once, with the second attempt's text."""
    mine = _of(events, reply_id)
    types = [t for t, _ in mine]
    assert types.count(event_types.MESSAGE_COMPLETED) == 1, types
    assert event_types.MESSAGE_FAILED not in types, types
    resets = [
        i
        for i, (t, d) in enumerate(mine)
        if t == event_types.MESSAGE_UPDATED
        and d["message"]["content"] == ""
        and (d["message"].get("context") or {}).get("attempts") == 2
    ]
    assert len(resets) == 1, mine
    reset = resets[0]
    before = "".join(d["delta"] for t, d in mine[:reset] if t == event_types.MESSAGE_DELTA)
    after = "".join(d["delta"] for t, d in mine[reset:] if t == event_types.MESSAGE_DELTA)
    assert before.startswith(first_text_prefix) and before, mine
    assert after == second_text, mine
    completed = next(d for t, d in mine if t == event_types.MESSAGE_COMPLETED)
    assert completed["message"]["content"] == second_text
    assert types.index(event_types.MESSAGE_COMPLETED) > reset


# --- A worker process stopped in the middle of a reply ------------------------------------------


async def _worker_stops_mid_reply(
    llm: FakeLLM,
    prefix: str,
    sig: signal.Signals,
    url: str = REDIS_URL,
    cluster: bool = False,
    max_tries: int = 3,
) -> None:
    first = Reply([f"one{i} " for i in range(8)], hold_after=3)
    second = Reply(["second ", "attempt"])
    llm.script = [first, second]
    config = _config(llm, REDIS_URL=url, REDIS_CLUSTER=cluster, REDIS_KEY_PREFIX=prefix)
    config["JOB_MAX_TRIES"] = max_tries
    if sig is signal.SIGTERM:
        # The held reply cannot finish within the grace time, so the worker hands it back; with
        # a lease far longer than the test's wait, only the hand-back lets the rescuer take it.
        config.update(WORKER_SHUTDOWN_GRACE_SECONDS=0.2, JOB_LEASE_SECONDS=120)
    async with api_and_workers(config) as (pool, api):
        doomed = await _start_worker(pool, config)
        cid = await _conversation(api)
        reply_id = await _ask(api, cid, "count")
        # The first attempt's deltas reached clients before the worker goes.
        seen = await asyncio.wait_for(
            collect_until_end(
                api, f"/conversations/{cid}/events", {}, reply_id, after="0", until_chars=15
            ),
            EVENT_TIMEOUT,
        )
        await asyncio.wait_for(llm.holding.wait(), EVENT_TIMEOUT)
        partial = "".join(
            e.data["delta"]
            for e in seen
            if e.event == "message.delta" and e.data["message_id"] == reply_id
        )
        assert partial == "one0 one1 one2 "

        code = await doomed.signal(sig)
        if sig is signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, f"exit code {code}:\n{doomed.log}"
        await asyncio.wait_for(llm.aborted.wait(), EVENT_TIMEOUT)  # its provider stream closed
        middle = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
        assert middle["status"] == "streaming", middle

        rescuer = await _start_worker(pool, config)
        sse = await _wait_end(api, cid, reply_id)
        final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
        if sig is signal.SIGKILL and max_tries == 1:
            # The dead worker's attempt counted: no try is left for the rescuer.
            assert final["status"] == "failed", final
            assert final["error"] == "The reply could not be written after 1 attempts."
            assert await rescuer.signal(signal.SIGTERM) == 0, rescuer.log
            return
        assert final["status"] == "completed", final
        # A hand-back (SIGTERM) is no try of the reply's: it completes even with one try.
        assert final["context"].get("uncharged_attempts", 0) == (sig is signal.SIGTERM), final
        assert final["content"] == llm.text(second) == "second attempt"
        assert final["context"]["attempts"] == 2, final
        assert final["error"] is None

        # No worker is left that could end it again: then read every event it ever had.
        assert await rescuer.signal(signal.SIGTERM) == 0, rescuer.log
        stored = await _all_events(prefix, cid, url, cluster)

    assert llm.streams_started == 2 and llm.streams_finished == 1 and llm.streams_aborted == 1
    _check_restarted_reply(
        [(e.event, e.data) for e in sse], reply_id, "one0 one1 one2 ", "second attempt"
    )
    _check_restarted_reply(stored, reply_id, "one0 one1 one2 ", "second attempt")


async def test_killed_worker_process_reply_completes_once(llm: FakeLLM, prefix: str) -> None:
    await _worker_stops_mid_reply(llm, prefix, signal.SIGKILL)


async def test_gracefully_stopped_worker_hands_its_reply_over(llm: FakeLLM, prefix: str) -> None:
    """With JOB_MAX_TRIES=1: the hand-back does not use up the reply's only try."""
    await _worker_stops_mid_reply(llm, prefix, signal.SIGTERM, max_tries=1)


async def test_a_worker_killed_while_batching_several_replies(llm: FakeLLM, prefix: str) -> None:
    """Three replies at once (their deltas batched), the worker killed mid-way: each reply's
    events still concatenate to exactly its final text once the reset is applied."""
    first = Reply([f"one{i} " for i in range(8)], hold_after=3)
    second = Reply(["second ", "attempt"])
    llm.script = [*[first] * 3, *[second] * 3]
    config = _config(llm, REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX=prefix, DELTA_BATCH_MS=40)
    async with api_and_workers(config) as (pool, api):
        doomed = await _start_worker(pool, config)
        cids = [await _conversation(api) for _ in range(3)]
        asked = [(cid, await _ask(api, cid, "count")) for cid in cids]
        # Every first attempt's deltas reached clients before the worker goes.
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    collect_until_end(
                        api, f"/conversations/{c}/events", {}, r, after="0", until_chars=15
                    )
                    for c, r in asked
                )
            ),
            EVENT_TIMEOUT,
        )
        assert await doomed.signal(signal.SIGKILL) == -signal.SIGKILL
        rescuer = await _start_worker(pool, config)
        for cid, reply_id in asked:
            sse = await _wait_end(api, cid, reply_id)
            _check_restarted_reply(
                [(e.event, e.data) for e in sse], reply_id, "one0 one1 one2 ", "second attempt"
            )
        assert await rescuer.signal(signal.SIGTERM) == 0, rescuer.log
        for cid, reply_id in asked:
            stored = await _all_events(prefix, cid)
            _check_restarted_reply(stored, reply_id, "one0 one1 one2 ", "second attempt")


async def test_a_killed_worker_uses_up_a_try(llm: FakeLLM, prefix: str) -> None:
    await _worker_stops_mid_reply(llm, prefix, signal.SIGKILL, max_tries=1)


async def test_stopped_worker_finishes_a_running_reply_within_its_grace_time(
    llm: FakeLLM, prefix: str
) -> None:
    llm.script = [Reply([f"w{i} " for i in range(6)], hold_after=2)]
    config = _config(llm, REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX=prefix)
    config.update(WORKER_SHUTDOWN_GRACE_SECONDS=15)
    async with api_and_workers(config) as (pool, api):
        worker = await _start_worker(pool, config)
        cid = await _conversation(api)
        reply_id = await _ask(api, cid, "finish please")
        await asyncio.wait_for(llm.holding.wait(), EVENT_TIMEOUT)
        assert worker.proc is not None
        os.kill(worker.proc.pid, signal.SIGTERM)  # mid-reply
        await asyncio.wait_for(worker.line_seen("finishing 1 running job"), EVENT_TIMEOUT)
        llm.release.set()
        assert await asyncio.wait_for(worker.proc.wait(), EVENT_TIMEOUT) == 0, worker.log
        final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    assert final["status"] == "completed", final
    assert final["content"] == "w0 w1 w2 w3 w4 w5 "
    assert final["context"]["attempts"] == 1  # finished by the stopping worker itself
    assert llm.streams_started == 1 and llm.streams_aborted == 0


async def test_killed_worker_process_on_the_cluster(
    llm: FakeLLM, prefix: str, cluster: RedisCluster
) -> None:
    """The same on a Redis Cluster: worker processes and the API with REDIS_CLUSTER=true."""
    await _worker_stops_mid_reply(llm, prefix, signal.SIGKILL, cluster.url, cluster=True)


# --- Replies queued while no worker runs, written after an API restart ---------------------------


async def _queued_replies_survive_restart(llm: FakeLLM, config: dict[str, object]) -> None:
    off: Settings = make_settings(**{**config, "WORKER_IN_API": False})
    asked: list[tuple[str, str]] = []
    async with app_client(create_app(off)) as http:
        headers = auth(off, "alice")
        for n in range(3):
            conv = await http.post("/conversations", json={}, headers=headers)
            assert conv.status_code == 201, conv.text
            cid = conv.json()["id"]
            sent = await http.post(
                f"/conversations/{cid}/messages", json={"content": f"q{n}"}, headers=headers
            )
            assert sent.status_code == 201, sent.text
            reply_id = sent.json()["reply_message_id"]
            assert reply_id
            asked.append((cid, reply_id))
        for cid, reply_id in asked:
            reply = await http.get(f"/conversations/{cid}/messages/{reply_id}", headers=headers)
            assert reply.json()["status"] == "pending", reply.json()
    assert llm.requests == []  # nobody wrote them

    on: Settings = make_settings(**{**config, "WORKER_IN_API": True})
    async with (
        serve(create_app(on)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(on, "alice"), timeout=20) as api,
    ):
        for cid, reply_id in asked:
            events = await _wait_end(api, cid, reply_id)
            ends = [
                e.event
                for e in events
                if e.data.get("message_id") == reply_id
                and e.event in ("message.completed", "message.failed", "message.cancelled")
            ]
            assert ends == ["message.completed"], [(e.event, e.data) for e in events]
            final = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
            assert final["status"] == "completed", final
            assert final["content"] == llm.text()
            assert final["context"]["attempts"] == 1
    prompts = sorted(r["messages"][-1]["content"] for r in llm.requests)
    assert prompts == ["q0", "q1", "q2"]  # each reply written once


async def test_replies_queued_on_redis_complete_after_api_restart(
    llm: FakeLLM, prefix: str
) -> None:
    await _queued_replies_survive_restart(
        llm, _config(llm, REDIS_URL=REDIS_URL, REDIS_KEY_PREFIX=prefix)
    )


async def test_replies_queued_on_embedded_store_complete_after_api_restart(
    llm: FakeLLM, tmp_path: Path
) -> None:
    await _queued_replies_survive_restart(llm, _config(llm, REDIS_URL=None, DATA_DIR=tmp_path))


# --- A worker that lost its lease but is still writing ------------------------------------------


class _Gated(Provider):
    """Yields `first`, then waits for `gate`, then yields `second`."""

    name = "gated"

    def __init__(self, first: str, second: str) -> None:
        self.first = first
        self.second = second
        self.gate = asyncio.Event()
        self.sent_first = asyncio.Event()

    async def stream(self, request: CompletionRequest) -> AsyncIterator[str | Usage]:
        yield self.first
        self.sent_first.set()
        await self.gate.wait()
        yield self.second


async def _until_delta(backend: Backend, cid: str, reply_id: str, delta: str) -> None:
    """Wait for the delta's event (through the hub: no polling)."""
    async with subscribed(backend.events, cid, "0") as stream:
        async for event in stream:
            data = orjson.loads(event.data)
            if data.get("message_id") == reply_id and data.get("delta") == delta:
                return


async def test_stale_writer_does_not_finish_a_reply_restarted_by_another_worker(
    backend: Backend,
) -> None:
    """Worker A writes attempt 1 and stalls (a paused process, a long event-loop stall, renewals
    failing with Unavailable) for longer than the lease; worker B takes the job over and
    restarts the reply (attempt 2, `message.updated` with empty content). When A resumes, it
    must notice that the reply is no longer its own (generation.py: "a reply is finished exactly
    once, even if two workers ran it (the second CAS fails)"). Whatever ends the reply, its
    clients must be able to trust the stream: after the last reset, the deltas add up to the
    final text, and no delta follows the end."""
    settings = make_settings(WORKER_IN_API=False)
    async with app_client(create_app(settings, backend=backend)) as http:
        headers = auth(settings, "alice")
        cid = (await http.post("/conversations", json={}, headers=headers)).json()["id"]
        sent = await http.post(
            f"/conversations/{cid}/messages", json={"content": "hi"}, headers=headers
        )
        reply_id = sent.json()["reply_message_id"]

    stale, fresh = _Gated("a1 ", "a2"), _Gated("b1 ", "b2")
    a = asyncio.create_task(ReplyWriter(backend.store, stale, settings).write(cid, reply_id))
    await asyncio.wait_for(_until_delta(backend, cid, reply_id, "a1 "), EVENT_TIMEOUT)
    b = asyncio.create_task(ReplyWriter(backend.store, fresh, settings).write(cid, reply_id))
    await asyncio.wait_for(_until_delta(backend, cid, reply_id, "b1 "), EVENT_TIMEOUT)
    stale.gate.set()  # A resumes
    await asyncio.wait_for(a, EVENT_TIMEOUT)
    fresh.gate.set()
    await asyncio.wait_for(b, EVENT_TIMEOUT)

    final = await backend.store.get_message(cid, None, reply_id)
    stored = [
        (e.type, orjson.loads(e.data)) for e in await backend.store.read_events(cid, None, 1000)
    ]
    mine = _of(stored, reply_id)
    story = [(t, d.get("delta", (d.get("message") or {}).get("content"))) for t, d in mine]
    types = [t for t, _ in mine]
    last_reset = max(
        i
        for i, (t, d) in enumerate(mine)
        if t == event_types.MESSAGE_UPDATED and d["message"]["content"] == ""
    )
    streamed = "".join(d["delta"] for t, d in mine[last_reset:] if t == event_types.MESSAGE_DELTA)
    assert final.content == streamed, f"final {final.content!r}, clients saw {story}"
    assert types.count(event_types.MESSAGE_COMPLETED) == 1, story
    assert types[-1] == event_types.MESSAGE_COMPLETED, f"events after the end: {story}"
    assert final.content in ("a1 a2", "b1 b2"), story
