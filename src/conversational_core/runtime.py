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
# bench/fanout.py). Young collections every 10,000 (x 100 = the same million): at 50,000 (x 20)
# each took 13-24 ms of the API's loop while it set up hundreds of streams, and the API
# paused 10 ms or more 38 and 49 times in that benchmark against 9 and 9 now, the full
# collections alike (2), at +0.3-0.7% of a request's instructions (callgrind).
THRESHOLDS = (10_000, 100, 100)


def settle_gc() -> None:
    """Once started: what start-up made never dies, so it is frozen out of the collector's
    scans, and the collector runs at THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


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
