"""The runtime of a long-running service process (the API, a worker): its garbage collector, and
stopping its background tasks."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

# Older generations collected less often than Python's defaults (700, 10, 10). A process
# holding 10,000 event streams keeps millions of objects alive, and each full collection walks
# them all (1-3 s of a stalled event loop); with the defaults it ran 27 of them during the
# 10,000-client benchmark (12.5 s of pauses in all), with a middle generation every million
# allocations and an old one every 100 of those, 1-2 (POST -> first delta p99 1.4 s -> 1.0 s,
# bench/fanout.py). The API's young collections every 10,000 allocations (x 100 = the same
# million): at 50,000 (x 20) each took 13-24 ms of its loop while it set up hundreds of
# streams, and it paused 10 ms or more 38 and 49 times in that benchmark against 9 and 9 at
# 10,000, the full collections alike (2); its instructions a request the same within their
# spread (callgrind).
THRESHOLDS = (10_000, 100, 100)
# A reply worker's: its young collections at 50,000 stayed under 3 ms in the relay, and at
# 10,000 it paused 10 ms or more more often in the fan-out (2-6 times a worker against 2).
WORKER_THRESHOLDS = (50_000, 20, 100)


def settle_gc(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Once started: what start-up made never dies, so it is frozen out of the collector's
    scans, and the collector runs at `thresholds` (THRESHOLDS: the API's)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


async def stopped(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait for it to end; a cancellation of the caller itself (meanwhile,
    or before) goes on up, not swallowed with the task's."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise
    except Exception:  # noqa: S110 - its failure is not ours: it was being stopped
        pass
