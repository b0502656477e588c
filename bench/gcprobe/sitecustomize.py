"""A garbage-collection probe for the processes of the reply benchmarks (not part of the service).

Python imports `sitecustomize` at start-up from its path: the benchmark puts this folder first in
the PYTHONPATH of the API and worker processes it starts, with BENCH_GC_LOG naming a file. Every
collection that took at least BENCH_GC_MIN_MS milliseconds (default 5) then appends one line to
that file: `<pid> <generation> <milliseconds> <unix time at its end>`. It only observes the
collector (`gc.callbacks`, two calls of a few hundred nanoseconds per collection); without
BENCH_GC_LOG it does nothing.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

_PATH = os.environ.get("BENCH_GC_LOG")


def _install(path: str, min_ms: float) -> None:
    started = [0.0]

    def probe(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        elapsed = (time.perf_counter() - started[0]) * 1000
        if elapsed >= min_ms:
            line = f"{os.getpid()} {info['generation']} {elapsed:.2f} {time.time():.4f}\n"
            with open(path, "a") as out:  # rare (slow collections only): no file kept open
                out.write(line)

    gc.callbacks.append(probe)


if _PATH:
    _install(_PATH, float(os.environ.get("BENCH_GC_MIN_MS", "5")))
