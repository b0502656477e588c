"""`/health`: is each dependency answering? 503 with Retry-After while one is down."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from conversational_core.errors import StoreUnavailable
from conversational_core.http import json_response
from conversational_core.storage.base import JobQueue, Store

router = APIRouter(tags=["operations"])

_CHECK_TIMEOUT_SECONDS = 2.0


async def check_store(store: Store) -> dict[str, object]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(store.ping(), _CHECK_TIMEOUT_SECONDS)
    except (StoreUnavailable, TimeoutError):
        return {"status": "unavailable", "backend": store.backend}
    return {
        "status": "ok",
        "backend": store.backend,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


async def check_queue(jobs: JobQueue) -> dict[str, object]:
    try:
        depth, oldest = await asyncio.wait_for(jobs.stats(), _CHECK_TIMEOUT_SECONDS)
    except (StoreUnavailable, TimeoutError):
        return {"status": "unavailable"}
    return {"status": "ok", "jobs": depth, "oldest_job_age_seconds": round(oldest, 3)}


@router.get("/health")
async def health(request: Request) -> Response:
    store, queue = await asyncio.gather(
        check_store(request.state.store), check_queue(request.state.jobs)
    )
    checks = {"store": store, "queue": queue}
    ok = all(check["status"] == "ok" for check in checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    if ok:
        return json_response(body)
    return json_response(body, 503, {"Retry-After": "2"})
