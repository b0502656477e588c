"""`PYTHONPATH=src python -m bench.stream_parse`: the worker's CPU per token when it reads a
model's stream, the official `openai` SDK's stream (a pydantic model per chunk) beside the
provider's own reading of the raw events (providers/openai.py), in one run.

Both read the same replies from the fake OpenAI-protocol server (testkit/fake_llm.py, in a
process of its own so that its CPU is not counted) over real HTTP: ROUNDS alternating rounds of
REPLIES replies of TOKENS tokens each, sent as fast as the server can. The figure is this
process's CPU time (`time.process_time`) per token, median of the rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
import openai
from testkit.ports import free_port

from conversational_core.replies.providers.base import ChatMessage, CompletionRequest
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


async def _ours(provider: OpenAIProvider) -> int:
    request = CompletionRequest("fake", [ChatMessage("user", "hi")], None, 100)
    tokens = 0
    async for item in provider.stream(request):
        if isinstance(item, str):
            tokens += 1
    return tokens


async def _cpu_per_token(read: Callable[[], Awaitable[int]]) -> float:
    started = time.process_time()
    tokens = 0
    for _ in range(REPLIES):
        tokens += await read()
    return (time.process_time() - started) / tokens * 1e6


async def main() -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "testkit.fake_llm:bench_app", "--port", str(port),
         "--log-level", "warning"],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
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
        await _sdk(sdk)
        await _ours(ours)  # warm both up
        sdk_us: list[float] = []
        ours_us: list[float] = []
        for _ in range(ROUNDS):
            sdk_us.append(await _cpu_per_token(lambda: _sdk(sdk)))
            ours_us.append(await _cpu_per_token(lambda: _ours(ours)))
        await sdk.close()
        await ours.close()
    finally:
        server.terminate()
        server.wait()
    a, b = statistics.median(sdk_us), statistics.median(ours_us)
    print(f"Reading a model's stream, worker CPU per token ({ROUNDS} rounds of {REPLIES} replies "
          f"x {TOKENS} tokens, medians):")  # fmt: skip
    print(f"  openai SDK stream (a model per chunk)   {a:6.1f} us")
    print(f"  raw events + orjson (providers/openai)  {b:6.1f} us   ({a / b:.1f}x less)")


if __name__ == "__main__":
    asyncio.run(main())
