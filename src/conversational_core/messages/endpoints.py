"""HTTP routes of the message resource (thin: parse, call the service, shape the reply)."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Path, Request
from starlette.responses import Response
from starlette.routing import Route

from conversational_core.auth.middleware import principal_of
from conversational_core.http import (
    IDEMPOTENCY_OPENAPI,
    HotEndpoint,
    body_model,
    expected_version,
    idempotency,
    json_response,
    path_id,
    query_model,
    query_parameters,
)
from conversational_core.messages.schemas import (
    MessageCreate,
    MessageList,
    MessageListQuery,
    MessageOut,
    MessageUpdate,
)
from conversational_core.messages.service import MessageService
from conversational_core.schemas import ID_PATTERN

router = APIRouter(prefix="/conversations/{conversation_id}/messages", tags=["messages"])

ConversationId = Annotated[str, Path(pattern=ID_PATTERN)]
MessageId = Annotated[str, Path(pattern=ID_PATTERN)]


def _service(request: Request) -> MessageService:
    service: MessageService = request.state.messages
    return service


@router.post("", status_code=201, response_model=MessageOut, openapi_extra=IDEMPOTENCY_OPENAPI)
async def create_message(
    request: Request,
    conversation_id: ConversationId,
    body: MessageCreate,
) -> Response:
    return await _create_message(request, conversation_id, body)


@router.get("", response_model=MessageList, openapi_extra=query_parameters(MessageListQuery))
async def list_messages(request: Request, conversation_id: ConversationId) -> Response:
    return await _list_messages(request, conversation_id)


async def _create_message(request: Request, conversation_id: str, body: MessageCreate) -> Response:
    principal = principal_of(request)
    idem = idempotency(request, body)
    message, replayed = await _service(request).create(principal, conversation_id, body, idem)
    headers = {
        "Location": f"/conversations/{conversation_id}/messages/{message.id}",
        "ETag": message.etag,
    }
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(message, 201, headers)


async def _list_messages(request: Request, conversation_id: str) -> Response:
    principal = principal_of(request)
    query = query_model(request, MessageListQuery)
    page = await _service(request).list(
        principal,
        conversation_id,
        limit=query.limit,
        order=query.order,
        cursor=query.cursor,
        after=query.after,
        before=query.before,
    )
    # Assembled from the stored JSON of each message: no decode and re-encode on the hot path.
    tail = b',"next_cursor":' + orjson.dumps(page.next_cursor) + b"}"
    body = page.items.json_array(b'{"items":', tail)
    return Response(body, media_type="application/json")


# The two hottest routes (append, read a page) are served by plain Starlette routes placed before
# FastAPI's: FastAPI's per-request machinery (its included-router matching, dependency solving,
# parameter models) measured as a third of their cost, and they need none of it: auth is a
# middleware, the body and query are validated by one pydantic pass each (http.py gives the same
# 400/422 problems). The FastAPI routes above document them in OpenAPI; they are reached only if
# HOT_ROUTES is not installed.


async def _create_message_route(request: Request) -> Response:
    conversation_id = path_id(request, "conversation_id")
    return await _create_message(request, conversation_id, await body_model(request, MessageCreate))


async def _list_messages_route(request: Request) -> Response:
    return await _list_messages(request, path_id(request, "conversation_id"))


async def _messages_route(request: Request) -> Response:
    if request.method == "POST":
        return await _create_message_route(request)
    return await _list_messages_route(request)


# One route for both methods, so that a 405 on this path names them all in `Allow`.
HOT_ROUTES = [
    Route(
        "/conversations/{conversation_id}/messages",
        HotEndpoint(_messages_route),
        methods=["GET", "POST"],
    ),
]


@router.get("/{message_id}", response_model=MessageOut)
async def get_message(
    request: Request, conversation_id: ConversationId, message_id: MessageId
) -> Response:
    principal = principal_of(request)
    message = await _service(request).get(principal, conversation_id, message_id)
    return json_response(message, headers={"ETag": message.etag})


@router.put("/{message_id}", response_model=MessageOut)
async def update_message(
    request: Request,
    conversation_id: ConversationId,
    message_id: MessageId,
    body: MessageUpdate,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:
    principal = principal_of(request)
    expected = expected_version(if_match, "m")
    message = await _service(request).update(principal, conversation_id, message_id, body, expected)
    return json_response(message, headers={"ETag": message.etag})


@router.delete("/{message_id}", status_code=204)
async def delete_message(
    request: Request, conversation_id: ConversationId, message_id: MessageId
) -> Response:
    principal = principal_of(request)
    await _service(request).delete(principal, conversation_id, message_id)
    return Response(status_code=204)


@router.post("/{message_id}/cancel", response_model=MessageOut)
async def cancel_reply(
    request: Request, conversation_id: ConversationId, message_id: MessageId
) -> Response:
    principal = principal_of(request)
    message = await _service(request).cancel(principal, conversation_id, message_id)
    return json_response(message, headers={"ETag": message.etag})
