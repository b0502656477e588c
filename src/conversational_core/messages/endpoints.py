"""HTTP routes of the message resource (thin: parse, call the service, shape the reply)."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Path, Query, Request
from starlette.responses import Response

from conversational_core.auth.middleware import principal_of
from conversational_core.http import (
    ETAG_HEADER,
    IDEMPOTENCY_OPENAPI,
    IF_MATCH,
    LOCATION_HEADER,
    REPLAYED_HEADER,
    JSONBytes,
    expected_version,
    idempotency,
    json_response,
)
from conversational_core.messages.parts import ToolResults
from conversational_core.messages.schemas import (
    MessageCreate,
    MessageList,
    MessageListQuery,
    MessageOut,
    MessageUpdate,
    RegenerateRequest,
    SiblingsQuery,
)
from conversational_core.messages.service import MessageService
from conversational_core.openapi import problems, success
from conversational_core.routing import Operation
from conversational_core.schemas import ID_PATTERN
from conversational_core.storage.models import Message

router = APIRouter(
    prefix="/conversations/{conversation_id}/messages", tags=["messages"], route_class=Operation
)

ConversationId = Annotated[str, Path(pattern=ID_PATTERN)]
MessageId = Annotated[str, Path(pattern=ID_PATTERN)]
_CREATED = success(201, "Created.", {**LOCATION_HEADER, **ETAG_HEADER, **REPLAYED_HEADER})
_ONE = success(200, "The message.", ETAG_HEADER)


def _service(request: Request) -> MessageService:
    service: MessageService = request.scope["state"]["messages"]  # (see principal_of)
    return service


_NEWER_FIELDS = frozenset({"parent_id", "parts", "tools", "tool_choice"})


@router.post(
    "",
    status_code=201,
    operation_id="createMessage",
    summary="Add a message (a user message gets an AI reply unless `respond` is false)",
    response_model=MessageOut,
    responses={**_CREATED, **problems(404, 409)},
    openapi_extra=IDEMPOTENCY_OPENAPI,
)
async def create_message(
    request: Request, conversation_id: ConversationId, body: MessageCreate
) -> Response:
    principal = principal_of(request)
    # An absent parent_id (the active leaf) and null (a new root) are different requests; the
    # fields added since the last release, when absent, leave the fingerprint as it was (a
    # retry across the upgrade).
    unset = set(_NEWER_FIELDS - body.model_fields_set)
    idem = idempotency(request, body, unset=unset)
    message, replayed = await _service(request).create(principal, conversation_id, body, idem)
    return _created(conversation_id, message, replayed)


def _created(conversation_id: str, message: Message, replayed: bool) -> Response:
    headers = {
        "Location": f"/conversations/{conversation_id}/messages/{message.id}",
        "ETag": message.etag,
    }
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(message, 201, headers)


@router.get(
    "",
    operation_id="listMessages",
    summary="A page of the active branch (or of the branch ending at `leaf`, or of every "
    "message with `view=all`)",
    response_model=MessageList,
    responses=problems(404),
)
async def list_messages(
    request: Request,
    conversation_id: ConversationId,
    query: Annotated[MessageListQuery, Query()],
) -> Response:
    principal = principal_of(request)
    page = await _service(request).list(
        principal,
        conversation_id,
        limit=query.limit,
        order=query.order,
        cursor=query.cursor,
        after=query.after,
        before=query.before,
        leaf=query.leaf,
        everything=query.view == "all",
    )
    # Assembled from the stored JSON of each message: no decode and re-encode on the hot path.
    tail = b',"next_cursor":' + orjson.dumps(page.next_cursor) + b"}"
    body = page.items.json_array(b'{"items":', tail)
    return JSONBytes(body)


@router.get(
    "/{message_id}",
    operation_id="getMessage",
    summary="One message",
    response_model=MessageOut,
    responses={**_ONE, **problems(404)},
)
async def get_message(
    request: Request, conversation_id: ConversationId, message_id: MessageId
) -> Response:
    principal = principal_of(request)
    message = await _service(request).get(principal, conversation_id, message_id)
    return json_response(message, headers={"ETag": message.etag})


@router.put(
    "/{message_id}",
    operation_id="updateMessage",
    summary="Change a message's content or metadata",
    response_model=MessageOut,
    responses={**_ONE, **problems(404, 409, 412)},
)
async def update_message(
    request: Request,
    conversation_id: ConversationId,
    message_id: MessageId,
    body: MessageUpdate,
    if_match: Annotated[str | None, Header(alias="If-Match", **IF_MATCH)] = None,
) -> Response:
    principal = principal_of(request)
    service = _service(request)

    async def current() -> int:
        return (await service.get(principal, conversation_id, message_id)).version

    expected = await expected_version(if_match, "m", current)
    message = await service.update(principal, conversation_id, message_id, body, expected)
    return json_response(message, headers={"ETag": message.etag})


@router.delete(
    "/{message_id}",
    status_code=204,
    operation_id="deleteMessage",
    summary="Delete a message and everything below it (replies being written stop)",
    responses=problems(404),
)
async def delete_message(
    request: Request, conversation_id: ConversationId, message_id: MessageId
) -> Response:
    principal = principal_of(request)
    await _service(request).delete(principal, conversation_id, message_id)
    return Response(status_code=204)


@router.post(
    "/{message_id}/cancel",
    operation_id="cancelReply",
    summary="Stop a reply that is pending or being written",
    response_model=MessageOut,
    responses={**_ONE, **problems(404, 409)},
)
async def cancel_reply(
    request: Request, conversation_id: ConversationId, message_id: MessageId
) -> Response:
    principal = principal_of(request)
    message = await _service(request).cancel(principal, conversation_id, message_id)
    return json_response(message, headers={"ETag": message.etag})


@router.post(
    "/{message_id}/regenerate",
    status_code=201,
    operation_id="regenerateReply",
    summary="Write another reply beside an assistant message; it becomes the active leaf",
    response_model=MessageOut,
    responses={**_CREATED, **problems(404, 409)},
    openapi_extra=IDEMPOTENCY_OPENAPI,
)
async def regenerate_reply(
    request: Request,
    conversation_id: ConversationId,
    message_id: MessageId,
    body: RegenerateRequest | None = None,
) -> Response:
    principal = principal_of(request)
    body = body or RegenerateRequest()
    idem = idempotency(request, body, "regenerate", message_id)
    message, replayed = await _service(request).regenerate(
        principal, conversation_id, message_id, body, idem
    )
    return _created(conversation_id, message, replayed)


@router.post(
    "/{message_id}/tool_results",
    status_code=201,
    operation_id="submitToolResults",
    summary="Answer the tool calls of a reply that requires action; the next reply is queued",
    description="In one atomic step: a `tool` message holding the results (child of the "
    "assistant message, returned here with `reply_message_id`), the assistant message "
    "`completed`, and the next reply queued under the tool message. Every call must be "
    "answered, once (422 otherwise); a message that is not waiting answers 409.",
    response_model=MessageOut,
    responses={**_CREATED, **problems(404, 409)},
    openapi_extra=IDEMPOTENCY_OPENAPI,
)
async def submit_tool_results(
    request: Request,
    conversation_id: ConversationId,
    message_id: MessageId,
    body: ToolResults,
) -> Response:
    principal = principal_of(request)
    idem = idempotency(request, body, "tool_results", message_id)
    message, replayed = await _service(request).answer_tools(
        principal, conversation_id, message_id, body, idem
    )
    return _created(conversation_id, message, replayed)


@router.get(
    "/{message_id}/siblings",
    operation_id="listSiblings",
    summary="The message and its siblings (the versions of its turn), in creation order",
    response_model=MessageList,
    responses=problems(404),
)
async def list_siblings(
    request: Request,
    conversation_id: ConversationId,
    message_id: MessageId,
    query: Annotated[SiblingsQuery, Query()],
) -> Response:
    principal = principal_of(request)
    page = await _service(request).siblings(
        principal, conversation_id, message_id, limit=query.limit, cursor=query.cursor
    )
    tail = b',"next_cursor":' + orjson.dumps(page.next_cursor) + b"}"
    return JSONBytes(page.items.json_array(b'{"items":', tail))
