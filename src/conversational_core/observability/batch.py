"""Work of the request path done in batches, off it: the access lines and the request metrics."""

from __future__ import annotations

import asyncio
import atexit


class Batched:
    """Items gathered and handed on together by `flush`: at most FLUSH_SECONDS after the first
    item since the last flush (at once outside an event loop), and when the process exits."""

    FLUSH_SECONDS = 1.0

    def __init__(self) -> None:
        self._scheduled = False
        atexit.register(self.flush)

    def flush(self) -> None:
        """Hand on what was gathered (an override begins by calling this)."""
        self._scheduled = False

    def _flush_soon(self) -> None:
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_later(self.FLUSH_SECONDS, self.flush)
            self._scheduled = True
        except RuntimeError:  # no event loop
            self.flush()
