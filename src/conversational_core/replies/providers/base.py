"""The provider interface: stream a chat completion as pieces of its parts (text, reasoning,
tool calls), then its token usage. Requests are built from typed parts (storage/models.py):
a provider turns them into its own format, and refuses (ProviderError, not retryable) a part it
cannot take, so that the reply ends `failed` with a readable error.

Only `replies/providers/` knows an LLM SDK. Providers make one attempt: retries (with backoff,
honouring Retry-After) are the worker's, so that every provider retries alike and only before
the first token has reached users.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar, cast

import aiohttp
import httpx2
import msgspec
import orjson

from conversational_core.replies.providers.sdk_options import request_options
from conversational_core.storage.models import Part, text_parts


@dataclass(slots=True)  # not frozen: made per prompt's message; frozen, each field costs 10x to set
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


@dataclass(slots=True)  # not frozen: made per piece of a reply; frozen, each field costs 10x to set
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


@dataclass(slots=True)  # not frozen: made per reply; frozen, each field costs 10x to set
class Usage:
    input_tokens: int
    output_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }


@dataclass(slots=True)  # not frozen: made per reply; frozen, each field costs 10x to set
class Stop:
    """Why the model stopped, when a user would want to know: `length` (it reached the output
    limit: the answer is cut) or `content_filter` (the provider withheld the rest)."""

    reason: str


# What a provider's stream yields: text, pieces of parts, the usage (last), why it stopped.
Item = str | Piece | Usage | Stop


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
_TITLE_MAX_READ = 1000  # characters of a title's answer read at most


class Provider(ABC):
    name: str

    @abstractmethod
    def stream(self, request: CompletionRequest) -> AsyncIterator[Item]:
        """Text deltas (`str`) and pieces of other parts as they arrive, then (when the
        provider reports it) one Usage.

        Raises ProviderError. Closing the iterator early (`aclose`) stops reading from the
        provider and closes the connection."""

    def reads(
        self, request: CompletionRequest, pace: Callable[[], float] = lambda: 0.0
    ) -> AsyncIterator[list[Item]]:
        """The items of :meth:`stream` in the groups they were read in: each list is what
        one read of the provider's connection held, everything the model wrote since the
        read before (at least one item). Under load the worker paces its reads (`pace()`:
        the seconds it waits between two; assembly.batched), so that a token costs no read,
        wakeup or await of its own; a provider that reads a connection itself leaves it
        unread meanwhile (the kernel gathers the model's writes). For the providers that do
        not override this, a task reads :meth:`stream` and each read hands over what it
        gathered since the one before."""
        return gathered(self.stream(request))

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
        size = 0
        stream: Any = self.stream(request)  # an async generator (closed when done)
        async with contextlib.aclosing(stream):
            async for item in stream:
                if isinstance(item, str):
                    parts.append(item)
                elif isinstance(item, Piece) and item.type == "text":
                    parts.append(item.text)
                else:
                    continue
                size += len(parts[-1])
                if size > _TITLE_MAX_READ:
                    break  # a server that ignores max_tokens: what a title needs is in
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
CUT_OFF = "The AI provider's answer was cut off; please try again."
UNREADABLE = "The AI provider sent a response that could not be read."
# What reading an event of another shape than its protocol's raises (a field missing or of
# another type): the answer is UNREADABLE, as bytes that are not JSON.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError)
# What a stream's decoder raises for an event that is not JSON, or (a typed decoder's
# ValidationError, a DecodeError) JSON of another shape than its protocol's.
UNDECODABLE = (orjson.JSONDecodeError, msgspec.DecodeError)


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


def endpoint_url(client: Any, path: str) -> str:
    """`path` joined to an SDK client's base URL as the SDK joins it on every request
    (`_prepare_url`: the base's raw path, then `path`), made once: given an absolute URL, the
    SDK takes it as it is instead of parsing and joining a path each time (~3% of a worker's
    CPU a reply, callgrind)."""
    base = client.base_url
    return str(base.copy_with(raw_path=base.raw_path + path.lstrip("/").encode()))


def _data_value(line: bytes) -> bytes:
    value = line[5:]  # after "data:", and one space if there is one
    return value[1:] if value.startswith(b" ") else value


# Bytes looked for as their values (`10 in data`): CPython 3.11's `bytes.__contains__` tries a
# bytes operand (`b"\n" in data`) as an integer first, and builds and drops a TypeError with its
# message before it searches: ~1,900 instructions (callgrind), 400 ns against 45 ns. Once a
# model's event here.
_LF, _CR = ord("\n"), ord("\r")


class SSEData:
    """The `data` of each server-sent event of a byte stream fed to it a read at a time
    (comments, `event:` and other fields are skipped; the data lines of one event are joined
    with a newline, as the SSE specification says; lines end in LF or CRLF). Synchronous, so
    that the events one read completed are parsed in one pass rather than with an await each;
    an event of one `data: ` line (a model's usual) is taken without looking at its lines.
    An event that grows past MAX_EVENT_BYTES without ending raises EventTooLong."""

    MAX_EVENT_BYTES = 1024 * 1024

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""  # the event not ended yet, as it came (LF line ends)

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of the events that `chunk` completed."""
        buffer = self._buffer + chunk
        if _CR in buffer:  # (a CR at the end stays: its LF may come in the next read)
            buffer = buffer.replace(b"\r\n", b"\n")
        *ended, self._buffer = buffer.split(b"\n\n")
        if len(self._buffer) > self.MAX_EVENT_BYTES:
            raise EventTooLong
        events: list[bytes] = []
        for event in ended:
            if event.startswith(b"data: ") and _LF not in event:
                events.append(event[6:])
            else:
                data = _event_data(event)
                if data is not None:
                    events.append(data)
        return events

    def end(self) -> list[bytes]:
        """The data of an event the stream ended in without its blank line."""
        data = _event_data(self._buffer.rstrip(b"\r\n"))
        self._buffer = b""
        return [] if data is None else [data]


class EventTooLong(ValueError):
    """A server-sent event longer than SSEData.MAX_EVENT_BYTES."""


def _event_data(event: bytes) -> bytes | None:
    """The data of one event's lines (None when it has none: a comment, say)."""
    lines = [
        _data_value(line.removesuffix(b"\r"))
        for line in event.split(b"\n")
        if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


class StreamEnd:
    """Whether a stream said that it ended (OpenAI's `[DONE]`, set by stream_events, or a
    choice's `finish_reason`, set by the OpenAI provider): a body that just stops is a cut,
    not an answer."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


async def stream_events(
    client: Any,
    path: str,
    body: dict[str, Any],
    sdk: ModuleType,
    sdk_error: type[Exception],
    pace: Callable[[], float],
    end: StreamEnd | None = None,
    decode: Callable[[bytes], Any] = orjson.loads,
) -> AsyncGenerator[list[Any], None]:
    """The events of a streamed completion, each its JSON parsed by `decode` (orjson's, or a
    typed decoder that builds only the fields read: providers/openai.py), from a POST of
    `body` made through an official SDK's generic `post` (`client`: the SDK's async client,
    `sdk`: its module, `sdk_error`: its base error): for each read of the response, the events
    it completed (a list; a read that completed none gives nothing). Ends at OpenAI's `[DONE]`
    or at the end of the body; to be read inside `contextlib.aclosing` (the response is closed
    with it).

    Why not the SDKs' typed methods and streams: the typed `create` walks the messages against
    their TypedDicts (~11 ms of CPU for a 40-message history, measured) to change nothing in
    them, and their streams build a pydantic model per event (Anthropic's helper also a
    snapshot of the whole message), most of a token's worker CPU (bench/stream_parse.py). Why
    a list per read rather than an event at a time: under load the worker reads each stream
    once per delta window (assembly.batched), and a read then holds a dozen events; each layer
    of async iteration costs an await per item it hands over. While `pace()` is not 0 the
    connection is not read between two reads (see `_Holder`). The SDK still makes the request:
    auth, base URL, headers, timeouts and its errors for HTTP statuses (ProviderError here, as
    the other failures: a cut or stalled stream, bytes that are not JSON). A caller fails an
    event of another shape than its protocol's (MALFORMED) as UNREADABLE.
    """
    try:
        response = cast(
            httpx2.Response,
            await client.post(
                path,
                cast_to=httpx2.Response,
                content=orjson.dumps(body),
                options=request_options(sdk),
                stream=True,
                stream_cls=None,
            ),
        )
    except sdk_error as exc:
        raise translate_sdk_error(exc, sdk) from None
    # What the SDK lets through from its aiohttp transport: an answer that is not HTTP (a bad
    # status line, chunk size or header from a broken server or proxy).
    except aiohttp.ServerTimeoutError:
        raise ProviderError(TIMEOUT_ERROR, retryable=True) from None
    except aiohttp.ClientResponseError:
        raise ProviderError(UNREADABLE, retryable=True) from None
    except aiohttp.ClientError:
        raise ProviderError(CONNECTION_ERROR, retryable=True) from None
    received = False  # events came: a failure from here on cuts an answer
    decoder = SSEData()
    holder = _Holder.of(response)
    if holder is not None:
        holder.watch()
    try:
        media = response.headers.get("content-type", "text/event-stream").lower()
        if not media.startswith("text/event-stream"):
            # A web page or a gateway's error with a 200, or a server that ignored `stream`:
            # no events would come, and an empty answer is not one.
            raise ProviderError(UNREADABLE, retryable=True)
        async for chunk in _body(response, holder):
            events: list[Any] = []
            try:
                for data in decoder.feed(chunk):
                    if data == b"[DONE]":
                        if end is not None:
                            end.done = True
                        if events:
                            yield events
                        return
                    events.append(decode(data))
            except UNDECODABLE:
                if events:
                    yield events  # the events before the unreadable one first
                raise
            if events:
                received = True
                held = holder.hold() if holder is not None and pace() > 0 else None
                try:
                    yield events
                finally:
                    if held is not None:
                        _Holder.release(held)  # (also when the reader stops here)
        last = [decode(data) for data in decoder.end() if data != b"[DONE]"]
        if last:
            yield last
    # (the SDKs' HTTP layer is httpx2, whose errors are not httpx's; a body read straight
    # from aiohttp (_body) fails with aiohttp's own)
    except (httpx2.TimeoutException, aiohttp.ServerTimeoutError):
        raise ProviderError(TIMEOUT_ERROR, retryable=True) from None
    except (*UNDECODABLE, EventTooLong, BrokenBody):
        raise ProviderError(UNREADABLE, retryable=True) from None
    except RuntimeError:
        # aiohttp's reader refuses a read begun once the connection is gone ("Connection
        # closed."): how a body broken between two reads ends (see _Holder).
        if holder is None or not holder.broken():
            raise
        raise ProviderError(UNREADABLE, retryable=True) from None
    except (httpx2.HTTPError, aiohttp.ClientError):
        raise ProviderError(CUT_OFF if received else CONNECTION_ERROR, retryable=True) from None
    finally:
        if holder is not None:
            holder.unwatch()
        await response.aclose()


def _body(response: httpx2.Response, holder: _Holder | None) -> AsyncIterator[bytes]:
    """The response's body, a read at a time. Straight from aiohttp's reader when the SDK's
    aiohttp transport is in use (`holder`) and the body is not compressed: httpx2's
    `aiter_bytes` goes through five layers of async iteration per read (its decoder and
    chunker, its raw stream, the transport's stream, aiohttp's chunk iterator), ~12,000
    instructions a read more (callgrind, a worker writing one reply: 5% of a reply read a
    token at a time, 3% of one read in bursts). A compressed body goes through them: httpx2
    decodes it (the transport does not). aiohttp's errors are the transport's to map to
    httpx2's; read here, stream_events takes them as they are."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if holder is None or encoding not in ("", "identity"):
        return response.aiter_bytes()
    return _raw_reads(holder.content)


async def _raw_reads(content: Any) -> AsyncIterator[bytes]:
    while True:
        # Whatever has arrived, up to READ_BYTES (b"" at the end). Not `readany`: it takes
        # only the HTTP chunks parsed when it is called, and aiohttp's parser hands the next
        # ones over as each is taken (one token a read, not a window's).
        data = await content.read(READ_BYTES)
        if not data:
            return
        yield data


READ_BYTES = 65_536  # (aiohttp's own read buffer size)
WATCH_SECONDS = 1.0  # how often a body being read is checked for a connection gone (_Holder)


class BrokenBody(aiohttp.ClientPayloadError):
    """A response's connection closed while its body was being read, and the body neither
    ended nor failed: aiohttp's parser found bytes that are not HTTP in it (see _Holder)."""


class _Holder:
    """Leaves a response's connection unread between two reads of a paced stream, so that
    the model's writes meanwhile gather in the kernel's socket buffer and come in one
    receive, parsed in one pass by aiohttp's parser: a token then costs no wakeup of the
    event loop, no receive and no parser call of its own (with 500 streams, about a quarter
    of the workers' CPU; bench/relay.py). It pauses reading as aiohttp's own flow control
    does when its buffer is full (`pause_reading` and `resume_reading` of the connection's
    protocol: the read timeout, which measures the peer, stops meanwhile), and only while the
    response's body is still coming and nothing else paused it: a finished response's
    connection goes back to the pool, where another request may take it.

    It also watches the body while it is read (`watch`): when aiohttp's C parser meets bytes
    that are not HTTP in the middle of a body (a chunk size that is not hexadecimal, a chunk
    not ended by CRLF), aiohttp 3.14.5 closes the connection and drops its read timer but
    neither ends nor fails the body. A read begun after that takes what was parsed before the
    break, then is refused ("Connection closed.", a RuntimeError: stream_events asks `broken`);
    but a read already waiting would wait for ever (the reply until LLM_REPLY_MAX_SECONDS).
    Every WATCH_SECONDS such a waiting read is failed with BrokenBody (a timer a stream, not one
    a read: its cost does not grow with the tokens; it waits only with nothing left unread, so
    no token is lost).

    The connection is reached through the SDKs' aiohttp transport (the `httpx_aiohttp` that
    the openai and anthropic SDKs each vendor), whose stream keeps the aiohttp response as a
    private attribute: if a release of the SDK moves it, streams are read as they come, as
    before (tests/test_paced_reads.py checks that the pinned SDKs have it)."""

    __slots__ = ("_response", "_timer")

    def __init__(self, response: Any) -> None:
        self._response = response  # aiohttp's ClientResponse
        self._timer: asyncio.TimerHandle | None = None

    def watch(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(WATCH_SECONDS, self._check)

    def unwatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def broken(self) -> bool:
        """Whether the body neither ended nor failed and its connection is gone."""
        return self._unsettled() and self._gone()

    def _unsettled(self) -> bool:
        """The body neither ended nor failed (else its reader knows)."""
        return not (self.content.is_eof() or self.content.exception() is not None)

    def _gone(self) -> bool:
        connection = self._response.connection
        protocol = connection.protocol if connection is not None else None
        return protocol is None or protocol.transport is None

    def _check(self) -> None:
        self._timer = None
        if not self._unsettled():
            return
        if not self._gone():
            self.watch()
        # A read waiting now waits for ever; one not begun yet will be refused (see above).
        # (aiohttp's reader keeps its waiting read private; if a release renames it, the body
        # is failed as soon as it is seen broken: what was left unread of it is lost.)
        elif getattr(self.content, "_waiter", True) is not None:
            self.content.set_exception(
                BrokenBody("the connection closed in the middle of the body")
            )

    @property
    def content(self) -> Any:
        """aiohttp's reader of the response's body (a StreamReader)."""
        return self._response.content

    @classmethod
    def of(cls, response: httpx2.Response) -> _Holder | None:
        stream = getattr(response.stream, "_stream", None)  # httpx2's BoundAsyncStream
        aiohttp_response = getattr(stream, "_aiohttp_response", None)
        if not hasattr(aiohttp_response, "connection") or not hasattr(aiohttp_response, "content"):
            return None
        return cls(aiohttp_response)

    def hold(self) -> Any:
        """The connection's protocol, its reading paused; None when there is nothing to hold
        (the body has all come, or reading is paused already)."""
        connection = self._response.connection
        if connection is None or self._response.content.is_eof():
            return None
        protocol, transport = connection.protocol, connection.transport
        if protocol is None or transport is None or transport.is_closing():
            return None
        if not transport.is_reading():
            return None  # aiohttp's flow control holds it: left to it
        protocol.pause_reading()
        return protocol

    @staticmethod
    def release(protocol: Any) -> None:
        if protocol.transport is not None:  # (None once the connection is lost)
            protocol.resume_reading()


T = TypeVar("T")


async def each_item(reads: AsyncIterator[list[T]]) -> AsyncGenerator[T, None]:
    """The items of `reads` one by one (:meth:`Provider.stream` of a provider that reads its
    connection itself); closing this closes `reads`."""
    source: Any = reads  # an async generator: it has aclose
    async with contextlib.aclosing(source):
        async for items in source:
            for item in items:
                yield item


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


async def gathered(stream: AsyncIterator[T]) -> AsyncGenerator[list[T], None]:
    """The items of `stream` grouped as they arrived: a task reads the stream, and each step
    hands over everything it read since the step before (waiting for at least one item). The
    stream's errors are raised after the items before them; closing this closes the stream
    (which stops the provider)."""
    gathering: list[Any] = []
    arrived = asyncio.Event()
    ended = object()

    async def pump() -> None:
        try:
            source: Any = stream  # an async generator (a provider's stream): it has aclose
            async with contextlib.aclosing(source):
                async for item in source:
                    gathering.append(item)
                    arrived.set()
        except Exception as exc:
            gathering.append(_Failed(exc))
        else:
            gathering.append(ended)
        arrived.set()

    reader = asyncio.create_task(pump(), name="provider-stream")
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            batch = gathering[:]
            gathering.clear()
            end = batch[-1] if batch else None
            if end is ended or isinstance(end, _Failed):
                batch.pop()
            if batch:
                yield batch
            if isinstance(end, _Failed):
                raise end.error
            if end is ended:
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
