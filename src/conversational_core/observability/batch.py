"""Work of the request path done in batches, off it: the access lines and the request metrics."""

from __future__ import annotations

import asyncio
import atexit


class Batched:
    """Items gathered and handed on together by `flush`: at most FLUSH_SECONDS after the first
    item since the last flush (at once outside an event loop), and when the process exits."""

    FLUSH_SECONDS = 1.0

    def __init__(self) -> None:
        # The flush that is due, and the loop it is due on: a loop closed before it came (a
        # test's, say) leaves it pending for ever, and the next item schedules one anew.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def flush(self) -> None:
        """Hand on what was gathered (an override begins by calling this)."""
        self._timer = None

    def _flush_soon(self) -> None:
        # A flush due on a loop that still runs (a process serves on one): nothing to ask. (The
        # running loop is asked for otherwise, and on Python 3.11 that is a `getpid` system call:
        # twice a request, for its metrics and its access line.)
        timer_loop = self._timer_loop
        if self._timer is not None and timer_loop is not None and timer_loop.is_running():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop
            self.flush()
            return
        if self._timer is None or self._timer_loop is not loop:
            self._timer = loop.call_later(self.FLUSH_SECONDS, self.flush)
            self._timer_loop = loop
