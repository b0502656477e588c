"""Operations endpoints (no token needed):

- `/health` and `/health/ready`: is each dependency answering? 503 with Retry-After while one is
  down, or while the process is draining (SIGTERM received: it finishes what it has, takes
  nothing new). `/health/ready` is what a load balancer should route by.
- `/health/live`: the process answers at all (restart it if not). No dependency is checked:
  Redis being down is not a reason to restart the API.
- `/metrics`: Prometheus text format (all processes' samples with WORKERS > 1).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from conversational_core.http import json_response
from conversational_core.observability import metrics
from conversational_core.routing import Operation
from conversational_core.serving import draining
from conversational_core.storage.base import JobQueue, Store
from conversational_core.storage.errors import Unavailable

router = APIRouter(tags=["operations"], route_class=Operation)


class Check(BaseModel):
    status: Literal["ok", "unavailable"]
    backend: str | None = None
    latency_ms: float | None = None
    jobs: int | None = None
    oldest_job_age_seconds: float | None = None


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable", "draining"]
    checks: dict[str, Check]


class Alive(BaseModel):
    status: Literal["ok"]


_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "A dependency is down, or the process is draining: route elsewhere.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HealthOut"}}},
    }
}

_CHECK_TIMEOUT_SECONDS = 2.0


async def check_store(store: Store) -> dict[str, object]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(store.ping(), _CHECK_TIMEOUT_SECONDS)
    except (Unavailable, TimeoutError):
        return {"status": "unavailable", "backend": store.backend}
    return {
        "status": "ok",
        "backend": store.backend,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


async def check_queue(jobs: JobQueue) -> dict[str, object]:
    try:
        (depth, oldest), waiting = await asyncio.wait_for(
            asyncio.gather(jobs.stats(), jobs.waiting()), _CHECK_TIMEOUT_SECONDS
        )
    except (Unavailable, TimeoutError):
        return {"status": "unavailable"}
    metrics.QUEUE_JOBS.set(depth)
    metrics.QUEUE_OLDEST_AGE.set(oldest)
    metrics.QUEUE_WAITING.set(waiting)
    return {
        "status": "ok",
        "jobs": depth,
        "waiting_jobs": waiting,
        "oldest_job_age_seconds": round(oldest, 3),
    }


@router.get(
    "/health",
    operation_id="getHealth",
    summary="Each dependency's state",
    response_model=HealthOut,
    responses=_HEALTH_RESPONSES,
)
async def health(request: Request) -> Response:
    store, queue = await asyncio.gather(
        check_store(request.state.store), check_queue(request.state.jobs)
    )
    checks = {"store": store, "queue": queue}
    ok = all(check["status"] == "ok" for check in checks.values())
    status = "ok" if ok else "unavailable"
    if draining():
        ok, status = False, "draining"
    body = {"status": status, "checks": checks}
    if ok:
        return json_response(body)
    return json_response(body, 503, {"Retry-After": "2"})


@router.get(
    "/health/ready",
    operation_id="getReadiness",
    summary="Whether to route traffic here",
    response_model=HealthOut,
    responses=_HEALTH_RESPONSES,
)
async def ready(request: Request) -> Response:
    return await health(request)


@router.get(
    "/health/live",
    operation_id="getLiveness",
    summary="Whether the process answers",
    response_model=Alive,
)
async def live() -> Response:
    return json_response({"status": "ok"})


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    # The queue's gauges are read from the store at scrape time (it is shared by all processes).
    await check_queue(request.state.jobs)
    request.state.page_meter.sync()
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)
