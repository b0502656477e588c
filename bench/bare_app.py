"""The baseline of the throughput benchmark: the same two routes as the service, bare.

The service is compared with what FastAPI itself costs on the same uvicorn settings, so that the
ratio shows what the service adds (auth, middleware, the store, Redis) rather than what the
framework, the HTTP parser or the machine cost:

- `POST /conversations/{id}/messages` validates the body with the service's own `MessageCreate`
  (FastAPI parses and validates it exactly as in the service) and answers 201 with a message JSON
  of the same shape and size as the service's, encoded with orjson like the service's. No auth,
  no store, fixed id and timestamps.
- `GET /conversations/{id}/messages` answers a constant: the bytes of a page the service returned
  once (the benchmark writes them to the file named by `BENCH_PAGE_FILE` before starting this app).

Run by the benchmark as `uvicorn bench.bare_app:app --loop uvloop --http httptools
--no-access-log --workers 1` with `src` on the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from conversational_core.messages.schemas import MessageCreate

# Same lengths as a UUIDv7 and as `utcnow()` in the service, so that the body has the same size.
FIXED_ID = "01900000-0000-7000-8000-000000000000"
FIXED_TIME = "2026-01-01T00:00:00.000000Z"

_page_file = os.environ.get("BENCH_PAGE_FILE")
PAGE = Path(_page_file).read_bytes() if _page_file else b'{"items":[],"next_cursor":null}'

app = FastAPI(title="bare baseline", docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/conversations/{conversation_id}/messages", status_code=201)
async def create_message(conversation_id: str, body: MessageCreate) -> Response:
    message = {
        "id": FIXED_ID,
        "conversation_id": conversation_id,
        "parent_id": FIXED_ID,
        "role": body.role,
        "content": body.content,
        "parts": [{"type": "text", "text": body.content}],
        "status": "completed",
        "metadata": body.metadata,
        "created_at": FIXED_TIME,
        "updated_at": FIXED_TIME,
        "reply_message_id": None,
        "usage": None,
        "error": None,
        "version": 1,
        "context": None,
        "sibling_count": 1,
        "sibling_index": 0,
    }
    return Response(orjson.dumps(message), status_code=201, media_type="application/json")


@app.get("/conversations/{conversation_id}/messages")
async def list_messages(conversation_id: str) -> Response:
    return Response(content=PAGE, media_type="application/json")
