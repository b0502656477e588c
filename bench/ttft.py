"""Benchmark 4: what does the service add to the time to first token of an AI reply?

Set-up: Redis, the API with WORKER_IN_API=false, one reply worker as its own process
(`python run.py worker`, same environment) and the fake OpenAI-compatible server
(`testkit/fake_llm.py`, its own process; LLM_PROVIDER=openai, so the worker talks to it through the
real `openai` SDK over HTTP). The fake model waits FIRST_DELAY_MS, then sends TOKENS tokens
TOKEN_DELAY_MS apart, and records the wall-clock time (`time.time()`) at which it handed the
first token to the kernel.

What it measures: SAMPLES replies, one at a time, rotating over CONVERSATIONS conversations whose
event streams (`GET /conversations/{id}/events`) were opened before anything is posted and stay
open. For each reply the client posts a user message (respond=true, tagged so that the fake model
knows which request is which), reads the event stream and records when the first `message.delta`
of that reply arrived. Overhead = client's first-delta time - provider's first-token send time:
provider → worker (openai SDK) → Redis (the delta script's XADD) → the API's event reader
(pub/sub) → the event stream response (replies/sse.py) → client. Same machine, same clock.
Goals: p50 ≤ 5 ms, p99 ≤ 20 ms.

Honesty about the client: each stream is read by its own thread (bench/sse.py) with the kernel's
receive timestamp (SO_TIMESTAMPNS) beside the time the thread had the bytes. The headline figure
uses the thread's time (client cost included, the conservative side); the kernel-timestamp figure
and the difference (the client's own share) are reported beside it.

Breakdown (approximate): the event's id is the Redis stream entry id, whose first part is the
millisecond at which Redis ran the XADD. With it the overhead splits into provider → XADD (the
worker's share) and XADD → client (the API's share), each to ±1 ms per sample (the medians use
the middle of the millisecond). The fake model also records when each request arrived, which
gives the service's time from the POST to the provider request (queue, worker pick-up, prompt),
shown for the first and the last quarter of the samples: each reply adds two messages to its
conversation, so the prompt grows from a few messages to about a hundred.

The run (bench/run.py) measures it twice: with nothing else connected, and again while the
1,000 clients of the fan-out benchmark (bench/fanout.py) are connected and idle.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any

import orjson
from testkit.fake_llm import reply_text, tag_message

from bench.client import RawClient
from bench.sse import COMPLETED, ThreadedSseReader

SAMPLES = 200
WARMUP = 20
CONVERSATIONS = 4
FIRST_DELAY_MS = 20.0
TOKENS = 10
TOKEN_DELAY_MS = 2.0
REPLY_TIMEOUT = 15.0
GOAL_P50_MS = 5.0
GOAL_P99_MS = 20.0


def percentile(values: list[float], q: float) -> float:
    """Nearest rank on the sorted values (as in bench/scaling.py): p99 of 200 is the 198th."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(values),
        "p90_ms": percentile(values, 0.90),
        "p99_ms": percentile(values, 0.99),
        "max_ms": max(values),
        "mean_ms": statistics.fmean(values),
    }


@dataclass(frozen=True, slots=True)
class Sample:
    """One reply's times, all `time.time()` seconds except `xadd_ms` (Redis' millisecond)."""

    posted: float  # the client sent the POST
    provider_received: float  # the fake model had read the request
    provider_first_token: float  # the fake model had written its first token
    xadd_ms: int  # the delta's stream entry id, first part
    kernel: float  # the first delta's bytes reached the client's socket (kernel timestamp)
    seen: float  # the client's reading thread had them
    parsed: float  # and had parsed them
    history: int  # messages in the conversation, the new one included (the prompt's size)

    @property
    def xadd_mid_ms(self) -> float:
        """The middle of the millisecond in which Redis ran the XADD."""
        return self.xadd_ms + 0.5

    @property
    def overhead_ms(self) -> float:
        return (self.seen - self.provider_first_token) * 1000

    @property
    def overhead_kernel_ms(self) -> float:
        return (self.kernel - self.provider_first_token) * 1000


