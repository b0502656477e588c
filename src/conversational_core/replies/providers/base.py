"""The provider interface: stream a chat completion as pieces of its parts (text, reasoning,
tool calls), then its token usage. Requests are built from typed parts (storage/models.py):
a provider turns them into its own format, and refuses (ProviderError, not retryable) a part it
cannot take, so that the reply ends `failed` with a readable error.

Only `replies/providers/` knows an LLM SDK. Providers make one attempt: retries (with backoff,
honouring Retry-After) are the worker's, so that every provider retries alike and only before
the first token has reached users.
"""

from __future__ import annotations

import contextlib
import email.utils
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Hashable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import httpx2
import orjson

from conversational_core.storage.models import Part, text_parts


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a prompt. `parts`: text and file (system, user), reasoning, text and
    tool_call (assistant), tool_result (tool); by default one text part of `content`."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    parts: list[Part] | None = None

    def all_parts(self) -> list[Part]:
        return self.parts if self.parts is not None else text_parts(self.content)


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    messages: list[ChatMessage]
    temperature: float | None
    max_tokens: int
    # Client-side tools ({"name", "description", "parameters"}) and the choice among them
    # ("auto", "none", "required" or a tool's name); None: no tools.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | None = None


@dataclass(frozen=True, slots=True)
class Piece:
    """A piece of the reply being written, beside plain text (a `str`): a piece of a part of
    `type` (text, reasoning, tool_call). `key` tells the parts of the reply apart (a provider's
    content-block or tool-call index): a piece with the key of the part before it continues
    that part (a tool call also when other parts came between). A tool call's first piece has
    its `id` and `name`, then `text` pieces of its arguments; `provider_data` (a reasoning
    part's signature, say) is kept on the part and sent back only to this provider."""

    type: str
    text: str = ""
    key: Hashable = None
    id: str | None = None
    name: str | None = None
    provider_data: dict[str, Any] | None = None


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")


def is_image(part: Part) -> bool:
    """Whether a file part is an image (by its mime type, its data: URL, or its name)."""
    mime = part.get("mime_type") or ""
    url: str = part["url"]
    if mime:
        return mime.startswith("image/")
    if url.startswith("data:"):
        return url.startswith("data:image/")
    return url.split("?", 1)[0].lower().endswith(_IMAGE_SUFFIXES)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }


class ProviderError(Exception):
    """A failed call. `message` is written for the user: never the provider's raw body."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


def unsupported(what: str, provider: str) -> ProviderError:
    """A part the provider cannot take: the reply fails with this (no retry can help)."""
    return ProviderError(f"The AI provider ({provider}) cannot take {what}.", retryable=False)


TITLE_INSTRUCTIONS = (
    "Write a title for the conversation that starts with the user's message below: at most "
    "six words saying what it is about, in the language of the message. Answer with the "
    "title alone, without quotes or a final period."
)
TITLE_MAX_TOKENS = 24


class Provider(ABC):
    name: str

    @abstractmethod
    def stream(self, request: CompletionRequest) -> AsyncIterator[str | Piece | Usage]:
        """Text deltas (`str`) and pieces of other parts as they arrive, then (when the
        provider reports it) one Usage.

        Raises ProviderError. Closing the iterator early (`aclose`) stops reading from the
        provider and closes the connection."""

    async def title(self, first_message: str, model: str) -> str:
        """A few words naming a conversation that starts with `first_message`, written by the
        model (a short completion of its own). Raises ProviderError."""
        request = CompletionRequest(
            model=model,
            messages=[
                ChatMessage("system", TITLE_INSTRUCTIONS),
                ChatMessage("user", first_message),
            ],
            temperature=None,
            max_tokens=TITLE_MAX_TOKENS,
        )
        parts: list[str] = []
        stream: Any = self.stream(request)  # an async generator (closed when done)
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, str):
                    parts.append(item)
                elif isinstance(item, Piece) and item.type == "text":
                    parts.append(item.text)
        return "".join(parts)

    async def close(self) -> None:  # noqa: B027 - optional hook; most providers hold a client
        """Release connections."""


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """`retry-after-ms`, or `Retry-After` as seconds or as an HTTP date."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def error_for_status(status: int, retry_after: float | None) -> ProviderError:
    """A readable error for an HTTP status from a provider (429 and 5xx are retryable)."""
    if status == 429:
        return ProviderError(
            "The AI provider is rate limiting requests; please try again later.",
            retryable=True,
            retry_after=retry_after,
            status=status,
        )
    if status >= 500:
        return ProviderError(
            "The AI provider is unavailable right now; please try again later.",
            retryable=True,
            retry_after=retry_after,
            status=status,
        )
    if status in (401, 403):
        message = "The AI provider refused the service's credentials."
    elif status == 404:
        message = "The AI model was not found at the provider."
    elif status == 413:
        message = "The conversation is too long for the AI model."
    else:
        message = "The AI provider rejected the request."
    return ProviderError(f"{message} (HTTP {status})", retryable=False, status=status)


