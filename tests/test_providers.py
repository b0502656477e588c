"""What the service sends to an OpenAI-compatible server: only what is configured, in a shape every
such server accepts; replies through llama-cpp-python's real server (a tiny model of our own)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlparse

import anthropic
import httpx
import openai
import pytest
from testkit.fake_anthropic import FakeAnthropic, FakeAnthropicServer
from testkit.fake_llm import FakeLLM, FakeLLMServer
from testkit.ports import free_port

from conversational_core.app import create_app
from conversational_core.replies.providers.anthropic import AnthropicProvider
from conversational_core.replies.providers.base import ChatMessage, CompletionRequest, endpoint_url
from conversational_core.replies.providers.openai import OpenAIProvider, default_max_tokens_param
from conversational_core.settings import Settings
from conversational_core.storage.base import Store
from conversational_core.storage.factory import Backend
from tests.conftest import make_settings
from tests.fixtures.app import auth
from tests.fixtures.live import collect_until_end, serve
from tests.fixtures.tcp import pipe
from tests.fixtures.tiny_gguf import REPLY, write_tiny_model


@pytest.fixture
def store(sqlite_store: Store) -> Store:
    """The provider is what is tested here: one store is enough."""
    return sqlite_store


async def _reply(api: httpx.AsyncClient, content: str, **conversation: object) -> dict[str, object]:
    cid = (await api.post("/conversations", json=conversation)).json()["id"]
    asked = await api.post(f"/conversations/{cid}/messages", json={"content": content})
    assert asked.status_code == 201, asked.text
    reply_id = asked.json()["reply_message_id"]
    events = await collect_until_end(api, f"/conversations/{cid}/events", {}, reply_id, after="0")
    reply: dict[str, object] = (await api.get(f"/conversations/{cid}/messages/{reply_id}")).json()
    deltas = "".join(
        e.data["delta"]
        for e in events
        if e.event == "message.delta" and e.data["message_id"] == reply_id
    )
    assert deltas == reply["content"]
    return reply


@pytest.fixture
async def strict_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLMServer(FakeLLM(rejects_nulls=True)) as fake:
        yield fake


@pytest.mark.parametrize("param", ["auto", "max_completion_tokens"])
async def test_requests_carry_only_what_is_configured(
    backend: Backend, strict_llm: FakeLLM, param: str
) -> None:
    settings = make_settings(
        LLM_PROVIDER="openai",
        LLM_BASE_URL=strict_llm.url,
        LLM_MODEL="fake-model",
        LLM_MAX_TOKENS_PARAM=param,
        LLM_MAX_RETRIES=0,
    )
    limit = "max_tokens" if param == "auto" else param  # auto: a local server knows max_tokens
    async with (
        serve(create_app(settings, backend=backend)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(settings, "alice"), timeout=20) as api,
    ):
        plain = await _reply(api, "Hello")
        assert plain["status"] == "completed", plain
        sent = strict_llm.requests[-1]
        assert set(sent) == {"model", "messages", "stream", "stream_options", limit}, sent
        assert sent[limit] == settings.LLM_MAX_OUTPUT_TOKENS

        tuned = await _reply(api, "Hello", temperature=0.3, max_tokens=50, model="other")
        assert tuned["status"] == "completed", tuned
        sent = strict_llm.requests[-1]
        assert set(sent) == {"model", "messages", "stream", "stream_options", limit, "temperature"}
        assert (sent["model"], sent["temperature"], sent[limit]) == ("other", 0.3, 50)


@pytest.fixture
async def forward_proxy() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An HTTP forward proxy, as HTTP_PROXY names one: it takes requests in absolute form
    (`POST http://host:port/path`), sends each connection's bytes on to 127.0.0.1 at the
    port the first request names, and keeps the request lines it forwarded."""
    seen: list[bytes] = []

    async def handle(client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        head = await client_in.readuntil(b"\r\n")
        seen.append(head.rstrip())
        port = urlparse(head.split(b" ")[1].decode()).port
        upstream_in, upstream_out = await asyncio.open_connection("127.0.0.1", port)
        upstream_out.write(head)
        await asyncio.gather(pipe(client_in, upstream_out), pipe(upstream_in, client_out))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", seen


async def test_the_model_is_reached_through_the_proxy_the_environment_names(
    strict_llm: FakeLLM, forward_proxy: tuple[str, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment reaches its provider through an egress proxy named by HTTP(S)_PROXY: the
    SDK's aiohttp transport honours it as its httpx transport did (here the model's host is
    a name only the proxy can reach)."""
    proxy, seen = forward_proxy
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    port = urlparse(strict_llm.url).port
    provider = OpenAIProvider(api_key="key", base_url=f"http://model.invalid:{port}/v1", timeout=10)
    request = CompletionRequest("fake-model", [ChatMessage("user", "Hello")], None, 50)
    try:
        items = [item async for item in provider.stream(request)]
    finally:
        await provider.close()
    assert "".join(i for i in items if isinstance(i, str)) == strict_llm.text()
    assert seen == [f"POST http://model.invalid:{port}/v1/chat/completions HTTP/1.1".encode()]


async def _headers_sent(provider: OpenAIProvider | AnthropicProvider) -> None:
    request = CompletionRequest("fake-model", [ChatMessage("user", "Hello")], None, 50)
    try:
        assert [item async for item in provider.stream(request)]
    finally:
        await provider.close()


def _telemetry(headers: dict[str, str]) -> set[str]:
    return {name for name in headers if name.startswith("x-stainless-")}


async def test_requests_carry_the_sdks_headers_but_not_its_telemetry(strict_llm: FakeLLM) -> None:
    """What a model server is sent: each SDK's credentials, user agent and read timeout, not
    its telemetry (X-Stainless-*: its version, the OS, the architecture, the runtime, the retry
    count), which no server acts on and which cost every reply's request a worker's CPU."""
    await _headers_sent(OpenAIProvider(api_key="key", base_url=strict_llm.url, timeout=10))
    sent = strict_llm.headers[-1]
    assert sent["authorization"] == "Bearer key"
    assert sent["content-type"] == "application/json"
    assert sent["user-agent"].startswith("AsyncOpenAI/Python ")
    assert _telemetry(sent) == {"x-stainless-read-timeout"}
    async with FakeAnthropicServer(FakeAnthropic()) as claude:
        await _headers_sent(AnthropicProvider(api_key="key", base_url=claude.url, timeout=10))
    sent = claude.headers[-1]
    # (the key where the SDK puts it: `x-api-key`, or a bearer token as this release does)
    assert "key" in (sent.get("x-api-key"), sent.get("authorization", "").removeprefix("Bearer "))
    assert sent["content-type"] == "application/json"
    assert sent["user-agent"].startswith("AsyncAnthropic/Python ")
    assert "anthropic-version" in sent
    assert _telemetry(sent) <= {"x-stainless-read-timeout", "x-stainless-timeout"}


def test_the_output_limit_is_named_for_the_server() -> None:
    assert default_max_tokens_param(None) == "max_completion_tokens"  # OpenAI itself
    assert default_max_tokens_param("https://api.openai.com/v1") == "max_completion_tokens"
    assert default_max_tokens_param("https://x.openai.azure.com/") == "max_completion_tokens"
    for local in ("http://127.0.0.1:8080/v1", "http://localhost:11434/v1", "http://vllm:8000"):
        assert default_max_tokens_param(local) == "max_tokens"


# --- llama-cpp-python's OpenAI-compatible server ---------------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` with a tiny model written by the test (no download)."""
    model = write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--model_alias",
            "tiny",
            "--chat_format",
            "chatml",
            "--n_ctx",
            "2048",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:  # a process we spawned: polled, there is no event to await
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start in 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture
def llama_settings(llama_server: str) -> Settings:
    return make_settings(
        LLM_PROVIDER="openai",
        LLM_BASE_URL=llama_server,
        LLM_MODEL="tiny",
        LLM_CONTEXT_TOKENS=2048,
        LLM_MAX_OUTPUT_TOKENS=64,
        LLM_MAX_RETRIES=0,
    )


async def test_replies_complete_through_llama_cpp_python(
    backend: Backend, llama_settings: Settings
) -> None:
    async with (
        serve(create_app(llama_settings, backend=backend)) as base,
        httpx.AsyncClient(base_url=base, headers=auth(llama_settings, "alice"), timeout=60) as api,
    ):
        # No temperature configured: before, `"temperature": null` failed every reply here.
        first = await _reply(api, "Count for me, please.")
        assert first["status"] == "completed", first
        assert first["content"] == REPLY
        # That server reports no usage: the reply carries an estimate, marked as one.
        usage = first["usage"]
        assert isinstance(usage, dict) and usage["output_tokens"] > 0, usage
        context = first["context"]
        assert isinstance(context, dict) and context["usage_estimated"] is True

        tuned = await _reply(api, "Again", temperature=0.5, max_tokens=3, system_prompt="Be brief.")
        assert tuned["status"] == "completed", tuned
        assert tuned["content"] == " one two three"  # max_tokens reached the model


@pytest.mark.parametrize(
    "base_url",
    [
        None,
        "http://h:1",
        "http://h:1/",
        "http://h:1/v1",
        "https://gw.example/a/b/",
        "http://[::1]:8/x",
    ],
)
@pytest.mark.parametrize("path", ["/chat/completions", "/v1/messages"])
def test_the_endpoint_made_once_is_the_one_the_sdk_would_make_per_request(
    base_url: str | None, path: str
) -> None:
    """The providers give the SDK an absolute URL made once (endpoint_url); it must be the URL
    the SDK itself joins from its base URL and the path on every request."""
    for client in (
        openai.AsyncOpenAI(api_key="x", base_url=base_url),
        anthropic.AsyncAnthropic(api_key="x", base_url=base_url),
    ):
        assert endpoint_url(client, path) == str(client._prepare_url(path))
