"""`GET /conversations/{id}/events`: the conversation's events as Server-Sent Events.

- `Last-Event-ID` (header, or `last_event_id` query parameter for clients that cannot set
  headers) resumes after that event: missed events within the retention window first, then live
  ones, none twice. Without it, the stream starts with what happens from now on.
- A keep-alive comment every SSE_KEEPALIVE_SECONDS; a connection ends after
  SSE_MAX_CONNECTION_SECONDS, or when the client falls SSE_CLIENT_BUFFER events behind, with a
  `retry:` hint — the client reconnects with Last-Event-ID and loses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, cast

import anyio
from fastapi import APIRouter, Header, Path, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

from conversational_core import openapi
from conversational_core.auth.middleware import principal_of
from conversational_core.conversations.service import ConversationService
from conversational_core.observability import metrics
from conversational_core.openapi import problems
from conversational_core.replies.schemas import EVENT_DATA, EVENT_TYPES
from conversational_core.routing import Operation
from conversational_core.schemas import ID_PATTERN
from conversational_core.settings import Settings
from conversational_core.storage import events as event_types
from conversational_core.storage.base import Event, EventHub, SlowConsumer

router = APIRouter(tags=["events"], route_class=Operation)

# Event ids: Redis stream ids (`1732459940361-0`) or the embedded store's numbers.
_EVENT_ID = r"^\d{1,20}(-\d{1,20})?$"
_RESUME = "Resume after this event id (`0`: every retained event)."

openapi.register(*EVENT_DATA)
# One event as a client's SSE parser sees it (comments and keep-alives carry none of it).
_SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": _EVENT_ID},
        "event": {"enum": list(EVENT_TYPES)},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [openapi.schema_ref(model) for model in EVENT_DATA]},
        },
        "retry": {"type": "integer"},
    },
}


@router.get(
    "/conversations/{conversation_id}/events",
    operation_id="streamEvents",
    summary="The conversation's events, live (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            "description": "Server-Sent Events: `message.*` and `conversation.*`, each with an "
            "`id:` to resume from.",
        },
        **problems(404),
    },
)
async def conversation_events(
    request: Request,
    conversation_id: Annotated[str, Path(pattern=ID_PATTERN)],
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", pattern=_EVENT_ID, description=_RESUME)
    ] = None,
    last_event_id_query: Annotated[
        str | None,
        Query(
            alias="last_event_id",
            pattern=_EVENT_ID,
            description=_RESUME + " For clients that cannot set the header.",
        ),
    ] = None,
) -> EventSourceResponse:
    principal = principal_of(request)
    conversations: ConversationService = request.state.conversations
    await conversations.get(principal, conversation_id)  # 404 unless the caller may read it
    after = last_event_id or last_event_id_query
    settings: Settings = request.state.settings
    hub: EventHub = request.state.events
    shutdown = _Shutdown()
    return _EventStream(
        _stream(hub, settings, conversation_id, after, shutdown),
        ping=settings.SSE_KEEPALIVE_SECONDS,
        shutdown_event=cast(anyio.Event, shutdown),
        shutdown_grace_period=1.0,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _EventStream(EventSourceResponse):
    """sse-starlette's response, sending each chunk as it is: no per-send timeout is set here
    (a client that stops reading is cut off by SSE_CLIENT_BUFFER), and the cancel scope it
    would open around every send anyway was a measurable share of the API's CPU per event
    (bench/relay.py)."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        await send(message)


def encoded(event: Event) -> bytes | ServerSentEvent:
    """An event as its SSE bytes, as sse-starlette writes them (`id`, `event`, `data` lines,
    CRLF), written here rather than through a ServerSentEvent (which decodes the data to text,
    splits it into lines and encodes it again) for every event of every client. Event data is
    one line of JSON; anything else goes through ServerSentEvent, which splits it."""
    data = event.data
    if b"\n" in data or b"\r" in data:
        return ServerSentEvent(data=data.decode(), event=event.type, id=event.id)
    return b"id: %s\r\nevent: %s\r\ndata: %s\r\n\r\n" % (
        event.id.encode(),
        event.type.encode(),
        data,
    )


class _Shutdown:
    """What sse-starlette sets (`set()`, its only use of a shutdown event) when the server shuts
    down (SIGTERM): the stream's connection time limit moves to now, and the stream ends with
    the hint to reconnect. A callback rather than an event a task of each stream waits on: one
    task less per client (10,000 clients: 10,000 tasks)."""

    def __init__(self) -> None:
        self.is_set = False
        self.limit: asyncio.Timeout | None = None  # the stream's limit, while it runs

    def set(self) -> None:
        self.is_set = True
        self.end()

    def end(self) -> None:
        if self.is_set and self.limit is not None and not self.limit.expired():
            self.limit.reschedule(asyncio.get_running_loop().time())


async def _stream(
    hub: EventHub,
    settings: Settings,
    conversation_id: str,
    after: str | None,
    shutdown: _Shutdown,
) -> AsyncIterator[ServerSentEvent | bytes]:
    retry = settings.SSE_RETRY_MS
    metrics.SSE_CONNECTIONS.inc()
    try:
        async with hub.subscribe(conversation_id, after) as events:
            yield ServerSentEvent(comment="connected", retry=retry)
            async with asyncio.timeout(settings.SSE_MAX_CONNECTION_SECONDS) as limit:
                # The server is shutting down (SIGTERM): end the stream now, with the hint.
                shutdown.limit = limit
                shutdown.end()  # (when it came already)
                try:
                    async for event in events:
                        yield encoded(event)
                        if event.type == event_types.CONVERSATION_DELETED:
                            return
                finally:
                    shutdown.limit = None
    except TimeoutError:
        reason = "the server is restarting" if shutdown.is_set else "connection time limit"
        yield ServerSentEvent(comment=f"{reason}; reconnect with Last-Event-ID", retry=retry)
    except SlowConsumer:
        yield ServerSentEvent(comment="too far behind; reconnect with Last-Event-ID", retry=retry)
    except ValueError:
        yield ServerSentEvent(comment="unknown Last-Event-ID", retry=retry)
    finally:
        metrics.SSE_CONNECTIONS.dec()
