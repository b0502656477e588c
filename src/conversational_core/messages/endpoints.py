"""HTTP routes of the message resource (thin: parse, call the service, shape the reply)."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.responses import Response

from conversational_core.auth.middleware import principal_of
from conversational_core.http import (
    IDEMPOTENCY_OPENAPI,
    expected_version,
    idempotency,
    json_response,
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


def _list_query(request: Request) -> MessageListQuery:
    """The page's query parameters, validated in one pass by the model. Parsed here rather than
    declared as FastAPI parameters: FastAPI's per-parameter machinery measured as a sixth of a
    page request. Errors are the usual 422 problem (`loc` starts with "query")."""
    try:
        return MessageListQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]
        raise RequestValidationError(errors) from None


@router.get("", response_model=MessageList, openapi_extra=query_parameters(MessageListQuery))
async def list_messages(request: Request, conversation_id: ConversationId) -> Response:
    principal = principal_of(request)
    query = _list_query(request)
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
    body = b'{"items":' + page.items.json_array() + b',"next_cursor":'
    body += orjson.dumps(page.next_cursor) + b"}"
    return Response(body, media_type="application/json")


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