@dataclass
class TtftResult:
    samples: list[Sample]
    setup: str

    def _of(self, value: Any) -> list[float]:
        return [value(s) for s in self.samples]

    @property
    def overhead(self) -> dict[str, float]:
        return stats(self._of(lambda s: s.overhead_ms))

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": {
                "samples": len(self.samples),
                "warmup": WARMUP,
                "conversations": CONVERSATIONS,
                "provider_first_delay_ms": FIRST_DELAY_MS,
                "tokens": TOKENS,
                "token_delay_ms": TOKEN_DELAY_MS,
                "setup": self.setup,
            },
            "overhead": self.overhead,
            "overhead_kernel_timestamp": stats(self._of(lambda s: s.overhead_kernel_ms)),
            "client_share": {
                "kernel_to_thread": stats(self._of(lambda s: (s.seen - s.kernel) * 1000)),
                "parse": stats(self._of(lambda s: (s.parsed - s.seen) * 1000)),
            },
            "breakdown_approx_1ms": {
                "provider_to_redis_xadd": stats(
                    self._of(lambda s: s.xadd_mid_ms - s.provider_first_token * 1000)
                ),
                "redis_xadd_to_client_socket": stats(
                    self._of(lambda s: s.kernel * 1000 - s.xadd_mid_ms)
                ),
            },
            "post_to_provider_request": stats(
                self._of(lambda s: (s.provider_received - s.posted) * 1000)
            ),
            "post_to_provider_request_by_history": self.by_history(),
            "post_to_first_delta": stats(self._of(lambda s: (s.seen - s.posted) * 1000)),
            "goal_p50_ms": GOAL_P50_MS,
            "goal_p99_ms": GOAL_P99_MS,
        }

    def by_history(self) -> dict[str, dict[str, Any]]:
        """POST -> provider request for the first and the last quarter of the samples, whose
        conversations are shortest and longest (the prompt grows by two messages a reply)."""
        quarter = max(1, len(self.samples) // 4)
        parts = {"first_quarter": self.samples[:quarter], "last_quarter": self.samples[-quarter:]}
        return {
            name: {
                "history_messages": [min(s.history for s in part), max(s.history for s in part)],
                **stats([(s.provider_received - s.posted) * 1000 for s in part]),
            }
            for name, part in parts.items()
        }


def configure_llm(
    llm: RawClient, first_delay_ms: float, tokens: int, token_delay_ms: float
) -> None:
    config = {"first_delay_ms": first_delay_ms, "tokens": tokens, "token_delay_ms": token_delay_ms}
    llm.call("PUT", "/fake/config", json=config)
    llm.call("DELETE", "/fake/first-tokens", expected=204)


def measure(
    port: int, token: str, llm_port: int, conversations: list[str], setup: str
) -> TtftResult:
    """`conversations`: CONVERSATIONS fresh conversations of the token's user; `setup` says
    what runs (for the report)."""
    expected = reply_text(TOKENS)
    readers = [ThreadedSseReader(port, cid, token) for cid in conversations]
    # tag -> (time posted, reply id, reader, messages in the conversation)
    posted: dict[str, tuple[float, str, ThreadedSseReader, int]] = {}
    try:
        with RawClient(llm_port) as llm:
            configure_llm(llm, FIRST_DELAY_MS, TOKENS, TOKEN_DELAY_MS)
        with RawClient(port) as api:
            gc.collect()
            gc.disable()  # no collection pause of the client inside a sample
            try:
                for i in range(-WARMUP, SAMPLES):
                    reader = readers[i % len(readers)]
                    tag = f"ttft{i + WARMUP}"
                    path = f"/conversations/{reader.conversation_id}/messages"
                    body = {"content": tag_message(tag)}
                    sent = time.time()
                    created = orjson.loads(
                        api.call("POST", path, token=token, json=body, expected=201)
                    )
                    reply_id = created["reply_message_id"]
                    if reply_id is None:
                        raise RuntimeError(f"no reply_message_id in {created}")
                    trace = reader.wait_reply(reply_id, REPLY_TIMEOUT)
                    content = (trace.final_message or {}).get("content")
                    if trace.final_type != COMPLETED or "".join(trace.deltas) != expected:
                        raise RuntimeError(
                            f"reply {reply_id} ended {trace.final_type} with deltas "
                            f"{''.join(trace.deltas)!r} and content {content!r}"
                        )
                    if content != expected:
                        raise RuntimeError(f"reply {reply_id}: completed content {content!r}")
                    if i >= 0:
                        history = 2 * ((i + WARMUP) // len(readers)) + 1
                        posted[tag] = (sent, reply_id, reader, history)
            finally:
                gc.enable()
        with RawClient(llm_port) as llm:  # a new connection: the first one has idled out
            provider: dict[str, dict[str, float]] = orjson.loads(
                llm.call("GET", "/fake/first-tokens")
            )
    finally:
        for reader in readers:
            reader.close()

    samples = []
    for tag, (sent, reply_id, reader, history) in posted.items():
        times = provider.get(tag)
        first = reader.replies[reply_id].first_delta
        if times is None or "first_token" not in times or first is None:
            raise RuntimeError(f"no provider or client time for {tag} (reply {reply_id})")
        samples.append(
            Sample(
                posted=sent,
                provider_received=times["received"],
                provider_first_token=times["first_token"],
                xadd_ms=int(first.event_id.split("-", 1)[0]),
                kernel=first.kernel if first.kernel is not None else first.seen,
                seen=first.seen,
                parsed=first.parsed,
                history=history,
            )
        )
    return TtftResult(samples, setup)
