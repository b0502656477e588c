"""HTTP routes of the conversation resource (thin: parse, call the service, shape the reply)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request
from starlette.responses import Response

from conversational_core.auth.middleware import principal_of
from conversational_core.conversations.schemas import (
    ConversationCreate,
    ConversationList,
    ConversationListQuery,
    ConversationOut,
    ConversationUpdate,
    ForkRequest,
)
from conversational_core.conversations.service import ConversationService
from conversational_core.http import (
    ETAG_HEADER,
    IDEMPOTENCY_OPENAPI,
    IF_MATCH,
    LOCATION_HEADER,
    REPLAYED_HEADER,
    expected_version,
    idempotency,
    json_response,
)
from conversational_core.openapi import problems, success
from conversational_core.routing import Operation
from conversational_core.schemas import ID_PATTERN

router = APIRouter(prefix="/conversations", tags=["conversations"], route_class=Operation)

ConversationId = Annotated[str, Path(pattern=ID_PATTERN)]
_ONE = success(200, "The conversation.", ETAG_HEADER)


def _service(request: Request) -> ConversationService:
    service: ConversationService = request.scope["state"]["conversations"]  # (principal_of)
    return service


@router.post(
    "",
    status_code=201,
    operation_id="createConversation",
    summary="Start a conversation",
    response_model=ConversationOut,
    responses=success(201, "Created.", {**LOCATION_HEADER, **ETAG_HEADER, **REPLAYED_HEADER}),
    openapi_extra=IDEMPOTENCY_OPENAPI,
)
async def create_conversation(
    request: Request,
    body: ConversationCreate | None = None,  # every field is optional: so is the body
) -> Response:
    principal = principal_of(request)
    body = body or ConversationCreate()
    idem = idempotency(request, body)
    conversation, replayed = await _service(request).create(principal, body, idem)
    headers = {"Location": f"/conversations/{conversation.id}", "ETag": conversation.etag}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(conversation, 201, headers)


@router.get(
    "",
    operation_id="listConversations",
    summary="Your conversations, most recent activity first",
    response_model=ConversationList,
)
async def list_conversations(
    request: Request, query: Annotated[ConversationListQuery, Query()]
) -> Response:
    principal = principal_of(request)
    page = await _service(request).list(principal, query.limit, query.cursor)
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


@router.get(
    "/{conversation_id}",
    operation_id="getConversation",
    summary="One conversation",
    response_model=ConversationOut,
    responses={**_ONE, **problems(404)},
)
async def get_conversation(request: Request, conversation_id: ConversationId) -> Response:
    principal = principal_of(request)
    conversation = await _service(request).get(principal, conversation_id)
    return json_response(conversation, headers={"ETag": conversation.etag})


@router.put(
    "/{conversation_id}",
    operation_id="updateConversation",
    summary="Change the fields given (`null` clears one), or switch branch (`active_leaf_id`)",
    response_model=ConversationOut,
    responses={**_ONE, **problems(404, 412)},
)
async def update_conversation(
    request: Request,
    conversation_id: ConversationId,
    body: ConversationUpdate,
    if_match: Annotated[str | None, Header(alias="If-Match", **IF_MATCH)] = None,
) -> Response:
    principal = principal_of(request)
    service = _service(request)

    async def current() -> int:
        return (await service.get(principal, conversation_id)).version

    expected = await expected_version(if_match, "c", current)
    conversation = await service.update(principal, conversation_id, body, expected)
    return json_response(conversation, headers={"ETag": conversation.etag})


@router.delete(
    "/{conversation_id}",
    status_code=204,
    operation_id="deleteConversation",
    summary="Delete a conversation, its messages and its pending replies",
    responses=problems(404),
)
async def delete_conversation(request: Request, conversation_id: ConversationId) -> Response:
    principal = principal_of(request)
    await _service(request).delete(principal, conversation_id)
    return Response(status_code=204)


@router.post(
    "/{conversation_id}/fork",
    status_code=201,
    operation_id="forkConversation",
    summary="A new conversation holding a copy of a branch (root to `message_id`)",
    response_model=ConversationOut,
    responses={**success(201, "Created.", {**LOCATION_HEADER, **ETAG_HEADER}), **problems(404)},
)
async def fork_conversation(
    request: Request, conversation_id: ConversationId, body: ForkRequest | None = None
) -> Response:
    principal = principal_of(request)
    forked = await _service(request).fork(principal, conversation_id, body or ForkRequest())
    headers = {"Location": f"/conversations/{forked.id}", "ETag": forked.etag}
    return json_response(forked, 201, headers)
