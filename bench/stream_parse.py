"""`PYTHONPATH=src python -m bench.stream_parse`: the worker's CPU per token when it reads a
model's stream, each official SDK's stream beside the provider's own reading of the raw events,
in one run:

- `openai`: the SDK's `chat.completions.create(stream=True)` (a pydantic model per chunk) and
  providers/openai.py, from the fake OpenAI-protocol server (testkit/fake_llm.py): replies of
  TOKENS tokens;
- `anthropic`: the SDK's `messages.stream` helper (a pydantic event per event, and a snapshot of
  the whole message updated on each) and providers/anthropic.py, from the fake Messages API
  server (testkit/fake_anthropic.py): replies of 500 pieces of text and a tool call's input in
  500 pieces.

Each server runs in a process of its own, so that its CPU is not counted, over real HTTP: ROUNDS
alternating rounds of REPLIES replies each, sent as fast as the server can. The figure is this
process's CPU time (`time.process_time`) per token (piece), median of the rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import anthropic
import httpx
import openai
from testkit.ports import free_port

from conversational_core.replies.providers.anthropic import AnthropicProvider
from conversational_core.replies.providers.base import (
    ChatMessage,
    CompletionRequest,
    Piece,
    Provider,
)
from conversational_core.replies.providers.openai import OpenAIProvider

TOKENS = 500
REPLIES = 20
ROUNDS = 5


async def _sdk(client: openai.AsyncOpenAI) -> int:
    stream = await client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                tokens += 1
    return tokens


async def _sdk_anthropic(client: anthropic.AsyncAnthropic) -> int:
    pieces = 0
    async with client.messages.stream(
        model="fake", max_tokens=4000, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                pieces += 1
    return pieces


async def _ours(provider: Provider) -> int:
    request = CompletionRequest("fake", [ChatMessage("user", "hi")], None, 4000)
    pieces = 0
    async for item in provider.stream(request):
        if isinstance(item, (str, Piece)):
            pieces += 1
    return pieces


async def _cpu_per_token(read: Callable[[], Awaitable[int]]) -> float:
    started = time.process_time()
    tokens = 0
    for _ in range(REPLIES):
        tokens += await read()
    return (time.process_time() - started) / tokens * 1e6


def _serve(app: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning"]
    )


async def _wait_up(url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            try:
                await http.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)  # the server is starting


async def _side_by_side(
    sdk: Callable[[], Awaitable[int]], ours: Callable[[], Awaitable[int]]
) -> tuple[float, float]:
    await sdk()
    await ours()  # warm both up
    sdk_us: list[float] = []
    ours_us: list[float] = []
    for _ in range(ROUNDS):
        sdk_us.append(await _cpu_per_token(sdk))
        ours_us.append(await _cpu_per_token(ours))
    return statistics.median(sdk_us), statistics.median(ours_us)


async def main() -> None:
    port, anthropic_port = free_port(), free_port()
    servers = [
        _serve("testkit.fake_llm:bench_app", port),
        _serve("testkit.fake_anthropic:bench_app", anthropic_port),
    ]
    base = f"http://127.0.0.1:{port}"
    anthropic_base = f"http://127.0.0.1:{anthropic_port}"
    try:
        await _wait_up(f"{anthropic_base}/")
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                try:
                    await http.put(f"{base}/fake/config", json={"first_delay_ms": 0,
                                   "tokens": TOKENS, "token_delay_ms": 0})  # fmt: skip
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)  # the server is starting
        sdk = openai.AsyncOpenAI(api_key="x", base_url=f"{base}/v1", max_retries=0)
        ours = OpenAIProvider(api_key="x", base_url=f"{base}/v1", timeout=30)
        a, b = await _side_by_side(lambda: _sdk(sdk), lambda: _ours(ours))
        await sdk.close()
        await ours.close()
        sdk_a = anthropic.AsyncAnthropic(api_key="x", base_url=anthropic_base, max_retries=0)
        ours_a = AnthropicProvider(api_key="x", base_url=anthropic_base, timeout=30)
        c, d = await _side_by_side(lambda: _sdk_anthropic(sdk_a), lambda: _ours(ours_a))
        await sdk_a.close()
        await ours_a.close()
    finally:
        for server in servers:
            server.terminate()
            server.wait()
    print(f"Reading a model's stream, worker CPU per token ({ROUNDS} rounds of {REPLIES} replies "
          f"each, medians):")  # fmt: skip
    print(f"  openai SDK stream (a model per chunk)        {a:6.1f} us")
    print(f"  raw events + msgspec (providers/openai)      {b:6.1f} us   ({a / b:.1f}x less)")
    print(f"  anthropic SDK messages.stream (snapshots)    {c:6.1f} us")
    print(f"  raw events + orjson (providers/anthropic)    {d:6.1f} us   ({c / d:.1f}x less)")


if __name__ == "__main__":
    asyncio.run(main())
