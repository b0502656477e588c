"""`GET /conversations/{id}/events`: the conversation's events as Server-Sent Events.

- `Last-Event-ID` (header, or `last_event_id` query parameter for clients that cannot set
  headers) resumes after that event: missed events within the retention window first, then live
  ones, none twice. Without it, the stream starts with what happens from now on. When events
  after it are no longer retained, a `conversation.resync` event comes instead of them (the
  client reads the conversation again; EventHub.subscribe).
- A user holds at most SSE_MAX_STREAMS_PER_USER streams open on one process (then 429).
- A keep-alive comment every SSE_KEEPALIVE_SECONDS; a connection ends after
  SSE_MAX_CONNECTION_SECONDS, or when the client falls SSE_CLIENT_BUFFER events behind, with a
  `retry:` hint — the client reconnects with Last-Event-ID and loses nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request

from conversational_core import openapi
from conversational_core.auth.middleware import principal_of
from conversational_core.conversations.service import ConversationService
from conversational_core.errors import AppError, Unprocessable
from conversational_core.observability import metrics
from conversational_core.openapi import problems
from conversational_core.replies import sse
from conversational_core.replies.schemas import EVENT_DATA, EVENT_TYPES
from conversational_core.replies.sse import EventStreamResponse
from conversational_core.routing import Operation
from conversational_core.schemas import ID_PATTERN
from conversational_core.settings import Settings
from conversational_core.storage import events as event_types
from conversational_core.storage.base import EventHub, SlowConsumer

router = APIRouter(tags=["events"], route_class=Operation)

_WRITE_BYTES = 64 * 1024  # events written to a client at once, about (see _stream)

# Event ids: Redis stream ids (`1732459940361-0`) or the embedded store's numbers. (The header
# may come with blanks around it: a header's value excludes them, RFC 9110 5.5.)
_EVENT_ID = r"^\d{1,20}(-\d{1,20})?$"
_EVENT_ID_HEADER = r"^[ \t]*\d{1,20}(-\d{1,20})?[ \t]*$"
_RESUME = "Resume after this event id (`0`: every retained event)."

_BUSY_RETRY_SECONDS = 5  # Retry-After of a refusal for too many streams (when one may end)


class TooManyStreams(AppError):
    status, code = 429, "too-many-streams"


class OpenStreams:
    """The event streams each user holds open on this process, at most `limit` each: one user
    (or one stolen token) cannot take the connections that the process may hold
    (MAX_CONNECTIONS) with streams that last up to an hour each. Counted in the process (no
    store round trip): with several processes a user may hold `limit` on each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open(self, user_id: str) -> Callable[[], None]:
        """Count one more stream of the user (TooManyStreams when it holds `limit`); returns
        what lets it go (to call once, when the stream is over)."""
        held = self._open.get(user_id, 0)
        if held >= self.limit:
            metrics.RATE_LIMITED.labels("streams").inc()
            raise TooManyStreams(
                f"At most {self.limit} event streams per user are open at once: close one "
                "(e.g. of a conversation no longer shown) and retry.",
                headers={"Retry-After": str(_BUSY_RETRY_SECONDS)},
            )
        self._open[user_id] = held + 1
        done = False

        def close() -> None:
            nonlocal done
            if done:
                return
            done = True
            left = self._open[user_id] - 1
            if left:
                self._open[user_id] = left
            else:
                del self._open[user_id]

        return close


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
    response_class=EventStreamResponse,
    status_code=200,
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
        str | None, Header(alias="Last-Event-ID", pattern=_EVENT_ID_HEADER, description=_RESUME)
    ] = None,
    last_event_id_query: Annotated[
        str | None,
        Query(
            alias="last_event_id",
            pattern=_EVENT_ID,
            description=_RESUME + " For clients that cannot set the header.",
        ),
    ] = None,
) -> EventStreamResponse:
    principal = principal_of(request)
    conversations: ConversationService = request.state.conversations
    await conversations.get(principal, conversation_id)  # 404 unless the caller may read it
    where = ["header", "Last-Event-ID"] if last_event_id else ["query", "last_event_id"]
    after = last_event_id.strip(" \t") if last_event_id else last_event_id_query
    settings: Settings = request.state.settings
    hub: EventHub = request.state.events
    if after is not None and not await hub.resumes(conversation_id, after):
        # Refused before the stream starts: an EventSource stops retrying on it (a stream that
        # just ended would be resumed with the same id, every `retry`, for ever).
        raise Unprocessable(
            "Last-Event-ID is no event of this conversation (one from the future, or of another "
            "store): read the conversation again and reconnect without it.",
            errors=[{"loc": where, "type": "unknown_event_id", "msg": "not an event id here"}],
        )
    streams: OpenStreams = request.state.streams
    return EventStreamResponse(
        _stream(hub, settings, conversation_id, after),
        ping_seconds=settings.SSE_KEEPALIVE_SECONDS,
        max_seconds=settings.SSE_MAX_CONNECTION_SECONDS,
        retry_ms=settings.SSE_RETRY_MS,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        on_close=streams.open(principal.user_id),
    )


async def _stream(
    hub: EventHub, settings: Settings, conversation_id: str, after: str | None
) -> AsyncIterator[bytes]:
    """The conversation's events as SSE bytes (its connection time limit, keep-alives and the
    end at shutdown are the response's: replies/sse.py)."""
    retry = settings.SSE_RETRY_MS
    metrics.SSE_CONNECTIONS.inc()
    try:
        async with hub.subscribe(conversation_id, after) as events:
            yield sse.comment("connected", retry)
            async for batch in events:
                # A batch in writes of about _WRITE_BYTES: a client on a slow link takes each
                # within a keep-alive interval (a write it does not take in one ends the stream).
                chunk: list[bytes] = []
                size = 0
                for event in batch:
                    data = sse.event(event.id, event.type, event.data)
                    chunk.append(data)
                    size += len(data)
                    if event.type == event_types.CONVERSATION_DELETED:
                        yield b"".join(chunk)
                        return
                    if size >= _WRITE_BYTES:
                        yield b"".join(chunk)
                        chunk, size = [], 0
                if chunk:
                    yield b"".join(chunk)
    except SlowConsumer:
        yield sse.comment("too far behind; reconnect with Last-Event-ID", retry)
    except ValueError:  # (an id the hub cannot read: refused with a 422 before, as a rule)
        yield sse.comment("unknown Last-Event-ID", retry)
    finally:
        metrics.SSE_CONNECTIONS.dec()
