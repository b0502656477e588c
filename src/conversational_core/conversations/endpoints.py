"""HTTP routes of the conversation resource (thin: parse, call the service, shape the reply)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request
from starlette.responses import Response

from conversational_core.auth.middleware import principal_of
from conversational_core.conversations.schemas import (
    ConversationCreate,
    ConversationList,
    ConversationOut,
    ConversationUpdate,
)
from conversational_core.conversations.service import ConversationService
from conversational_core.http import (
    IDEMPOTENCY_OPENAPI,
    expected_version,
    idempotency,
    json_response,
)
from conversational_core.schemas import ID_PATTERN

router = APIRouter(prefix="/conversations", tags=["conversations"])

ConversationId = Annotated[str, Path(pattern=ID_PATTERN)]


def _service(request: Request) -> ConversationService:
    service: ConversationService = request.state.conversations
    return service


@router.post("", status_code=201, response_model=ConversationOut, openapi_extra=IDEMPOTENCY_OPENAPI)
async def create_conversation(
    request: Request,
    body: ConversationCreate,
) -> Response:
    principal = principal_of(request)
    idem = idempotency(request, body)
    conversation, replayed = await _service(request).create(principal, body, idem)
    headers = {"Location": f"/conversations/{conversation.id}", "ETag": conversation.etag}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(conversation, 201, headers)


@router.get("", response_model=ConversationList)
async def list_conversations(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    principal = principal_of(request)
    page = await _service(request).list(principal, limit, cursor)
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


@router.get("/{conversation_id}", response_model=ConversationOut)
async def get_conversation(request: Request, conversation_id: ConversationId) -> Response:
    principal = principal_of(request)
    conversation = await _service(request).get(principal, conversation_id)
    return json_response(conversation, headers={"ETag": conversation.etag})


@router.put("/{conversation_id}", response_model=ConversationOut)
async def update_conversation(
    request: Request,
    conversation_id: ConversationId,
    body: ConversationUpdate,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:
    principal = principal_of(request)
    expected = expected_version(if_match, "c")
    conversation = await _service(request).update(principal, conversation_id, body, expected)
    return json_response(conversation, headers={"ETag": conversation.etag})


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(request: Request, conversation_id: ConversationId) -> Response:
    principal = principal_of(request)
    await _service(request).delete(principal, conversation_id)
    return Response(status_code=204)