TIMEOUT_ERROR = "The AI provider did not answer in time; please try again."
CONNECTION_ERROR = "The AI provider could not be reached; please try again later."
UNREADABLE = "The AI provider sent a response that could not be read."
# What reading an event of another shape than its protocol's raises (a field missing or of
# another type): the answer is UNREADABLE, as bytes that are not JSON.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError)


def translate_sdk_error(exc: Exception, sdk: ModuleType) -> ProviderError:
    """An error of an official provider SDK as a ProviderError. The `openai` and `anthropic`
    SDKs come from the same generator: the same error classes, by the same names."""
    if isinstance(exc, sdk.APIStatusError):
        return error_for_status(exc.status_code, retry_after_seconds(exc.response.headers))
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderError(TIMEOUT_ERROR, retryable=True)
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderError(CONNECTION_ERROR, retryable=True)
    return ProviderError(UNREADABLE, retryable=True)


def _data_value(line: bytes) -> bytes:
    value = line[5:]  # after "data:", and one space if there is one
    return value[1:] if value.startswith(b" ") else value


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event of a byte stream (comments, `event:` and other
    fields are skipped; the data lines of one event are joined with a newline, as the SSE
    specification says)."""
    buffer = b""
    lines: list[bytes] = []
    async for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if lines:
                    yield b"\n".join(lines)
                    lines = []
            elif line.startswith(b"data:"):
                lines.append(_data_value(line))
    if buffer.startswith(b"data:"):  # a last line without its line end
        lines.append(_data_value(buffer.rstrip(b"\r")))
    if lines:
        yield b"\n".join(lines)


async def stream_events(
    client: Any, path: str, body: dict[str, Any], sdk: ModuleType, sdk_error: type[Exception]
) -> AsyncGenerator[Any, None]:
    """The events of a streamed completion, each its JSON parsed with orjson, from a POST of
    `body` made through an official SDK's generic `post` (`client`: the SDK's async client,
    `sdk`: its module, `sdk_error`: its base error). Ends at OpenAI's `[DONE]` or at the end
    of the body; to be read inside `contextlib.aclosing` (the response is closed with it).

    Why not the SDKs' typed methods and streams: the typed `create` walks the messages against
    their TypedDicts (~11 ms of CPU for a 40-message history, measured) to change nothing in
    them, and their streams build a pydantic model per event (Anthropic's helper also a
    snapshot of the whole message), most of a token's worker CPU (bench/stream_parse.py). The
    SDK still makes the request: auth, base URL, headers, timeouts and its errors for HTTP
    statuses (ProviderError here, as the other failures: a cut or stalled stream, bytes that
    are not JSON). A caller fails an event of another shape than its protocol's (MALFORMED) as
    UNREADABLE.
    """
    try:
        response = cast(
            httpx2.Response,
            await client.post(
                path,
                cast_to=httpx2.Response,
                content=orjson.dumps(body),
                options={"headers": {"Content-Type": "application/json"}},
                stream=True,
                stream_cls=None,
            ),
        )
    except sdk_error as exc:
        raise translate_sdk_error(exc, sdk) from None
    try:
        async for data in sse_data(response.aiter_bytes()):
            if data == b"[DONE]":
                return
            yield orjson.loads(data)
    # (the SDKs' HTTP layer is httpx2, whose errors are not httpx's)
    except httpx2.TimeoutException:
        raise ProviderError(TIMEOUT_ERROR, retryable=True) from None
    except httpx2.HTTPError:
        raise ProviderError(CONNECTION_ERROR, retryable=True) from None
    except orjson.JSONDecodeError:
        raise ProviderError(UNREADABLE, retryable=True) from None
    finally:
        await response.aclose()
