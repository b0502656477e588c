"""The relay under load (issue 12): deltas batched while a worker writes several replies still
concatenate to exactly each part (text, reasoning, tool calls); a cancel still stops the model's
stream at once; replies are admitted in order, never more at once than the worker takes, and a
worker whose event loop falls behind admits none until it catches up.

The worker killed in the middle of several batched replies: tests/test_worker_process.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from testkit.fake_llm import FakeLLM, Reply, tag_message, tool_call_deltas

from conversational_core.replies.worker import LoopLag
from conversational_core.settings import Settings
from tests.fixtures.live import SseEvent, collect_until_end
from tests.fixtures.replies import ask, deltas, llm_settings, new_conversation, wait_end
from tests.test_api_tools import TIME, WEATHER, assert_deltas_make_the_parts

CONCURRENCY = 3
EVENT_TIMEOUT = 20.0


@pytest.fixture
def settings(llm: FakeLLM) -> Settings:
    # Admission by loop lag has its test below (LoopLag); here only WORKER_CONCURRENCY limits
    # what the worker takes, however busy the machine running the tests is.
    return llm_settings(
        llm, WORKER_CONCURRENCY=CONCURRENCY, DELTA_BATCH_MS=40, WORKER_MAX_LAG_MS=10_000
    )


def _busy_reply(n: int) -> tuple[Reply, list[dict[str, Any]]]:
    """A reply that thinks, writes and calls two tools, in many small pieces a few ms apart;
    and the parts it must end with."""
    thinking = [f"hm{n}.{i} " for i in range(8)]
    text = [f"w{n}.{i} " for i in range(8)]
    calls = [(f"call_{n}a", "get_weather", '{"city": "Lisbon"}'), (f"call_{n}b", "get_time", "{}")]
    raw = [
        *({"reasoning_content": t} for t in thinking),
        *({"content": t} for t in text),
        *tool_call_deltas(calls, pieces=6),
    ]
    parts = [
        {"type": "reasoning", "text": "".join(thinking)},
        {"type": "text", "text": "".join(text)},
        *({"type": "tool_call", "id": i, "name": name, "arguments": a} for i, name, a in calls),
    ]
    return Reply([], deltas=raw, delay=0.003, finish="tool_calls"), parts


async def test_batched_deltas_concatenate_exactly_to_every_part(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    replies = [_busy_reply(n) for n in range(8)]
    # The model is asked in an order of the workers' choosing: the same reply for everyone,
    # told apart by the conversation's number in each piece, is not possible; so every reply
    # gets its own script entry and is matched by its text afterwards.
    llm.script = [reply for reply, _ in replies]
    expected = {parts[1]["text"]: parts for _, parts in replies}
    cids = [await new_conversation(api, tools=[WEATHER, TIME]) for _ in replies]
    asked = [(cid, await ask(api, cid, "go")) for cid in cids]
    ended = await asyncio.wait_for(
        asyncio.gather(*(wait_end(api, cid, rid) for cid, rid in asked)), EVENT_TIMEOUT
    )
    pieces = sum(len(reply.deltas or ()) for reply, _ in replies)
    delta_events = 0
    for (_, reply_id), events in zip(asked, ended, strict=True):
        assert events[-1].event == "message.requires_action", events[-1]
        message = events[-1].data["message"]
        assert message["parts"] == expected[message["parts"][1]["text"]]
        assert_deltas_make_the_parts(events, message)
        delta_events += sum(
            1 for e in events if e.event == "message.delta" and e.data["message_id"] == reply_id
        )
    # Written beside each other, the replies' pieces went out batched: fewer deltas than
    # pieces (one per piece without batching; a tool call's first piece names it and has no
    # text, so a reply publishes at most 28 deltas).
    assert delta_events < pieces * 0.8, (delta_events, pieces)


async def test_a_cancel_stops_a_batched_reply_at_once(api: httpx.AsyncClient, llm: FakeLLM) -> None:
    # Three long replies at once (deltas batched); the first is cancelled while it streams.
    long = [Reply([f"x{i} " for i in range(400)], delay=0.005) for _ in range(CONCURRENCY)]
    llm.script = list(long)
    cids = [await new_conversation(api) for _ in long]
    asked = [(cid, await ask(api, cid, "go")) for cid in cids]
    cid, reply_id = asked[0]
    seen = await asyncio.wait_for(
        collect_until_end(
            api, f"/conversations/{cid}/events", {}, reply_id, after="0", until_chars=20
        ),
        EVENT_TIMEOUT,
    )
    assert deltas(seen, reply_id)
    cancelled = await api.post(f"/conversations/{cid}/messages/{reply_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    # The model's stream closes long before the 2 s it would still take: the worker sees the
    # cancel at its next delta (within one batch window).
    await asyncio.wait_for(llm.aborted.wait(), 1.5)
    assert llm.streams_aborted == 1
    events = await wait_end(api, cid, reply_id)
    assert events[-1].event == "message.cancelled"
    content = events[-1].data["message"]["content"]
    assert content == deltas(events, reply_id)  # exactly what its clients received
    assert len(content) < len(llm.text(long[0]))
    for other_cid, other_id in asked[1:]:
        events = await asyncio.wait_for(wait_end(api, other_cid, other_id), EVENT_TIMEOUT)
        assert events[-1].event == "message.completed"
        assert deltas(events, other_id) == llm.text(long[1])


async def test_replies_are_admitted_in_order_and_no_more_than_the_worker_takes(
    api: httpx.AsyncClient, llm: FakeLLM
) -> None:
    replies = [Reply([f"r{n}.{i} " for i in range(15)], delay=0.004) for n in range(7)]
    llm.script = list(replies)
    cids = [await new_conversation(api) for _ in replies]
    asked = []
    for n, cid in enumerate(cids):  # one after the other: their order is the queue's
        asked.append((cid, await ask(api, cid, tag_message(f"q{n}", f"question {n}"))))

    async def completed_at(cid: str, reply_id: str) -> tuple[list[SseEvent], float]:
        events = await wait_end(api, cid, reply_id)
        return events, time.time()

    ended = await asyncio.wait_for(
        asyncio.gather(*(completed_at(cid, rid) for cid, rid in asked)), EVENT_TIMEOUT
    )
    texts = {llm.text(r) for r in replies}
    for n, (events, at) in enumerate(ended):
        assert events[-1].event == "message.completed"
        assert events[-1].data["message"]["content"] in texts
        # Admitted, a reply streams at the model's pace, the waiting ones notwithstanding: its
        # client has it all moments after the model wrote its last byte (wait_end reads the
        # stream from its start: the completion is seen at most as late as it happened).
        assert at - llm.first_tokens[f"q{n}"]["done"] < 0.5, (n, at, llm.first_tokens)
    # Never more streams at once than the worker admits; the first admitted are the first
    # asked (the rest waited in the queue rather than all slowing down together).
    assert llm.most_open_streams == CONCURRENCY
    asked_order = [_question(body) for body in llm.requests]
    first = {tag_message(f"q{n}", f"question {n}") for n in range(CONCURRENCY)}
    assert set(asked_order[:CONCURRENCY]) == first
    assert len(set(asked_order)) == len(replies)


def _question(body: dict[str, Any]) -> str:
    return str(next(m for m in reversed(body["messages"]) if m["role"] == "user")["content"])


async def test_a_worker_whose_loop_falls_behind_admits_nothing_until_it_catches_up() -> None:
    lag = LoopLag(limit_ms=20)
    probe = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(LoopLag.PERIOD * 2)  # the probe's first turns
        assert lag.calm.is_set()
        for _ in range(3):
            time.sleep(0.1)  # CPU-bound work holding the event loop (the probe fires late)
            await asyncio.sleep(0)
            await asyncio.sleep(LoopLag.PERIOD * 2)
        assert not lag.calm.is_set()
        await asyncio.wait_for(lag.calm.wait(), 5)  # the loop is free again: admission resumes
        assert lag.lag < 0.02
    finally:
        probe.cancel()
