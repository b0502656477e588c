"""HTTP routes of the conversation resource (thin: parse, call the service, shape the reply)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request
from starlette.responses import Response

from conversational_core.auth.dependencies import CurrentUser
from conversational_core.conversations.schemas import (
    ConversationCreate,
    ConversationList,
    ConversationOut,
    ConversationUpdate,
)
from conversational_core.conversations.service import ConversationService
from conversational_core.http import expected_version, fingerprint, idempotency_key, json_response
from conversational_core.schemas import ID_PATTERN
from conversational_core.storage.base import Idempotency

router = APIRouter(prefix="/conversations", tags=["conversations"])

ConversationId = Annotated[str, Path(pattern=ID_PATTERN)]


def _service(request: Request) -> ConversationService:
    service: ConversationService = request.state.conversations
    return service


@router.post("", status_code=201, response_model=ConversationOut)
async def create_conversation(
    request: Request,
    principal: CurrentUser,
    body: ConversationCreate,
    idem_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    key = idempotency_key(idem_key)
    idem = None
    if key is not None:
        idem = Idempotency(key, fingerprint(body), request.state.settings.IDEMPOTENCY_TTL_SECONDS)
    conversation, replayed = await _service(request).create(principal, body, idem)
    headers = {"Location": f"/conversations/{conversation.id}", "ETag": conversation.etag}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(conversation, 201, headers)


@router.get("", response_model=ConversationList)
async def list_conversations(
    request: Request,
    principal: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> Response:
    page = await _service(request).list(principal, limit, cursor)
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


@router.get("/{conversation_id}", response_model=ConversationOut)
async def get_conversation(
    request: Request, principal: CurrentUser, conversation_id: ConversationId
) -> Response:
    conversation = await _service(request).get(principal, conversation_id)
    return json_response(conversation, headers={"ETag": conversation.etag})


@router.put("/{conversation_id}", response_model=ConversationOut)
async def update_conversation(
    request: Request,
    principal: CurrentUser,
    conversation_id: ConversationId,
    body: ConversationUpdate,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Response:
    expected = expected_version(if_match, "c")
    conversation = await _service(request).update(principal, conversation_id, body, expected)
    return json_response(conversation, headers={"ETag": conversation.etag})


@router.delete("/{conversation_id}", status_code=204)
async def delete_conversation(
    request: Request, principal: CurrentUser, conversation_id: ConversationId
) -> Response:
    await _service(request).delete(principal, conversation_id)
    return Response(status_code=204)
